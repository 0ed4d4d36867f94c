// The grid of a key-stationary kernel (fused dK/dV, gemm IN): its key tiles and their order. Plain
// data for the kernels' parameters; tile_scheduler.cuh decodes it (KVScheduler) and picks the
// order (kv_tile_grid).
#pragma once

#include <cstdint>

namespace jax_na {
namespace fused {

// Window CTA x = G T + sum_a t_a stride[a], with t_a the tile on axis a, T the tiles of a dilation
// group and G the group. The strides are a mixed radix over the axes in some order.
struct KVTileGrid {
  int32_t tiles[3] = {1, 1, 1};   // tiles per axis over the longest dilation group
  int32_t stride[3] = {1, 1, 1};  // the axis of stride 1 runs fastest
};

}  // namespace fused
}  // namespace jax_na
