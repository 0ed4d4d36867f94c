// Where a key falls in a query's window: the index of the window entry (SEMANTICS.md: row-major over
// the window axes, w_a = key position - window start) from the window interval the shared geometry
// (geometry/window.cuh) gave the query, or -1 when the key is outside it.
#pragma once

#include <cstdint>

namespace jax_na {
namespace gemm {

// kp: key position per axis (group positions); win[a] = [start, end) of the query on axis a.
template <int kRank>
__device__ __forceinline__ int32_t window_entry(const int32_t (&kp)[3], const int2 (&win)[3],
                                                const int32_t (&w_stride)[3]) {
  int32_t w = 0;
  bool inside = true;
#pragma unroll
  for (int a = 0; a < kRank; ++a) {
    inside = inside && win[a].x <= kp[a] && kp[a] < win[a].y;
    w += (kp[a] - win[a].x) * w_stride[a];
  }
  return inside ? w : -1;
}

}  // namespace gemm
}  // namespace jax_na
