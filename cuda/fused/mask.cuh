// Masking of a score tile: each query row's window (from geometry/window.cuh) against the keys of a
// KV tile, or the valid count of an additional-keys tile.
//
// Row r of the CTA's Q tile maps to query coordinates as follows (matching the SM80 TiledMMA with
// 4 warps along M: warp w holds rows 16w..16w+15 and 64+16w..64+16w+15): w = (r / 16) % 4 picks the
// warp's sub-box in the Q tile, i = (r / 64) * 16 + r % 16 the query inside the warp's sub-box.
// Score element (row, col) of a KV tile: col = 8 * ni + 2 * (lane % 4) + i0 is a row-major index into
// the columns' box (the KVTile, or a half of it: power-of-two extents, so coordinates are bit fields
// of col); per row the thread builds one word of its columns inside the window (column_mask.cuh) and
// tests a compile-time bit per score.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "fused/column_mask.cuh"
#include "fused/epilogue.cuh"
#include "fused/tile_scheduler.cuh"
#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

// Tables with one entry per axis and in-tile coordinate of a box: axis a's entries start here.
template <class Box>
__host__ __device__ constexpr int box_axis_first(int a) {
  return a == 0 ? 0 : (a == 1 ? Box::extent(0) : Box::extent(0) + Box::extent(1));
}

// The windows [start, end) of a query-stationary CTA's rows, in smem: a query's window on axis a
// depends only on its position on that axis, so the table holds one int2 per axis and in-tile
// coordinate (Traits::kWinEntries: 16 in 3-D instead of 128 x 3 per row), and row r's window on axis
// a is the entry of its coordinate q_row_coord(r, a).
template <class Traits>
struct RowWindowTable {
  using QTile = typename Traits::QTile;
  __host__ __device__ static constexpr int first(int a) { return box_axis_first<QTile>(a); }
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

// Key-stationary kernels that need each query's window (the gemm backend's inverse-neighbourhood
// kernel): the windows of the queries of the Q tile at org (group positions), int2 (start, end) per
// query and axis into win; queries outside the group get an empty window. Called by the first
// kBlockM threads (one query each).
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

// Key-stationary kernels: per key row, the queries whose windows contain it. Windows start and end
// non-decreasing in the query position, so on each axis these queries are one interval of positions
// (geo::inverse_range), which depends only on the key's coordinate on that axis: the table holds one
// int2 (begin, end) per axis and in-tile coordinate of the CTA's K/V tile, computed once per CTA
// (keys past the group's end get an empty interval).
template <class Traits>
struct InverseRangeTable {
  using KVTile = typename Traits::KVTile;
  static constexpr int kEntries = Traits::kInvEntries;
  __host__ __device__ static constexpr int first(int a) { return box_axis_first<KVTile>(a); }
  // Fills the table (the first kEntries threads, one entry each; binary searches inside the CTA's
  // query ranges, geo::inverse_range_within: a 1-D 32768-key group took 2 x 15 dependent steps per
  // entry, its 128-key tile's ranges take 2 x 7). Keys past the group get empty ranges.
  // Not inlined: inlined, its divergent search loops made ptxas serialize the wgmmas of the
  // dQ-adding Hopper kernel (C7520); a call once per CTA costs nothing.
  __device__ __noinline__ static void store(const geo::Problem& pr, const KVSchedule& ks, int2* s_inv, int tid) {
    static_assert(Traits::kNThreads >= kEntries, "one thread per entry");
    if (tid >= kEntries) return;
    int a = 0;
#pragma unroll
    for (int b = 1; b < 3; ++b) a += tid >= first(b);
    if (a >= Traits::kRank) return;
    const int32_t j = ks.k0[a] + (tid - first(a)), Lg = ks.Lg[a];
    geo::Range q{Lg, Lg};
    if (j < Lg) {
      // The CTA's queries on this axis: [q_begin, q_begin + q_tiles * extent) holds inverse_range_any.
      const int64_t tiles_end =
          static_cast<int64_t>(ks.q_begin[a]) + int64_t{ks.q_tiles[a]} * Traits::QTile::extent(a);
      const int32_t any_end_bound = tiles_end < Lg ? static_cast<int32_t>(tiles_end) : Lg;
      q = geo::inverse_range_within(pr.axis[a], j, Lg, ks.q_begin[a], any_end_bound, ks.full_lo[a]);
    }
    s_inv[tid] = make_int2(q.begin, q.end);
  }
  // Key row r's queries on axis a.
  __device__ __forceinline__ static int2 at(const int2* s_inv, int a, int r) {
    return s_inv[first(a) + KVTile::coord(r, a)];
  }
};

// Key-stationary kernels: the Q tiles each MMA unit (a warp or a warpgroup: kUnits of them, owning
// consecutive key rows, i.e. a sub-box of the K/V tile each) has to compute products for. Per unit and axis, the
// queries whose windows hold one of its keys form one interval (geo::inverse_range_any_in_group; empty for a
// unit whose keys all lie past the group's end), and a unit skips the Q tiles outside its intervals:
// the CTA walks the Q tiles its whole K/V tile meets, a unit's keys meet fewer where windows are
// short next to the tile (tools/tile_work.py counts the pairs).
template <class Traits, int kUnits>
struct UnitQueryIntervals {
  using KVTile = typename Traits::KVTile;
  using QTile = typename Traits::QTile;
  static constexpr int kRows = Traits::kBlockN / kUnits;  // key rows per unit
  static constexpr int kEntries = 3 * kUnits;
  static_assert(kUnits <= Traits::kNWarps && kRows * kUnits == Traits::kBlockN, "units of key rows");
  static_assert((kRows & (kRows - 1)) == 0, "a unit's rows are a sub-box of the K/V tile");
  // Fills the unit entries (the first kEntries threads, one each). Not inlined, as the table above.
  __device__ __noinline__ static void store(const geo::Problem& pr, const KVSchedule& ks, int2* s_unit, int tid) {
    if (tid >= kEntries) return;
    const int u = tid / 3, a = tid % 3;
    int2 q = make_int2(0, 0);  // empty: meets() is false on it for any org >= 0
    if (a < Traits::kRank) {
      // The unit's keys on axis a: an aligned power-of-two run of row-major rows covers one
      // interval of coordinates per axis.
      const geo::Range r = geo::inverse_range_any_in_group(pr.axis[a], ks.k0[a] + KVTile::coord(u * kRows, a),
                                                           ks.k0[a] + KVTile::coord(u * kRows + kRows - 1, a),
                                                           ks.Lg[a]);
      q = make_int2(r.begin, r.end);
    }
    s_unit[tid] = q;
  }
  // Whether unit u's keys meet the Q tile at org (group positions). Not warp-uniform to ptxas: a
  // caller steering wgmma with it passes it through a lane-0 shuffle.
  __device__ __forceinline__ static bool meets(const int2* s_unit, int u, const int32_t org[3]) {
    bool m = true;
#pragma unroll
    for (int a = 0; a < Traits::kRank; ++a) {
      const int2 q = s_unit[3 * u + a];
      m = m && org[a] < q.y && org[a] + QTile::extent(a) > q.x;
    }
    return m;
  }
};

// Sets to -inf the scores whose column lies outside its row's interval on some axis: columns are
// the row-major indices of ColBox, interval(row, a) is an int2 (lo, hi) relative to the box origin.
// Per row one word of the thread's columns inside the intervals (column_mask.cuh), then one bit test
// per score.
template <class ColBox, int kRank, int kNWarps, class TensorS, class RowInterval>
__device__ __forceinline__ void mask_outside_intervals(TensorS& s_rc, int warp, int lane, const RowInterval& interval) {
  constexpr int kRows = decltype(cute::size<0>(s_rc))::value;
  constexpr int kCols = decltype(cute::size<1>(s_rc))::value;
  static_assert(kCols * 4 == ColBox::kSize, "a thread holds a quarter of a row's columns");
#if defined(JNA_FWD_EXPERIMENT_NO_MASK)  // timing experiment: what the masks cost (wrong results)
  return;
#endif
  const int lane_col = 2 * (lane & 3);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = acc_row<kNWarps>(r, warp, lane);
    const uint32_t inside = window_column_bits<ColBox, kRank, kCols>([&](int a) { return interval(row, a); }, lane_col);
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (!((inside >> c) & 1u)) s_rc(r, c) = -INFINITY;
  }
}

// Window tile of a query-stationary kernel (rows: the CTA's queries, windows in s_win; columns: the
// keys of the K/V tile at org, group positions; ColBox: the tile's box, or a half of it whose origin
// org is).
template <class Traits, class ColBox = typename Traits::KVTile, class TensorS>
__device__ __forceinline__ void mask_window_tile(TensorS& s_rc, const int2* s_win, const int32_t org[3],
                                                 int warp, int lane) {
  mask_outside_intervals<ColBox, Traits::kRank, Traits::kNWarps>(
      s_rc, warp, lane, [&](int row, int a) {
        const int2 w = RowWindowTable<Traits>::at(s_win, a, row);
        return make_int2(w.x - org[a], w.y - org[a]);
      });
}

// Additional-keys tile of a query-stationary kernel: columns >= n_valid are masked.
template <class Traits, class TensorS>
__device__ __forceinline__ void mask_count_tile(TensorS& s_rc, int32_t n_valid, int warp, int lane) {
  mask_outside_intervals<Box<Traits::kBlockN, 1, 1>, 1, Traits::kNWarps>(
      s_rc, warp, lane, [&](int, int) { return make_int2(0, n_valid); });
}

// Key-stationary tile (rows: keys of the CTA's K/V tile, their query intervals in s_inv; columns:
// the queries of the Q tile at org, group positions): masks the (key, query) pairs where the key is
// outside the query's window, i.e. the query outside the key's interval on some axis.
template <class Traits, class TensorS>
__device__ __forceinline__ void mask_inverse_tile(TensorS& s_rc, const int2* s_inv, const int32_t org[3], int warp,
                                                  int lane) {
  mask_outside_intervals<typename Traits::QTile, Traits::kRank, Traits::kNWarps>(
      s_rc, warp, lane, [&](int row, int a) {
        const int2 q = InverseRangeTable<Traits>::at(s_inv, a, row);
        return make_int2(q.x - org[a], q.y - org[a]);
      });
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
    mask_count_tile<Traits>(
        s_rc, static_cast<int32_t>(pr.Na - static_cast<int64_t>(n - n_window_tiles) * Traits::kBlockN), warp, lane);
}

}  // namespace fused
}  // namespace jax_na
