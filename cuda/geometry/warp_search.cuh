// The window searches of window.cuh run by a whole warp (device code only): each round every lane
// probes the last position of its 32nd of the range and the warp keeps the first chunk whose probe
// holds, so a group of L positions takes ceil(log32 L) rounds of one predicate each instead of
// log2 L dependent ones (a 32768-position group: 3 rounds instead of 15). The key-stationary
// kernels' schedule (four such searches per axis) ran on one thread while the CTA waited at a
// barrier: ~12% of the dK/dV kernel's time on a 1-D problem (ncu, H200, session 32).
#pragma once

#include <cstdint>

#include "geometry/window.cuh"

namespace jax_na {
namespace geo {

// Every lane of the warp calls it with the same range and predicate (ballots over the full warp)
// and gets the same result: the first position of [lo, hi) where pred holds, or hi.
struct WarpSearch {
  int lane;
  template <class Pred>
  __device__ __forceinline__ int32_t operator()(int32_t lo, int32_t hi, Pred pred) const {
    // Invariant: the answer lies in [lo, hi] (hi: pred holds there, or the end of the range).
    while (lo < hi) {
      const int64_t step = (static_cast<int64_t>(hi) - lo + 31) / 32;
      const int64_t first = lo + lane * step;  // this lane's chunk [first, min(first + step, hi))
      const int64_t last = (first + step < hi ? first + step : hi) - 1;
      const bool holds = first >= hi || pred(static_cast<int32_t>(last));  // empty chunks: past the answer
      const unsigned ballot = __ballot_sync(0xffffffffu, holds);
      if (ballot == 0u) return hi;  // every probe before the end fails: no position holds
      const int i = __ffs(ballot) - 1;
      const int64_t chunk = lo + i * step;
      if (chunk >= hi) return hi;  // the first holding chunk is empty: the answer is hi
      lo = static_cast<int32_t>(chunk);
      hi = static_cast<int32_t>((chunk + step < hi ? chunk + step : hi) - 1);  // its last position holds
    }
    return lo;
  }
};

}  // namespace geo
}  // namespace jax_na
