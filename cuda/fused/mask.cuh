// Masking of a score tile: each query row's window (from geometry/window.cuh) against the keys of a
// KV tile, or the valid count of an additional-keys tile.
//
// Row r of the CTA's Q tile maps to query coordinates as follows (matching the SM80 TiledMMA with
// 4 warps along M: warp w holds rows 16w..16w+15 and 64+16w..64+16w+15): w = (r / 16) % 4 picks the
// warp's sub-box in the Q tile, i = (r / 64) * 16 + r % 16 the query inside the warp's sub-box.
// Score element (row, col) of a KV tile: col = 8 * ni + 2 * (lane % 4) + i0 is a row-major index into
// the KVTile box; because the extents are powers of two the lane part (bits 1-2) and the register part
// (bits 0, 3-5) of col add without carry on every axis, so per row we build one bit word per axis
// (the window interval relative to the tile origin), pre-shift it by the lane part, and test
// compile-time bit positions per element.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fused/epilogue.cuh"
#include "fused/tile_scheduler.cuh"
#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

// The windows [start, end) of a query-stationary CTA's rows, in smem: a query's window on axis a
// depends only on its position on that axis, so the table holds one int2 per axis and in-tile
// coordinate (Traits::kWinEntries: 16 in 3-D instead of 128 x 3 per row), and row r's window on axis
// a is the entry of its coordinate q_row_coord(r, a).
template <class Traits>
struct RowWindowTable {
  using QTile = typename Traits::QTile;
  __host__ __device__ static constexpr int first(int a) {
    return a == 0 ? 0 : (a == 1 ? QTile::extent(0) : QTile::extent(0) + QTile::extent(1));
  }
  // Fills the table (the first kWinEntries threads, one entry each). Positions past the group's end
  // take the window of the last query (never stored, never empty).
  __device__ __forceinline__ static void store(const geo::Problem& pr, const CtaSchedule& cs, int2* s_win, int tid) {
    static_assert(Traits::kNThreads >= Traits::kWinEntries, "one thread per entry");
    if (tid >= Traits::kWinEntries) return;
    int a = 0;
#pragma unroll
    for (int b = 1; b < Traits::kRank; ++b) a += tid >= first(b);
    const int32_t pos = geo::imin(cs.q0[a] + (tid - first(a)), cs.Lg[a] - 1);
    const geo::Axis& ax = pr.axis[a];
    const int32_t s = geo::window_start(ax, pos, cs.Lg[a]);
    s_win[tid] = make_int2(s, geo::window_end(ax, pos, cs.Lg[a], s));
  }
  // Row r's window on axis a.
  __device__ __forceinline__ static int2 at(const int2* s_win, int a, int r) {
    return s_win[first(a) + q_row_coord<Traits>(r, a)];
  }
};

// Key-stationary kernels: the windows of the queries of the Q tile at org (group positions), int2
// (start, end) per query and axis into win; queries outside the group get an empty window. Called by
// the first kBlockM threads (one query each).
template <class Traits>
__device__ __forceinline__ void store_column_windows(const geo::Problem& pr, const KVSchedule& ks, const int32_t org[3],
                                                     int2* win, int tid) {
#pragma unroll
  for (int a = 0; a < Traits::kRank; ++a) {
    const int32_t pos = org[a] + Traits::QTile::coord(tid, a);
    int2 w = make_int2(0, 0);
    if (pos < ks.Lg[a]) {
      const int32_t st = geo::window_start(pr.axis[a], pos, ks.Lg[a]);
      w = make_int2(st, geo::window_end(pr.axis[a], pos, ks.Lg[a], st));
    }
    win[a * Traits::kBlockM + tid] = w;
  }
}

// Bit word wide enough for every axis of a KV tile.
template <class KVTile>
using BitsT = std::conditional_t<(KVTile::extent(0) > 32 || KVTile::extent(1) > 32 || KVTile::extent(2) > 32),
                                 uint64_t, uint32_t>;

// Whether every axis of a KV tile fits one 64-bit word (else the mask compares coordinates).
template <class KVTile>
constexpr bool kFitsBitWord = KVTile::extent(0) <= 64 && KVTile::extent(1) <= 64 && KVTile::extent(2) <= 64;

// Bits [max(lo, 0), min(hi, k)) set (k <= width of T).
template <class T>
__device__ __forceinline__ T interval_bits(int32_t lo, int32_t hi, int32_t k) {
  constexpr int32_t kWidth = 8 * sizeof(T);
  const int32_t l = geo::imin(geo::imax(lo, 0), k);
  const int32_t u = geo::imin(geo::imax(hi, l), k);
  const T ones = ~T(0);
  const T upto_u = (u >= kWidth) ? ones : ((T(1) << u) - 1);
  const T upto_l = (l >= kWidth) ? ones : ((T(1) << l) - 1);
  return upto_u & ~upto_l;
}

// Sets masked scores of a window tile to -inf. s_rc: the score fragment viewed (rows, cols) with
// rows (i1, mi) and cols (i0, ni) (see softmax.cuh). org: tile origin (group positions).
template <class Traits, class TensorS>
__device__ __forceinline__ void mask_window_tile(TensorS& s_rc, const int2* s_win, const int32_t org[3],
                                                 int warp, int lane) {
  using KVTile = typename Traits::KVTile;
  constexpr int kRank = Traits::kRank;
  constexpr int kRows = decltype(cute::size<0>(s_rc))::value;
  constexpr int kCols = decltype(cute::size<1>(s_rc))::value;
  const int lane_col = 2 * (lane & 3);
  if constexpr (!kFitsBitWord<KVTile>) {
    // An axis wider than 64 keys (1-D tiles of 128): compare coordinates with the interval instead.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = acc_row<Traits::kNWarps>(r, warp, lane);
      int32_t lo[3], hi[3];
#pragma unroll
      for (int a = 0; a < kRank; ++a) {
        const int2 w = RowWindowTable<Traits>::at(s_win, a, row);
        lo[a] = w.x - org[a];
        hi[a] = w.y - org[a];
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int col = (c >> 1) * 8 + (c & 1) + lane_col;
        bool ok = true;
#pragma unroll
        for (int a = 0; a < kRank; ++a) {
          const int32_t x = KVTile::coord(col, a);
          ok = ok && lo[a] <= x && x < hi[a];
        }
        if (!ok) s_rc(r, c) = -INFINITY;
      }
    }
  } else {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = acc_row<Traits::kNWarps>(r, warp, lane);
      using T = BitsT<KVTile>;
      T bits[3];
#pragma unroll
      for (int a = 0; a < kRank; ++a) {
        const int2 w = RowWindowTable<Traits>::at(s_win, a, row);
        bits[a] = interval_bits<T>(w.x - org[a], w.y - org[a], KVTile::extent(a)) >> KVTile::coord(lane_col, a);
      }
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const int colc = (c >> 1) * 8 + (c & 1);  // register part of the column index
        bool ok = true;
#pragma unroll
        for (int a = 0; a < kRank; ++a) ok = ok && ((bits[a] >> KVTile::coord(colc, a)) & T(1));
        if (!ok) s_rc(r, c) = -INFINITY;
      }
    }
  }
}

// Additional-keys tile: columns >= n_valid are masked.
template <class TensorS>
__device__ __forceinline__ void mask_count_tile(TensorS& s_rc, int32_t n_valid, int lane) {
  constexpr int kRows = decltype(cute::size<0>(s_rc))::value;
  constexpr int kCols = decltype(cute::size<1>(s_rc))::value;
  const int lane_col = 2 * (lane & 3);
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int col = (c >> 1) * 8 + (c & 1) + lane_col;
    if (col >= n_valid) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) s_rc(r, c) = -INFINITY;
    }
  }
}

// Key-stationary tile (rows: keys of the KV tile at k0; columns: queries of a Q tile whose windows
// are in s_win, int2 (start, end) per column and axis): masks the (key, query) pairs where the key
// is outside the query's window.
template <class Traits, class TensorS>
__device__ __forceinline__ void mask_inverse_tile(TensorS& s_rc, const int2* s_win, const int32_t k0[3], int warp,
                                                  int lane) {
  using KVTile = typename Traits::KVTile;
  constexpr int kRank = Traits::kRank;
  constexpr int kRows = decltype(cute::size<0>(s_rc))::value;
  constexpr int kCols = decltype(cute::size<1>(s_rc))::value;
  int32_t kpos[kRows][3];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = acc_row<Traits::kNWarps>(r, warp, lane);
#pragma unroll
    for (int a = 0; a < kRank; ++a) kpos[r][a] = k0[a] + KVTile::coord(row, a);
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int col = acc_col(c, lane);
    int2 w[3];
#pragma unroll
    for (int a = 0; a < kRank; ++a) w[a] = s_win[a * Traits::kBlockM + col];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      bool ok = true;
#pragma unroll
      for (int a = 0; a < kRank; ++a) ok = ok && w[a].x <= kpos[r][a] && kpos[r][a] < w[a].y;
      if (!ok) s_rc(r, c) = -INFINITY;
    }
  }
}

// Masks score tile n of a query-stationary kernel (whose first n_window_tiles tiles are window
// tiles): window tiles by the rows' windows, additional-keys tiles by the count of valid keys.
template <class Traits, class TensorS>
__device__ __forceinline__ void mask_tile(TensorS& s_rc, const int2* s_win, const geo::Problem& pr,
                                          int32_t n_window_tiles, int32_t n, const int32_t org[3], int warp,
                                          int lane) {
  if (n < n_window_tiles)
    mask_window_tile<Traits>(s_rc, s_win, org, warp, lane);
  else
    mask_count_tile(s_rc, static_cast<int32_t>(pr.Na - static_cast<int64_t>(n - n_window_tiles) * Traits::kBlockN),
                    lane);
}

}  // namespace fused
}  // namespace jax_na
