// Host launch of one Hopper fused backward instantiation (included by hopper/bwd_<dtype>_hd<D>.cu only):
// the portable backward's kernels (delta, query-stationary dQ, key-stationary dK/dV) on warpgroup
// MMAs, with tiles sized for them; in the non-deterministic mode the warp-specialized dK/dV/dQ kernel
// instead of the last two.
#pragma once

#include "fused/hopper/gemm.cuh"
#include "fused/hopper/mainloop_bwd.cuh"
#include "fused/launch_bwd.cuh"

namespace jax_na {
namespace fused {

// The tile configuration args.tiles_sm90 asks for (HopperBwdTiles): dQ on Q tiles of kHopperDqBlockM
// queries (64: one warpgroup) over 64-key tiles (wgmma N = 64 for S and dP); dK/dV on kHopperBwdBlockN
// keys (64: one warpgroup), Q tiles of 64 queries (dK + dV + S^T + dP^T: 192 accumulator registers per
// thread at D = 128); two CTAs per SM (tile_shapes.cuh). With a dq_accum buffer (non-deterministic
// mode) the dK/dV kernel adds dQ there too, and the dQ kernel, which recomputes S and dP, does not run.
// The warp-specialized dK/dV/dQ kernel (hopper/mainloop_bwd.cuh) of the non-deterministic mode.
template <class Traits>
struct Sm90DkdvDqLaunch {
  static auto kernel() { return fused_bwd_sm90_kernel<Traits>; }
  static constexpr int kThreads = Traits::kLaunchThreads;
  static constexpr int kSmem = BwdSm90Smem<Traits>::kBytes;
  static constexpr bool kAddsDq = true;
  // One CTA per SM: the key tiles' order keeps the resident CTAs' queries few (kv_tile_grid). The
  // deterministic kernels keep raster order (not measured with another).
  static constexpr int kResidentPerSm = 1;
};

// The tile configuration args.tiles_sm90 asks for. Deterministic (no dq_accum): HopperBwdTiles, dQ on
// Q tiles of kHopperDqBlockM queries (64: one warpgroup) over 64-key tiles (wgmma N = 64 for S and dP),
// dK/dV on kHopperBwdBlockN keys (64: one warpgroup), Q tiles of 64 queries (dK + dV + S^T + dP^T:
// 192 accumulator registers per thread at D = 128); two CTAs per SM (tile_shapes.cuh). With a
// dq_accum buffer (non-deterministic mode): HopperBwdWsTiles, one warp-specialized kernel of 128-key
// CTAs that adds dQ there too, and no dQ kernel recomputing S and dP (its traits only size the maps
// and grids launch_bwd_kernels computes for every mode).
template <DType kDType, int kHeadDim, int kRank, class Shapes, class KVTraits, class Dkdv>
cudaError_t launch_bwd_sm90_config(const geo::Problem& pr, const BwdArgs& args, cudaStream_t stream) {
  using DqTraits = FwdTraits<kDType, kHeadDim, kRank, kHopperDqBlockN, kHopperDqBlockM / 16, 2, typename Shapes::DqTiles>;
  return launch_bwd_kernels<DqTraits, KVTraits, Sm90Gemm<DqTraits>, Sm90Gemm<KVTraits>, Dkdv>(pr, args, stream);
}

template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_bwd_sm90(const geo::Problem& pr, const BwdArgs& args, cudaStream_t stream) {
  if (args.dq_accum != nullptr) {
    using Configs = HopperBwdWsTiles<kRank>;
    return with_tile_config<Configs>(args.tiles_sm90, [&](auto config) {
      using Shapes = typename Configs::template At<decltype(config)::value>;
      using KVTraits = HopperBwdTraits<BwdKVTraits<kDType, kHeadDim, kRank, 8, 128, 64, Shapes>>;
      return launch_bwd_sm90_config<kDType, kHeadDim, kRank, Shapes, KVTraits, Sm90DkdvDqLaunch<KVTraits>>(pr, args,
                                                                                                        stream);
    });
  }
  using Configs = HopperBwdTiles<kRank>;
  return with_tile_config<Configs>(args.tiles_sm90, [&](auto config) {
    using Shapes = typename Configs::template At<decltype(config)::value>;
    using KVTraits = BwdKVTraits<kDType, kHeadDim, kRank, kHopperBwdBlockN / 16, kHopperBwdBlockN, 64, Shapes>;
    return launch_bwd_sm90_config<kDType, kHeadDim, kRank, Shapes, KVTraits, DkdvLaunch<KVTraits, Sm90Gemm<KVTraits>>>(
        pr, args, stream);
  });
}

#define JNA_FUSED_BWD_SM90_INSTANTIATE(DT, D)                                                            \
  template cudaError_t run_bwd_sm90<DT, D, 1>(const geo::Problem&, const BwdArgs&, cudaStream_t);        \
  template cudaError_t run_bwd_sm90<DT, D, 2>(const geo::Problem&, const BwdArgs&, cudaStream_t);        \
  template cudaError_t run_bwd_sm90<DT, D, 3>(const geo::Problem&, const BwdArgs&, cudaStream_t);

}  // namespace fused
}  // namespace jax_na
