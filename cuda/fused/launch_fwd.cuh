// Host launch of one fused forward instantiation (included by the fwd_<dtype>_hd<D>.cu files only).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "fused/fused_fwd.h"
#include "fused/kernel_traits.cuh"
#include "fused/mainloop_fwd.cuh"
#include "fused/tile_scheduler.cuh"

namespace jax_na {
namespace fused {

// Launches `kernel` (a forward kernel of Traits: fused_fwd_kernel or fused_fwd_sm90_kernel) over the
// Q tiles: grid (groups x tiles, heads, batch).
template <class Traits, class Kernel>
cudaError_t launch_fwd_kernel(Kernel kernel, const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream) {
  using QTile = typename Traits::QTile;
  if (pr.B == 0 || pr.N == 0) return cudaSuccess;
  FwdKernelParams kp;
  kp.pr = pr;
  kp.q = args.q;
  kp.k = args.k;
  kp.v = args.v;
  kp.add_k = args.add_k;
  kp.add_v = args.add_v;
  kp.out = args.out;
  kp.lse = args.lse;
  kp.scale = args.scale;
  kp.scale_log2 = static_cast<float>(static_cast<double>(args.scale) * 1.4426950408889634);
  int64_t blocks = 0;
  if (!tiles_per_axis<QTile>(pr, kp.q_tiles, &blocks) || pr.H > 65535 || pr.B > 65535) return cudaErrorInvalidValue;
  constexpr int kSmem = Traits::kSmemBytes;
  cudaError_t st = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (st != cudaSuccess) return st;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(pr.H), static_cast<unsigned>(pr.B));
  kernel<<<grid, Traits::kNThreads, kSmem, stream>>>(kp);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_fwd(const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream) {
  using Traits = FwdTraits<kDType, kHeadDim, kRank>;
  return launch_fwd_kernel<Traits>(fused_fwd_kernel<Traits>, pr, args, stream);
}

#define JNA_FUSED_FWD_INSTANTIATE(DT, D)                                                                 \
  template cudaError_t run_fwd<DT, D, 1>(const geo::Problem&, const FwdArgs&, cudaStream_t);             \
  template cudaError_t run_fwd<DT, D, 2>(const geo::Problem&, const FwdArgs&, cudaStream_t);             \
  template cudaError_t run_fwd<DT, D, 3>(const geo::Problem&, const FwdArgs&, cudaStream_t);

}  // namespace fused
}  // namespace jax_na
