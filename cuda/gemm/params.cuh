// Kernel parameters of the GEMM-based unfused kernels (passed by value as __grid_constant__).
#pragma once

#include <cstdint>

#include "fused/tile_grid.h"
#include "geometry/window.cuh"

namespace jax_na {
namespace gemm {

struct GemmParams {
  geo::Problem pr;
  const void* a = nullptr;     // query-side rows [B, N, H, E]: PN's left operand, IN's right operand
  const void* b = nullptr;     // key-side rows [B, N, Hkv, E]: PN's keys, NN's values
  const void* attn = nullptr;  // weights [B, N, H, W]: NN and IN
  const void* rpb = nullptr;   // PN scores: [H, 2k0-1, 2k1-1, 2k2-1] or null
  void* out = nullptr;         // PN: weights [B, N, H, W]; NN: [B, N, H, E]; IN: [B, N, Hkv, E]
  float alpha = 1.f;
  int32_t masked_neg_inf = 0;  // PN: masked window entries are -inf (scores) or 0 (raw products)
  int32_t stage_weights = 0;   // NN: the CTA's weight rows are copied to shared memory first
  int32_t q_tiles[3] = {1, 1, 1};   // PN, NN: Q tiles per axis (over the longest dilation group)
  fused::KVTileGrid kv_grid;         // IN: KV tiles per axis, raster order
  int32_t n_kv_ctas = 0;            // IN: CTAs of window keys (all of them: no additional keys)
  // Window index w = sum_a (key_a - start_a) w_stride[a]; bias index sum_a (key_a - query_a + k_a - 1)
  // rpb_stride[a] (SEMANTICS.md: row-major over the window axes and over the bias axes).
  int32_t w_stride[3] = {0, 0, 0};
  int32_t rpb_stride[3] = {0, 0, 0};
};

}  // namespace gemm
}  // namespace jax_na
