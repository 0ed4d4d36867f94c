// Host launch of one Hopper fused backward instantiation (included by hopper/bwd_<dtype>_hd<D>.cu only):
// the portable backward's kernels (delta, query-stationary dQ, key-stationary dK/dV) on warpgroup
// MMAs, with tiles sized for them.
#pragma once

#include <type_traits>

#include "fused/hopper/gemm.cuh"
#include "fused/launch_bwd.cuh"

namespace jax_na {
namespace fused {

// Experiment knob (standalone timing builds): -DJNA_BWD_EXPERIMENT_DQ64 gives each dQ CTA half the Q
// tile (axis 0 halved) on one warpgroup, two CTAs per SM, whose steps no longer meet at a shared barrier.
#if defined(JNA_BWD_EXPERIMENT_DQ64)
template <class T>
using HopperDqTiles = Tiles<Box<T::QTile::extent(0) / 2, T::QTile::extent(1), T::QTile::extent(2)>,
                            typename T::WarpTile, typename T::KVTile>;
constexpr int kHopperDqWarps = 4;
#else
template <class T>
using HopperDqTiles = T;
constexpr int kHopperDqWarps = 8;
#endif

// The tile configuration args.tiles_sm90 asks for (HopperBwdTiles): dQ on 128-query tiles on two
// warpgroups (64 rows each) over 64-key tiles (wgmma N = 64 for S and dP); dK/dV: 128 keys on two
// warpgroups, Q tiles of 64 queries (dK + dV + S^T + dP^T: 192 accumulator registers per thread at
// D = 128). With a dq_accum buffer (non-deterministic mode) the dK/dV kernel adds dQ there too, and
// the dQ kernel, which recomputes S and dP, does not run.
template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_bwd_sm90(const geo::Problem& pr, const BwdArgs& args, cudaStream_t stream) {
  using Configs = HopperBwdTiles<kRank>;
  return with_tile_config<Configs>(args.tiles_sm90, [&](auto config) {
    using Shapes = typename Configs::template At<decltype(config)::value>;
    using DqTraits =
        FwdTraits<kDType, kHeadDim, kRank, kHopperDqBlockN, kHopperDqWarps, 2, HopperDqTiles<typename Shapes::DqTiles>>;
    auto launch = [&](auto dq_in_kernel) {
      using KVTraits = BwdKVTraits<kDType, kHeadDim, kRank, kHopperBwdBlockN / 16, kHopperBwdBlockN, 64,
                                   decltype(dq_in_kernel)::value, Shapes>;
      return launch_bwd_kernels<DqTraits, KVTraits, Sm90Gemm<DqTraits>, Sm90Gemm<KVTraits>>(pr, args, stream);
    };
    return args.dq_accum != nullptr ? launch(std::true_type{}) : launch(std::false_type{});
  });
}

#define JNA_FUSED_BWD_SM90_INSTANTIATE(DT, D)                                                            \
  template cudaError_t run_bwd_sm90<DT, D, 1>(const geo::Problem&, const BwdArgs&, cudaStream_t);        \
  template cudaError_t run_bwd_sm90<DT, D, 2>(const geo::Problem&, const BwdArgs&, cudaStream_t);        \
  template cudaError_t run_bwd_sm90<DT, D, 3>(const geo::Problem&, const BwdArgs&, cudaStream_t);

}  // namespace fused
}  // namespace jax_na
