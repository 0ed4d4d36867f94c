// Window geometry of neighborhood attention: the ONE C++ implementation (host and device).
//
// Mirrors jax_na/geometry.py and SEMANTICS.md exactly. Every kernel (naive, gemm, fused) and every
// host-side check uses these functions; never re-derive the window math elsewhere.
//
// Per axis (length L, kernel k, stride s, dilation d, causal):
//   token i  ->  dilation group g = i % d, position p = i / d inside the group,
//   group length Lg = L / d + 1 - ((g + (d - L % d)) / d).
//   The keys of query position p are the group positions [start(p), end(p)) (non-causal: exactly k),
//   key token index = g + d * pos.
// start(p) and end(p) are non-decreasing in p, so the queries whose window contains key position j
// (its inverse neighborhood) are one contiguous range of positions; inverse_range() finds it by
// searching over the same start/end functions (binary search, or a warp's 32-way search), so forward
// and inverse can never disagree.
//
// A problem has up to three spatial axes; missing axes are L=1, k=1, s=1, d=1, causal=0.
// Tensors are [B, X, Y, Z, heads, E] row-major: token t = (x * Y + y) * Z + z and the linear offset of
// (b, t, h, e) is ((b * N + t) * heads + h) * E + e, always in 64 bits.
// Window index w is row-major over the window axes: w = (w0 * k1 + w1) * k2 + w2 with
// w_a = key_position_a - start_a.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JNA_HD __host__ __device__ __forceinline__
#else
#define JNA_HD inline
#endif

namespace jax_na {
namespace geo {

constexpr int kMaxRank = 3;

JNA_HD int32_t imin(int32_t a, int32_t b) { return a < b ? a : b; }
JNA_HD int32_t imax(int32_t a, int32_t b) { return a > b ? a : b; }

// One spatial axis. Per-axis quantities fit in 32 bits (validated by the handlers).
struct Axis {
  int32_t L = 1;       // length
  int32_t k = 1;       // kernel size
  int32_t s = 1;       // stride
  int32_t d = 1;       // dilation
  int32_t causal = 0;  // 0 or 1
};

// Number of tokens of dilation group g.
JNA_HD int32_t group_length(const Axis& a, int32_t g) {
  return a.L / a.d + 1 - ((g + (a.d - a.L % a.d)) / a.d);
}

// First key position of the window of query position p (group of length Lg).
JNA_HD int32_t window_start(const Axis& a, int32_t p, int32_t Lg) {
  if (a.causal) {
    const int32_t leader = imin((p / a.s) * a.s + a.s - 1, Lg - 1);
    const int32_t wl = a.k / 2, wr = a.k / 2 + (a.k % 2) - 1;
    return imax(leader - wl - wr, 0);
  }
  const int32_t wl = a.k / 2, wr = a.k / 2 + (a.k % 2) - 1;
  const int32_t leader = imin((p / a.s) * a.s + a.s / 2, Lg - 1);
  int32_t start = imax(leader - wl, 0);
  if (leader + wr >= Lg) start += Lg - wr - leader - 1;
  return start;
}

// One past the last key position of the window of query position p, given its start.
JNA_HD int32_t window_end(const Axis& a, int32_t p, int32_t Lg, int32_t start) {
  return a.causal ? imin(p + 1, Lg) : start + a.k;
}

JNA_HD int32_t window_end(const Axis& a, int32_t p, int32_t Lg) {
  return window_end(a, p, Lg, window_start(a, p, Lg));
}

// Position of a token on one axis.
struct AxisPos {
  int32_t g;   // dilation group
  int32_t p;   // position inside the group
  int32_t Lg;  // group length
};

JNA_HD AxisPos axis_pos(const Axis& a, int32_t i) {
  AxisPos r;
  r.g = i % a.d;
  r.p = i / a.d;
  r.Lg = group_length(a, r.g);
  return r;
}

// Token index of group position pos in group g.
JNA_HD int32_t token_of(const Axis& a, int32_t g, int32_t pos) { return g + a.d * pos; }

// Half-open range of positions.
struct Range {
  int32_t begin;
  int32_t end;
};

// The searches below take a search policy: BinarySearch (one thread) here, or WarpSearch
// (geometry/warp_search.cuh: a whole warp, 32 probes per round) on the device. Both find, for a
// predicate that is false then true over [lo, hi), its first true position, or hi.
struct BinarySearch {
  template <class Pred>
  JNA_HD int32_t operator()(int32_t lo, int32_t hi, Pred pred) const {
    while (lo < hi) {
      const int32_t mid = lo + (hi - lo) / 2;
      if (pred(mid)) hi = mid; else lo = mid + 1;
    }
    return lo;
  }
};

// First query position p (group of length Lg) with window_end(p) > j, or Lg.
template <class Search = BinarySearch>
JNA_HD int32_t first_end_after(const Axis& a, int32_t j, int32_t Lg, const Search& search = {}) {
  return search(0, Lg, [&](int32_t p) { return window_end(a, p, Lg) > j; });
}

// First query position p with window_start(p) > j, or Lg.
template <class Search = BinarySearch>
JNA_HD int32_t first_start_after(const Axis& a, int32_t j, int32_t Lg, const Search& search = {}) {
  return search(0, Lg, [&](int32_t p) { return window_start(a, p, Lg) > j; });
}

// inverse_range(a, j, Lg) for a key j < Lg of a key range [j0, j1] whose inverse_range_any begins at
// any_begin and ends at or before any_end_bound (<= Lg), and whose inverse_range_all begins at
// all_begin: the range's begin lies in [any_begin, all_begin] and its end in [any_begin,
// any_end_bound] (both monotone in j), so the searches cover those spans instead of the group (a
// K/V tile's per-key table: a tile's width instead of log2 Lg steps).
template <class Search = BinarySearch>
JNA_HD Range inverse_range_within(const Axis& a, int32_t j, int32_t Lg, int32_t any_begin, int32_t any_end_bound,
                                  int32_t all_begin, const Search& search = {}) {
  Range r;
  r.begin = search(any_begin, all_begin, [&](int32_t p) { return window_end(a, p, Lg) > j; });
  // An end below any_begin comes out as any_begin, which the clamp below turns into begin anyway.
  const int32_t e = search(any_begin, any_end_bound, [&](int32_t p) { return window_start(a, p, Lg) > j; });
  r.end = e < r.begin ? r.begin : e;
  return r;
}

// Query positions (same group, group length Lg) whose window contains key position j: the search
// above over the whole group. Uses only window_start/window_end, which are non-decreasing in the
// query position.
template <class Search = BinarySearch>
JNA_HD Range inverse_range(const Axis& a, int32_t j, int32_t Lg, const Search& search = {}) {
  return inverse_range_within(a, j, Lg, 0, Lg, Lg, search);
}

// Query positions whose window contains at least one key of [j0, j1] (j0 <= j1).
template <class Search = BinarySearch>
JNA_HD Range inverse_range_any(const Axis& a, int32_t j0, int32_t j1, int32_t Lg, const Search& search = {}) {
  Range r;
  r.begin = first_end_after(a, j0, Lg, search);
  const int32_t e = first_start_after(a, j1, Lg, search);
  r.end = e < r.begin ? r.begin : e;
  return r;
}

// Query positions whose window contains at least one key of [j0, j1] that lies in the group (keys at
// Lg and past dropped; j0 >= 0), as an interval; (0, 0) when no such key or no such query exists
// (the key-stationary kernels' per-unit query intervals).
JNA_HD Range inverse_range_any_in_group(const Axis& a, int32_t j0, int32_t j1, int32_t Lg) {
  const Range none{0, 0};
  j1 = imin(j1, Lg - 1);
  if (j0 > j1) return none;
  const Range r = inverse_range_any(a, j0, j1, Lg);
  return r.begin < r.end ? r : none;
}

// Query positions whose window contains every key of [j0, j1] (j0 <= j1).
template <class Search = BinarySearch>
JNA_HD Range inverse_range_all(const Axis& a, int32_t j0, int32_t j1, int32_t Lg, const Search& search = {}) {
  Range r;
  r.begin = first_end_after(a, j1, Lg, search);
  const int32_t e = first_start_after(a, j0, Lg, search);
  r.end = e < r.begin ? r.begin : e;
  return r;
}

// A 3-axis problem (rank 1 and 2 have singleton trailing axes).
struct Problem {
  Axis axis[kMaxRank];
  int64_t B = 0;    // batch
  int64_t N = 1;    // tokens per batch item: L0 * L1 * L2
  int32_t H = 1;    // query heads
  int32_t Hkv = 1;  // key/value heads (H % Hkv == 0)
  int64_t W = 1;    // window entries: k0 * k1 * k2
  int64_t Na = 0;   // additional keys/values (0: none)

  JNA_HD int32_t groups() const { return H / Hkv; }  // query heads per kv head
  JNA_HD int64_t rows() const { return B * N * H; }  // query rows [B, N, H]

  JNA_HD void token_coords(int64_t t, int32_t x[kMaxRank]) const {
    x[2] = static_cast<int32_t>(t % axis[2].L);
    t /= axis[2].L;
    x[1] = static_cast<int32_t>(t % axis[1].L);
    x[0] = static_cast<int32_t>(t / axis[1].L);
  }
  JNA_HD int64_t token(const int32_t x[kMaxRank]) const {
    return (static_cast<int64_t>(x[0]) * axis[1].L + x[1]) * axis[2].L + x[2];
  }
  JNA_HD void window_coords(int64_t w, int32_t wa[kMaxRank]) const {
    wa[2] = static_cast<int32_t>(w % axis[2].k);
    w /= axis[2].k;
    wa[1] = static_cast<int32_t>(w % axis[1].k);
    wa[0] = static_cast<int32_t>(w / axis[1].k);
  }
  JNA_HD int64_t window_index(const int32_t wa[kMaxRank]) const {
    return (static_cast<int64_t>(wa[0]) * axis[1].k + wa[1]) * axis[2].k + wa[2];
  }
  // Relative positional bias entries per head: prod(2 k_a - 1).
  JNA_HD int64_t rpb_size() const {
    return static_cast<int64_t>(2 * axis[0].k - 1) * (2 * axis[1].k - 1) * (2 * axis[2].k - 1);
  }
};

// Linear offset of (b, t, h, e) in a [B, N, heads, E] tensor.
JNA_HD int64_t offset(int64_t b, int64_t t, int64_t h, int64_t e, int64_t N, int64_t heads,
                      int64_t E) {
  return ((b * N + t) * heads + h) * E + e;
}

// The window of one query token, per axis.
struct QueryWindow {
  int32_t g[kMaxRank];      // dilation group
  int32_t p[kMaxRank];      // query position in the group
  int32_t start[kMaxRank];  // window [start, end) in group positions
  int32_t end[kMaxRank];
};

JNA_HD QueryWindow query_window(const Problem& pr, int64_t t) {
  int32_t x[kMaxRank];
  pr.token_coords(t, x);
  QueryWindow qw;
  for (int a = 0; a < kMaxRank; ++a) {
    const AxisPos ap = axis_pos(pr.axis[a], x[a]);
    qw.g[a] = ap.g;
    qw.p[a] = ap.p;
    qw.start[a] = window_start(pr.axis[a], ap.p, ap.Lg);
    qw.end[a] = window_end(pr.axis[a], ap.p, ap.Lg, qw.start[a]);
  }
  return qw;
}

// Key token of window entry w of a query; false when the entry is masked (outside a causal window).
JNA_HD bool window_key(const Problem& pr, const QueryWindow& qw, int64_t w, int64_t* key_token) {
  int32_t wa[kMaxRank], x[kMaxRank];
  pr.window_coords(w, wa);
  for (int a = 0; a < kMaxRank; ++a) {
    const int32_t pos = qw.start[a] + wa[a];
    if (pos >= qw.end[a]) return false;
    x[a] = token_of(pr.axis[a], qw.g[a], pos);
  }
  *key_token = pr.token(x);
  return true;
}

// Index into one head's relative positional bias [2k0-1, 2k1-1, 2k2-1] of window entry w
// (valid for stride 1, where |key - query| < k on every axis).
JNA_HD int64_t rpb_index(const Problem& pr, const QueryWindow& qw, int64_t w) {
  int32_t wa[kMaxRank];
  pr.window_coords(w, wa);
  int64_t idx = 0;
  for (int a = 0; a < kMaxRank; ++a) {
    const int32_t r = qw.start[a] + wa[a] - qw.p[a] + pr.axis[a].k - 1;
    idx = idx * (2 * pr.axis[a].k - 1) + r;
  }
  return idx;
}

}  // namespace geo
}  // namespace jax_na
