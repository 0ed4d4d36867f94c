// Host launch of one fused forward instantiation (included by the fwd_<dtype>_hd<D>.cu files only).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/launch.cuh"
#include "fused/fused_fwd.h"
#include "fused/kernel_traits.cuh"
#include "fused/mainloop_fwd.cuh"
#include "fused/tile_scheduler.cuh"

namespace jax_na {
namespace fused {

// The forward kernels' parameters and grid (groups x Q tiles, heads, batch) for Traits' Q tiles;
// false when the grid does not fit.
template <class Traits>
bool fwd_kernel_params(const geo::Problem& pr, const FwdArgs& args, FwdKernelParams* kp, dim3* grid) {
  using QTile = typename Traits::QTile;
  kp->pr = pr;
  kp->q = args.q;
  kp->k = args.k;
  kp->v = args.v;
  kp->add_k = args.add_k;
  kp->add_v = args.add_v;
  kp->out = args.out;
  kp->lse = args.lse;
  kp->scale = args.scale;
  kp->scale_log2 = static_cast<float>(static_cast<double>(args.scale) * 1.4426950408889634);
#if defined(JNA_FWD_TRACE)
  kp->trace = fwd_trace_target();
#endif
  int64_t blocks = 0;
  if (!tiles_per_axis<QTile>(pr, kp->q_tiles, &blocks) || pr.H > 65535 || pr.B > 65535) return false;
  *grid = dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(pr.H), static_cast<unsigned>(pr.B));
  return true;
}

// Launches `kernel` (a forward kernel of Traits taking Params) on `grid`.
template <class Traits, class Kernel, class Params>
cudaError_t launch_fwd_grid(Kernel kernel, const Params& params, dim3 grid, cudaStream_t stream) {
  return launch_with_smem(kernel, grid, Traits::kLaunchThreads, Traits::kSmemBytes, params, stream);
}

// Launches `kernel` (a forward kernel of Traits taking FwdKernelParams) over the Q tiles.
template <class Traits, class Kernel>
cudaError_t launch_fwd_kernel(Kernel kernel, const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream) {
  if (pr.B == 0 || pr.N == 0) return cudaSuccess;
  FwdKernelParams kp;
  dim3 grid;
  if (!fwd_kernel_params<Traits>(pr, args, &kp, &grid)) return cudaErrorInvalidValue;
  return launch_fwd_grid<Traits>(kernel, kp, grid, stream);
}

// args.tiles_sm80 picks the configuration (cudaErrorInvalidValue for one that is not compiled).
template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_fwd(const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream) {
  using Configs = PortableFwdTilesFor<kDType, kHeadDim, kRank>;
  return with_tile_config<Configs>(args.tiles_sm80, [&](auto config) {
    using Shapes = typename Configs::template At<decltype(config)::value>;
    // A warp per warp tile: 8 for the 128-query tiles, 4 for head dim 32's 64-query ones.
    using Traits = PortableFwdTraitsOf<FwdTraits<kDType, kHeadDim, kRank, Shapes::KVTile::kSize,
                                                 Shapes::QTile::kSize / Shapes::WarpTile::kSize, 2, Shapes>>;
    return launch_fwd_kernel<Traits>(fused_fwd_kernel<Traits>, pr, args, stream);
  });
}

#define JNA_FUSED_FWD_INSTANTIATE(DT, D)                                                                 \
  template cudaError_t run_fwd<DT, D, 1>(const geo::Problem&, const FwdArgs&, cudaStream_t);             \
  template cudaError_t run_fwd<DT, D, 2>(const geo::Problem&, const FwdArgs&, cudaStream_t);             \
  template cudaError_t run_fwd<DT, D, 3>(const geo::Problem&, const FwdArgs&, cudaStream_t);

}  // namespace fused
}  // namespace jax_na
