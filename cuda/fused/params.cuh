// Kernel parameters of the fused kernels (passed by value as __grid_constant__).
#pragma once

#include <cuda.h>

#include <cstdint>

#include "fused/tile_grid.h"
#include "fused/trace.cuh"
#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

struct FwdKernelParams {
  geo::Problem pr;
  const void* q;
  const void* k;
  const void* v;
  const void* add_k;
  const void* add_v;
  void* out;
  float* lse;
  float scale;         // natural-log domain (lse)
  float scale_log2;    // scale * log2(e) (exp2 domain)
  int32_t q_tiles[3];  // Q tiles per axis: ceil(ceil(L / d) / QTile extent)
#if defined(JNA_FWD_TRACE)
  FwdTrace trace;  // the portable forward's phase timestamps (experiments: trace.cuh)
#endif
};

// TMA tensor maps (hopper/tma.cuh) of k and v over a query-stationary kernel's KV-tile boxes, and
// of q and d_out over the key-stationary backward's Q-tile boxes.
struct KVTensorMaps {
  CUtensorMap k;
  CUtensorMap v;
};
struct QTensorMaps {
  CUtensorMap q;
  CUtensorMap d_out;
};

struct BwdKernelParams {
  // The Hopper backward kernels' tiles by TMA: the dQ kernel's K/V window tiles where kv_tma, the
  // dK/dV kernel's Q/dO tiles where q_tma (unused otherwise).
  KVTensorMaps kv_maps;
  QTensorMaps q_maps;
  geo::Problem pr;
  const void* q;
  const void* k;
  const void* v;
  const void* add_k;
  const void* add_v;
  const void* d_out;
  const float* lse;    // [B, N, H]
  const float* delta;  // [B, N, H]: rowsum(dO * O) - d_lse (written by the preprocessing kernel)
  void* dq;
  void* dk;
  void* dv;
  void* d_add_k;
  void* d_add_v;
  float* dq_accum;     // head-major rows [B, H, N] of D + kDqAccumPad floats (fused_bwd.h), their D
                       // columns zeroed by the preprocessing kernel: dQ / scale where the
                       // warp-specialized kernel computes dQ (DkdvLaunch::kAddsDq), else null
  float scale;
  float scale_log2;
  int32_t q_tiles[3];      // dQ kernel: Q tiles per axis (as the forward)
  KVTileGrid kv_grid;      // dK/dV kernel: KV tiles per axis over the longest group, their order
  int32_t n_window_ctas;   // dK/dV kernel: CTAs of window keys (then the additional-keys CTAs)
  int32_t kv_tma;          // 1: kv_maps are set (Hopper dQ kernel, no dilation); 0: gathers
  int32_t q_tma;           // 1: q_maps are set (Hopper dK/dV kernel, no dilation); 0: gathers
};

}  // namespace fused
}  // namespace jax_na
