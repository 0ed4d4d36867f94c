// The grid of a key-stationary kernel (fused dK/dV, gemm IN): its key tiles and the order its CTAs
// take them in. Plain C++ (host and device; cuda/fused/test_tile_grid.cc checks it on the host):
// KVScheduler (tile_scheduler.cuh) decodes a CTA index with it, kv_tile_grid there fills it.
#pragma once

#include <algorithm>
#include <cstdint>

#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

// Window CTA x = G T + sum_a t_a stride[a], with t_a the tile on axis a, T the tiles of a dilation
// group and G the group. The strides are a mixed radix over the axes in some order.
struct KVTileGrid {
  int32_t tiles[3] = {1, 1, 1};   // tiles per axis over the longest dilation group
  int32_t stride[3] = {1, 1, 1};  // the axis of stride 1 runs fastest

  JNA_HD int32_t tile(int32_t x, int a) const { return x / stride[a] % tiles[a]; }
  JNA_HD int32_t group(int32_t x) const { return x / (tiles[0] * tiles[1] * tiles[2]); }
};

// The query positions (of one head and dilation group) whose windows meet the keys of the first
// `resident` CTAs of a grid whose axes run in `order` (fastest first): those CTAs cover whole lines
// of the faster axes and part of the slowest one they reach, and each axis' keys widen by the window
// (k - 1, either side's share), up to the group's length.
inline double resident_query_span(const geo::Problem& pr, const int32_t tiles[3], const int32_t extent[3],
                                  const int order[3], int64_t resident) {
  double span = 1.0;
  int64_t left = resident < 1 ? 1 : resident;
  for (int i = 0; i < 3; ++i) {
    const int a = order[i];
    const int64_t n = std::min<int64_t>(left, tiles[a]);
    left = (left + tiles[a] - 1) / tiles[a];
    const int64_t group_len = (pr.axis[a].L + pr.axis[a].d - 1) / pr.axis[a].d;
    span *= static_cast<double>(std::min<int64_t>(n * extent[a] + pr.axis[a].k - 1, group_len));
  }
  return span;
}

// Sets grid->stride for its tiles (of `extent` keys per axis). `resident` CTAs (SMs times CTAs per SM)
// run at once and share L2: the queries of their inverse neighbourhoods (Q, dO and, in the
// warp-specialized backward, dQ's float32 sums) are what they read and write. Of the axis orders,
// the one whose resident CTAs meet the fewest query positions (resident_query_span) replaces raster
// order (last axis fastest) where it needs at most 90% of raster's. On p8 (key tiles 2x8x8, 132
// SMs) axis 0 fastest spans 30x48x39 query positions against raster's 23x48x80, and the
// warp-specialized backward took 8% less time (p9: 10%; H100, cuda/fused/NOTES.md session 48); where
// the spans tie (p6) raster order stays. resident = 0: raster.
inline void order_kv_tiles(const geo::Problem& pr, const int32_t extent[3], int64_t resident, KVTileGrid* grid) {
  int best[3] = {2, 1, 0};
  if (resident > 0) {
    double best_span = 0.9 * resident_query_span(pr, grid->tiles, extent, best, resident);
    int order[3] = {0, 1, 2};
    do {
      const double span = resident_query_span(pr, grid->tiles, extent, order, resident);
      if (span < best_span) {
        best_span = span;
        std::copy(order, order + 3, best);
      }
    } while (std::next_permutation(order, order + 3));
  }
  int32_t stride = 1;
  for (int i = 0; i < 3; ++i) {
    grid->stride[best[i]] = stride;
    stride *= grid->tiles[best[i]];
  }
}

}  // namespace fused
}  // namespace jax_na
