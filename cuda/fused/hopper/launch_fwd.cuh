// Host launch of one Hopper fused forward instantiation (included by hopper/fwd_<dtype>_hd<D>.cu only).
#pragma once

#include "fused/hopper/kernel_traits.cuh"
#include "fused/hopper/mainloop_fwd.cuh"
#include "fused/launch_fwd.cuh"

namespace jax_na {
namespace fused {

// One tile configuration (HopperFwdTiles<kRank>::At<kConfig>).
template <DType kDType, int kHeadDim, int kRank, int kConfig>
cudaError_t run_fwd_sm90_tiles(const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream) {
  using Traits = HopperFwdTraits<kDType, kHeadDim, kRank, typename HopperFwdTiles<kRank>::template At<kConfig>>;
  if (pr.B == 0 || pr.N == 0) return cudaSuccess;
  HopperFwdParams hp{};
  dim3 grid;
  if (!fwd_kernel_params<Traits>(pr, args, &hp.base, &grid)) return cudaErrorInvalidValue;
  // Persistent CTAs, one per SM (the smem allows no more), over the one-tile-per-CTA grid's tiles.
  hp.tiles.x = static_cast<int32_t>(grid.x);
  hp.tiles.heads = static_cast<int32_t>(grid.y);
  hp.tiles.total = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  unsigned ctas = 0;
  if (cudaError_t st = persistent_ctas(hp.tiles.total, &ctas); st != cudaSuccess) return st;
  grid = dim3(ctas);
  // The counter is an int32: past its range (no memory holds such a q) the CTAs stride instead.
  hp.tile_counter = hp.tiles.total <= std::numeric_limits<int32_t>::max() ? args.tile_counter : nullptr;
  hp.use_tma = encode_kv_tensor_maps<Traits>(pr, args.k, args.v, &hp.maps);
#if !defined(JNA_SM90_Q_GATHER)  // experiment knob: Q by cp.async gathers as before
  hp.use_tma_q = hp.use_tma && encode_q_tensor_map<Traits>(pr, args.q, &hp.q_map);
#endif
#if defined(JNA_FWD_TRACE)
  hp.trace = fwd_trace_target();
#endif
  return launch_fwd_grid<Traits>(fused_fwd_sm90_kernel<Traits>, hp, grid, stream);
}

// args.tiles_sm90 picks the configuration (cudaErrorInvalidValue for one that is not compiled).
template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_fwd_sm90(const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream) {
  return with_tile_config<HopperFwdTiles<kRank>>(args.tiles_sm90, [&](auto config) {
    return run_fwd_sm90_tiles<kDType, kHeadDim, kRank, decltype(config)::value>(pr, args, stream);
  });
}

#define JNA_FUSED_FWD_SM90_INSTANTIATE(DT, D)                                                            \
  template cudaError_t run_fwd_sm90<DT, D, 1>(const geo::Problem&, const FwdArgs&, cudaStream_t);        \
  template cudaError_t run_fwd_sm90<DT, D, 2>(const geo::Problem&, const FwdArgs&, cudaStream_t);        \
  template cudaError_t run_fwd_sm90<DT, D, 3>(const geo::Problem&, const FwdArgs&, cudaStream_t);

}  // namespace fused
}  // namespace jax_na
