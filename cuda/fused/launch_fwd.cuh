// Host launch of one fused forward instantiation (included by the fwd_<dtype>_hd<D>.cu files only).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
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

// The portable forward's traits for tile configuration Shapes: a warp per warp tile (8 of 16 rows
// for the 128-query tiles, 4 for head dim 32's 64-query ones, 4 of 32 rows at head dim 128).
template <DType kDType, int kHeadDim, int kRank, class Shapes>
using PortableFwdTraitsFor = PortableFwdTraitsOf<FwdTraits<kDType, kHeadDim, kRank, Shapes::KVTile::kSize,
                                                           Shapes::QTile::kSize / Shapes::WarpTile::kSize, 2, Shapes>>;

// Whether the current device runs Traits' 32-row warps (two CTAs per SM: 8 warps, as one CTA of
// 16-row ones). An SM whose shared memory holds only one such CTA (A100: 164 KB, sm86/89: 100 KB)
// would run 4 warps, one per scheduler, with nothing to hide their stalls: the 16-row warps run
// there instead. JAX_NA_FUSED_16_ROW_WARPS=1 (read once) takes them everywhere, so that the GPU
// tests check them on an H100 too.
template <class Traits>
cudaError_t runs_32_row_warps(bool* yes) {
  static const bool forced = [] {
    const char* v = std::getenv("JAX_NA_FUSED_16_ROW_WARPS");
    return v != nullptr && v[0] == '1';
  }();
  int smem = 0;
  const cudaError_t st = current_device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(&smem);
  constexpr int kReservedPerCta = 1024;  // shared memory the system keeps per CTA (sm80 and up)
  *yes = !forced && smem >= 2 * (Traits::kSmemBytes + kReservedPerCta);
  return st;
}

// args.tiles_sm80 picks the configuration (cudaErrorInvalidValue for one that is not compiled).
template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_fwd(const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream) {
  using Configs = PortableFwdTilesFor<kDType, kHeadDim, kRank>;
  return with_tile_config<Configs>(args.tiles_sm80, [&](auto config) {
    using Shapes = typename Configs::template At<decltype(config)::value>;
    using Traits = PortableFwdTraitsFor<kDType, kHeadDim, kRank, Shapes>;
    if constexpr (Shapes::WarpTile::kSize == 32) {
      bool wide = false;
      if (const cudaError_t st = runs_32_row_warps<Traits>(&wide); st != cudaSuccess) return st;
      if (!wide) {
        using Narrow = PortableFwdTraitsFor<kDType, kHeadDim, kRank,
                                            Tiles<typename Shapes::QTile, WarpBox<kRank, 16>, typename Shapes::KVTile>>;
        return launch_fwd_kernel<Narrow>(fused_fwd_kernel<Narrow>, pr, args, stream);
      }
    }
    return launch_fwd_kernel<Traits>(fused_fwd_kernel<Traits>, pr, args, stream);
  });
}

#define JNA_FUSED_FWD_INSTANTIATE(DT, D)                                                                 \
  template cudaError_t run_fwd<DT, D, 1>(const geo::Problem&, const FwdArgs&, cudaStream_t);             \
  template cudaError_t run_fwd<DT, D, 2>(const geo::Problem&, const FwdArgs&, cudaStream_t);             \
  template cudaError_t run_fwd<DT, D, 3>(const geo::Problem&, const FwdArgs&, cudaStream_t);

}  // namespace fused
}  // namespace jax_na
