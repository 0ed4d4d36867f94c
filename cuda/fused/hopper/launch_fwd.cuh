// Host launch of one Hopper fused forward instantiation (included by hopper/fwd_<dtype>_hd<D>.cu only).
#pragma once

#include "fused/hopper/kernel_traits.cuh"
#include "fused/hopper/mainloop_fwd.cuh"
#include "fused/launch_fwd.cuh"

namespace jax_na {
namespace fused {

// KV tiles of 128 keys for 1-D (long contiguous windows; halves the per-tile overhead), 64 for 2-D/3-D
// (boxes that hug the windows; a 128-key variant measured no faster on p2).
template <int kRank>
constexpr int kSm90BlockN = kRank == 1 ? 128 : 64;

template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_fwd_sm90(const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream) {
  using Traits = HopperFwdTraits<kDType, kHeadDim, kRank, kSm90BlockN<kRank>>;
  if (pr.B == 0 || pr.N == 0) return cudaSuccess;
  HopperFwdParams hp{};
  dim3 grid;
  if (!fwd_kernel_params<Traits>(pr, args, &hp.base, &grid)) return cudaErrorInvalidValue;
  hp.use_tma = encode_kv_tensor_maps<Traits>(pr, args.k, args.v, &hp.maps);
#if defined(JNA_FWD_TRACE)
  hp.trace = fwd_trace_target();
#endif
  return launch_fwd_grid<Traits>(fused_fwd_sm90_kernel<Traits>, hp, grid, stream);
}

#define JNA_FUSED_FWD_SM90_INSTANTIATE(DT, D)                                                            \
  template cudaError_t run_fwd_sm90<DT, D, 1>(const geo::Problem&, const FwdArgs&, cudaStream_t);        \
  template cudaError_t run_fwd_sm90<DT, D, 2>(const geo::Problem&, const FwdArgs&, cudaStream_t);        \
  template cudaError_t run_fwd_sm90<DT, D, 3>(const geo::Problem&, const FwdArgs&, cudaStream_t);

}  // namespace fused
}  // namespace jax_na
