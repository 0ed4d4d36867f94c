// Host launch of one Hopper fused forward instantiation (included by hopper/fwd_<dtype>_hd<D>.cu only).
#pragma once

#include "fused/hopper/kernel_traits.cuh"
#include "fused/hopper/mainloop_fwd.cuh"
#include "fused/launch_fwd.cuh"

namespace jax_na {
namespace fused {

// K/V tiles of 128 keys in 1-D and 2-D (16 x 8), 64 in 3-D (2 x 8 x 4: hopper/kernel_traits.cuh).
// 128-key tiles halve the per-tile work outside the GEMMs (barriers, flags, row reductions, the O
// rescale); in 2-D that outweighs the keys their coarser boxes add (H200, bf16: p2 0.688 -> 0.597 ms,
// p6 14.95 -> 12.64, p7 12.34 -> 9.96 against 64-key tiles). In 3-D they need two smem stages (three
// do not fit beside the 3-D row windows) and measured slower than 64-key tiles under the same Q tile
// (p3 1.376 vs 1.141 ms, p8 75.0 vs 63.4, p10 1.205 vs 1.033).
// JNA_SM90_BLOCK_N_2D / _3D: experiments (64 or 128).
#ifndef JNA_SM90_BLOCK_N_2D
#define JNA_SM90_BLOCK_N_2D 128
#endif
#ifndef JNA_SM90_BLOCK_N_3D
#define JNA_SM90_BLOCK_N_3D 64
#endif
template <int kRank>
constexpr int kSm90BlockN = kRank == 1 ? 128 : (kRank == 2 ? JNA_SM90_BLOCK_N_2D : JNA_SM90_BLOCK_N_3D);

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
