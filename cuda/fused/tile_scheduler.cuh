// Which queries/keys a CTA owns and which KV/Q tiles it visits, all from geometry/window.cuh.
//
// Query-stationary kernels (forward, backward dQ):
// Grid: x = (dilation group, Q tile) with the Q tiles fastest (neighbouring CTAs share KV in L2),
// y = query head, z = batch. A CTA's queries all lie in one dilation group (g0, g1, g2), so its KV
// box stays compact: per axis, the union of its queries' windows is inside
// [window_start(first query), window_end(last query)) because start/end are non-decreasing.
// The intersection of the windows is [window_start(last), window_end(first)): a KV tile inside it
// (on every axis) needs no mask. The same holds per warp for the warp's sub-box of queries.
// KV tiles: first the tiles of the CTA box (KVTile-shaped, starting at the box origin), then
// ceil(Na / kBlockN) tiles of additional keys.
#pragma once

#include <cstdint>
#include <limits>

#include "fused/copy.cuh"
#include "fused/params.cuh"
#include "geometry/warp_search.cuh"
#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

// What the kernels need of KV tile n, published in smem by warp 0 one tile ahead (read after the
// barrier that also publishes the tile's K/V): its origin and, per warp w, bit w of `active` (the
// tile meets the windows of some query of warp w) and of `full` (it lies inside all of them). Kernels
// whose Traits::kHalfTiles (the portable 16-bit forward kernels: kernel_traits.cuh) also get bit
// 8 + w of `active` (the first half of the tile along axis 0, i.e. its first kBlockN / 2 keys, meets
// warp w's windows) and bit 16 + w (the second half does).
struct TileFlags {
  int32_t org[3];
  uint32_t active;
  uint32_t full;
};
constexpr int kHalfLoShift = 8;
constexpr int kHalfHiShift = 16;

// Per-CTA schedule, computed once into shared memory (keeps ~40 values out of the registers that
// the accumulators need); every thread reads it back after a barrier.
struct CtaSchedule {
  int32_t g[3];       // dilation group per axis
  int32_t Lg[3];      // group length per axis
  int32_t q0[3];      // first query position (in the group) of the Q tile
  int32_t box_lo[3];  // origin of the KV box
  int32_t ntiles[3];  // KV tiles per axis over the box
  int32_t n_window_tiles;
  int32_t n_tiles;  // window tiles + additional-keys tiles
  int32_t h, hkv;
  int64_t b;
  // Element offset in k/v of key position (p0, p1, p2) of the group: kv_base + sum_a p_a kv_step[a]
  // (token_of and Problem::token are linear in the positions): a few multiply-adds per gathered row.
  int64_t kv_base;
  int64_t kv_step[3];
  int32_t live;  // 0: the CTA owns no query (its group is shorter than the tiled length)
  int32_t done;  // persistent CTAs: no Q tile left (nothing else is valid then)
  // Per warp: union (bounding box) and intersection of its queries' windows.
  static constexpr int kMaxWarps = 8;
  int32_t warp_live[kMaxWarps];
  int32_t wbox_lo[kMaxWarps][3], wbox_hi[kMaxWarps][3], wfull_lo[kMaxWarps][3], wfull_hi[kMaxWarps][3];
  static constexpr int kMaxStages = 3;
  TileFlags flags[kMaxStages];  // per K/V stage: the tile in it (KVTileWalker::issue)
};

// The Q tiles of a forward launch as one linear index (x fastest, then head, then batch: the order in
// which a one-tile-per-CTA grid runs them), for persistent CTAs that walk it.
struct QTileSpace {
  int32_t x;      // dilation groups x Q tiles per group (a one-tile-per-CTA grid's x extent)
  int32_t heads;
  int64_t total;  // x * heads * batch
  __host__ __device__ __forceinline__ uint3 at(int64_t t) const {
    const int64_t xh = t / x;
    return make_uint3(static_cast<unsigned>(t - xh * x), static_cast<unsigned>(xh % heads),
                      static_cast<unsigned>(xh / heads));
  }
};

// Where a Q tile's rows live (a CtaSchedule's fields that q_row_offset reads): kept by the persistent
// Hopper forward's consumers for their epilogue while the producer writes the next tile's schedule.
struct QTileOrigin {
  int32_t g[3], Lg[3], q0[3];
  int32_t h;
  int64_t b;
  __device__ __forceinline__ void assign(const CtaSchedule& cs) {
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      g[a] = cs.g[a];
      Lg[a] = cs.Lg[a];
      q0[a] = cs.q0[a];
    }
    h = cs.h;
    b = cs.b;
  }
};

// In-tile coordinate on axis a of query row r of a query-stationary CTA (see the TiledMma of
// FwdTraits: warp w holds rows 16w + 16 kNWarps i; each warp's rows form its WarpTile sub-box).
template <class Traits>
__host__ __device__ __forceinline__ constexpr int q_row_coord(int r, int a) {
  using WarpGrid = typename Traits::WarpGrid;
  using WarpTile = typename Traits::WarpTile;
  const int w = (r >> 4) % Traits::kNWarps;
  const int i = ((r / (16 * Traits::kNWarps)) << 4) | (r & 15);
  return WarpGrid::coord(w, a) * WarpTile::extent(a) + WarpTile::coord(i, a);
}

// Element offsets of the rows of a Tile-shaped box at origin org (positions of a dilation group, or
// tokens): base + sum_a pos_a step[a], or -1 where a position reaches lim[a]. Built once per tile so
// that its fields sit in registers during the gathers: read back from smem per row, they cost loads
// that the cp.async asm statements (memory clobbers) keep the compiler from hoisting.
template <class Tile, int kRank>
struct BoxRows {
  int64_t base;
  int64_t step[3];
  int32_t org[3];
  int32_t lim[3];
  __device__ __forceinline__ int64_t operator()(int r) const {
    int64_t off = base;
#pragma unroll
    for (int a = 0; a < kRank; ++a) {
      const int32_t pos = org[a] + Tile::coord(r, a);
      if (pos >= lim[a]) return -1;
      off += pos * step[a];
    }
    return off;
  }
};

template <class Traits>
struct TileScheduler {
  using QTile = typename Traits::QTile;
  using WarpTile = typename Traits::WarpTile;
  using WarpGrid = typename Traits::WarpGrid;
  using KVTile = typename Traits::KVTile;
  static constexpr int kRank = Traits::kRank;
  static_assert(Traits::kNWarps <= CtaSchedule::kMaxWarps, "CtaSchedule warps");

  // The schedule of Q tile `tile` (x: dilation group and tile, y: head, z: batch; the block index
  // of a one-tile-per-CTA grid), computed by warp 0: lane kRank w + a (w < kNWarps) takes warp w's
  // box on axis a, lanes 0..kRank-1 also the CTA's part of their axis (lane 0 writes the rest), so
  // each lane runs the window searches of one axis: the integer divisions on the CTA's critical path
  // are a third of one thread doing all three axes in 3-D (a 64-query forward CTA on p4 spent ~7.7k
  // of its ~28k cycles before its first K/V tile). The axis is a compile-time 0 in 1-D (a runtime
  // index into the problem's axes costs registers and local copies there, where it gains nothing).
  // Axes past the rank get one position and one tile. Every lane runs the same code on its axis'
  // values (no divergence). Call from all of warp 0 (other threads return at once); a barrier must
  // follow before reading.
  __device__ static void compute(const geo::Problem& pr, const int32_t q_tiles[3], uint3 tile, CtaSchedule& cs,
                                 int tid) {
    if (tid >= 32) return;
    constexpr unsigned kAll = 0xffffffffu;
    constexpr int kLanes = kRank * Traits::kNWarps;  // lanes with a (warp, axis) of their own
    static_assert(kLanes <= 32, "one lane per warp and axis");
    const int lane = tid;
    const int a = lane % kRank;
    const int w = lane / kRank < Traits::kNWarps ? lane / kRank : 0;  // lanes past kLanes: warp 0's values, unused
    // tile.x = G T + tt: T Q tiles per group, tt = (t0 q1 + t1) q2 + t2, G = (g0 d1 + g1) d2 + g2.
    int32_t inner_t = 1, inner_d = 1;
#pragma unroll
    for (int b = 1; b < kRank; ++b) {
      if (b > a) {
        inner_t *= q_tiles[b];
        inner_d *= pr.axis[b].d;
      }
    }
    const int32_t T = q_tiles[0] * q_tiles[1] * q_tiles[2];
    const int32_t lin = static_cast<int32_t>(tile.x);  // fits int32 (tiles_per_axis); 64-bit divisions are slow
    const geo::Axis ax = pr.axis[a];
    const int32_t t = lin % T / inner_t % q_tiles[a];
    const int32_t g = lin / T / inner_d % ax.d;
    const int32_t Lg = geo::group_length(ax, g);
    const int32_t q_ext = QTile::extent(a), w_ext = WarpTile::extent(a), kv_shift = __ffs(KVTile::extent(a)) - 1;
    const int32_t q0 = t * q_ext;
    // The CTA's box on axis a (every lane computes it: the warp boxes need q0 and Lg).
    const int32_t qlo = geo::imin(q0, Lg - 1);
    const int32_t qhi = geo::imin(q0 + q_ext, Lg) - 1;
    const int32_t lo = geo::window_start(ax, qlo, Lg);
    const int32_t hi = geo::window_end(ax, geo::imax(qhi, qlo), Lg);
    const int32_t nt = (hi - lo + (1 << kv_shift) - 1) >> kv_shift;
    // Warp w's box and the intersection of its windows on axis a.
    const int32_t wq = q0 + WarpGrid::coord(w, a) * w_ext;
    const int32_t wlo = geo::imin(wq, Lg - 1);
    const int32_t whi = geo::imax(geo::imin(wq + w_ext, Lg) - 1, wlo);
    const int32_t s_lo = geo::window_start(ax, wlo, Lg);
    const int32_t s_hi = geo::window_start(ax, whi, Lg);
    if (lane < kLanes) {
      cs.wbox_lo[w][a] = s_lo;
      cs.wbox_hi[w][a] = geo::window_end(ax, whi, Lg, s_hi);
      cs.wfull_lo[w][a] = s_hi;
      cs.wfull_hi[w][a] = geo::window_end(ax, wlo, Lg, s_lo);
    }
    if (lane < kRank) {
      cs.g[a] = g;
      cs.Lg[a] = Lg;
      cs.q0[a] = q0;
      cs.box_lo[a] = lo;
      cs.ntiles[a] = nt;
    }
    if (lane < Traits::kNWarps) {
#pragma unroll
      for (int b = kRank; b < 3; ++b) {
        cs.wbox_lo[lane][b] = cs.wfull_lo[lane][b] = 0;
        cs.wbox_hi[lane][b] = cs.wfull_hi[lane][b] = 1;
      }
    }
    // Across the axes: lanes kRank w .. kRank w + kRank - 1 hold warp w's axes, lanes 0..kRank-1 the
    // CTA's. Every shuffle on every lane (a short-circuited one would leave lanes out of the others).
    const int base = lane - a;
    int wlive = 1, live = 1;
    int32_t gs[3] = {0, 0, 0}, n_window_tiles = 1;
#pragma unroll
    for (int b = 0; b < kRank; ++b) {
      wlive &= __shfl_sync(kAll, int(wq < Lg), base + b);
      live &= __shfl_sync(kAll, int(q0 < Lg), b);
      gs[b] = __shfl_sync(kAll, g, b);
      n_window_tiles *= __shfl_sync(kAll, nt, b);
    }
    if (a == 0 && lane < kLanes) cs.warp_live[w] = wlive;
    if (lane == 0) {
#pragma unroll
      for (int b = kRank; b < 3; ++b) {
        cs.g[b] = 0;
        cs.Lg[b] = 1;
        cs.q0[b] = 0;
        cs.box_lo[b] = 0;
        cs.ntiles[b] = 1;
      }
      int32_t x0[3];
      int64_t tok_stride = 1;
      for (int b = 2; b >= 0; --b) {
        x0[b] = geo::token_of(pr.axis[b], gs[b], 0);
        cs.kv_step[b] = static_cast<int64_t>(pr.axis[b].d) * tok_stride * pr.Hkv * Traits::kHeadDim;
        tok_stride *= pr.axis[b].L;
      }
      cs.kv_base = geo::offset(static_cast<int64_t>(tile.z), pr.token(x0), tile.y / pr.groups(), 0, pr.N, pr.Hkv,
                               Traits::kHeadDim);
      cs.n_window_tiles = n_window_tiles;
      cs.n_tiles = n_window_tiles + static_cast<int32_t>((pr.Na + Traits::kBlockN - 1) / Traits::kBlockN);
      cs.h = tile.y;
      cs.hkv = tile.y / pr.groups();
      cs.b = tile.z;
      cs.live = live;
    }
  }

  // Whether warp w has any key of the tile in its windows / every key of it in all its windows.
  __device__ __forceinline__ static void classify(const CtaSchedule& cs, int w, const int32_t org[3], bool* active,
                                                  bool* full) {
    bool act = cs.warp_live[w] != 0, ful = true;
#pragma unroll
    for (int a = 0; a < kRank; ++a) {
      const int32_t e = org[a] + KVTile::extent(a);
      act = act && org[a] < cs.wbox_hi[w][a] && e > cs.wbox_lo[w][a];
      ful = ful && org[a] >= cs.wfull_lo[w][a] && e <= cs.wfull_hi[w][a];
    }
    *active = act;
    *full = ful;
  }

  // Which halves along axis 0 of a tile warp w is active on (classify's act) meet its windows: the
  // tile already meets their bounding box, so only the halves' split point needs testing.
  __device__ __forceinline__ static void classify_halves(const CtaSchedule& cs, int w, const int32_t org[3], bool act,
                                                         bool* lo, bool* hi) {
    const int32_t mid = org[0] + KVTile::extent(0) / 2;
    *lo = act && mid > cs.wbox_lo[w][0];
    *hi = act && mid < cs.wbox_hi[w][0];
  }

  // Element offset of query row r (head cs.h) in a [B, N, H, D] tensor, or -1 outside the group.
  // Sched: CtaSchedule or QTileOrigin.
  template <class Sched>
  __device__ __forceinline__ static int64_t q_row_offset(const geo::Problem& pr, const Sched& cs, int r) {
    int32_t x[3] = {0, 0, 0};
#pragma unroll
    for (int a = 0; a < kRank; ++a) {
      const int32_t pos = cs.q0[a] + q_row_coord<Traits>(r, a);
      if (pos >= cs.Lg[a]) return -1;
      x[a] = geo::token_of(pr.axis[a], cs.g[a], pos);
    }
    return geo::offset(cs.b, pr.token(x), cs.h, 0, pr.N, pr.H, Traits::kHeadDim);
  }

  // cp.async of K/V tile n (window tile at origin org, or additional keys) into sK/sV; the caller commits.
  template <class Element>
  __device__ __forceinline__ static void load_kv(const geo::Problem& pr, const CtaSchedule& cs, int32_t n,
                                                 const int32_t org[3], const void* k, const void* v,
                                                 const void* add_k, const void* add_v, Element* sK, Element* sV,
                                                 int tid) {
    using SL = typename Traits::SmemLayoutKV;
    constexpr int kN = Traits::kBlockN;
    if (n < cs.n_window_tiles) {
      const BoxRows<KVTile, kRank> rows{cs.kv_base,
                                        {cs.kv_step[0], cs.kv_step[1], cs.kv_step[2]},
                                        {org[0], org[1], org[2]},
                                        {cs.Lg[0], cs.Lg[1], cs.Lg[2]}};
      load_rows_pair<Traits, kN, Element, SL>(sK, static_cast<const Element*>(k), sV,
                                              static_cast<const Element*>(v), tid, rows);
    } else {  // additional keys j0.. (rows of [B, Na, Hkv, D])
      const int64_t j0 = static_cast<int64_t>(n - cs.n_window_tiles) * kN;
      const BoxRows<Box<kN, 1, 1>, 1> rows{geo::offset(cs.b, j0, cs.hkv, 0, pr.Na, pr.Hkv, Traits::kHeadDim),
                                           {static_cast<int64_t>(pr.Hkv) * Traits::kHeadDim, 0, 0},
                                           {0, 0, 0},
                                           {static_cast<int32_t>(pr.Na - j0 < kN ? pr.Na - j0 : kN), 1, 1}};
      load_rows_pair<Traits, kN, Element, SL>(sK, static_cast<const Element*>(add_k), sV,
                                              static_cast<const Element*>(add_v), tid, rows);
    }
  }
};

// Walks the KV tiles of a query-stationary CTA in order without divisions: an odometer over the
// window tiles of the box (last axis fastest), then the additional-keys tiles.
template <class Traits>
struct KVTileWalker {
  using TS = TileScheduler<Traits>;
  using KVTile = typename Traits::KVTile;
  int32_t n = 0;
  int32_t i[3] = {0, 0, 0};

  __device__ __forceinline__ void origin(const CtaSchedule& cs, int32_t org[3]) const {
#pragma unroll
    for (int a = 0; a < 3; ++a) org[a] = n < cs.n_window_tiles ? cs.box_lo[a] + i[a] * KVTile::extent(a) : 0;
  }

  // cp.async of the current tile into sK/sV (the caller commits); warp 0 fills f; then steps on.
  template <class Element>
  __device__ __forceinline__ void issue(const geo::Problem& pr, const CtaSchedule& cs, const void* k,
                                        const void* v, const void* add_k, const void* add_v, Element* sK,
                                        Element* sV, TileFlags& f, int tid) {
    int32_t org[3];
    origin(cs, org);
    TS::load_kv(pr, cs, n, org, k, v, add_k, add_v, sK, sV, tid);
    publish(pr, cs, org, f, tid);
    advance(cs);
  }

  // Warp 0 classifies the current tile (origin org) for every warp; thread 0 writes f.
  __device__ __forceinline__ void publish(const geo::Problem& pr, const CtaSchedule& cs, const int32_t org[3],
                                          TileFlags& f, int tid) const {
    if (tid >= 32) return;
    bool act = true, ful = false, lo = true, hi = true;
    if (n < cs.n_window_tiles) {
      const int w = tid < Traits::kNWarps ? tid : 0;
      TS::classify(cs, w, org, &act, &ful);
      if constexpr (Traits::kHalfTiles) TS::classify_halves(cs, w, org, act, &lo, &hi);
    } else {
      ful = static_cast<int64_t>(n - cs.n_window_tiles + 1) * Traits::kBlockN <= pr.Na;
    }
    constexpr uint32_t kWarpBits = (1u << Traits::kNWarps) - 1u;
    static_assert(Traits::kNWarps <= kHalfLoShift, "8 bits per flag word");
    uint32_t a_bits = __ballot_sync(0xffffffffu, act) & kWarpBits;
    const uint32_t f_bits = __ballot_sync(0xffffffffu, ful) & kWarpBits;
    if constexpr (Traits::kHalfTiles)
      a_bits |= ((__ballot_sync(0xffffffffu, lo) & kWarpBits) << kHalfLoShift) |
                ((__ballot_sync(0xffffffffu, hi) & kWarpBits) << kHalfHiShift);
    if (tid == 0) {
      f.org[0] = org[0];
      f.org[1] = org[1];
      f.org[2] = org[2];
      f.active = a_bits;
      f.full = f_bits;
    }
  }

  __device__ __forceinline__ void advance(const CtaSchedule& cs) {
    ++n;
    if (++i[2] == cs.ntiles[2]) {  // axes past the rank have one tile
      i[2] = 0;
      if (++i[1] == cs.ntiles[1]) {
        i[1] = 0;
        ++i[0];
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Key-stationary backward (dK, dV): grid x = (dilation group, KV tile) for the window keys, then
// ceil(Na / kBlockN) CTAs of additional keys; y = kv head; z = batch. A window KV tile visits the Q
// tiles (QTile-shaped, from the first query that sees any of its keys) covering its inverse
// neighbourhood, for each of the G query heads of its kv head; an additional-keys tile visits every
// query (token order, kBlockM at a time). A Q tile whose valid queries all hold every valid key of
// the KV tile needs no mask (full_lo/full_hi per axis).
struct KVSchedule {
  int32_t g[3], Lg[3];
  int32_t k0[3];       // KV tile origin (group positions)
  int32_t q_begin[3];  // first Q-tile origin per axis
  int32_t q_tiles[3];  // Q tiles per axis
  int32_t full_lo[3], full_hi[3];
  int32_t n_q_tiles;   // Q tiles per query head
  int32_t hkv;
  int32_t is_add;      // additional-keys CTA
  int32_t live;        // 0: the tile holds no key
  int64_t b;
  int64_t add0;        // first additional key of an additional-keys CTA
  // Element offset in q/dO/dq of query position (p0, p1, p2) of the group, query head hkv * G + j:
  // q_base + j D + sum_a p_a q_step[a] (positions below q_lim[a]); an additional-keys CTA walks the
  // tokens on axis 0 (q_step[0] = H D, q_lim[0] = N). A few multiply-adds per gathered row.
  int64_t q_base;
  int64_t q_step[3];
  int32_t q_lim[3];
};

template <class Traits>
struct KVScheduler {
  using QTile = typename Traits::QTile;
  using KVTile = typename Traits::KVTile;
  static constexpr int kRank = Traits::kRank;

  // Warp 0 fills ks (its lanes share the inverse-range searches, geo::WarpSearch; lane 0 stores); a
  // barrier must follow.
  __device__ static void compute(const geo::Problem& pr, const KVTileGrid& grid, int32_t n_window_ctas,
                                 KVSchedule& ks, int tid) {
    if (tid >= 32) return;
    const geo::WarpSearch search{tid};
    KVSchedule s;
    s.hkv = blockIdx.y;
    s.b = blockIdx.z;
    if (static_cast<int32_t>(blockIdx.x) >= n_window_ctas) {
      s.is_add = 1;
      s.add0 = static_cast<int64_t>(blockIdx.x - n_window_ctas) * Traits::kBlockN;
      s.live = s.add0 < pr.Na;
      s.n_q_tiles = static_cast<int32_t>((pr.N + Traits::kBlockM - 1) / Traits::kBlockM);
      s.q_tiles[0] = s.n_q_tiles;
      s.q_tiles[1] = s.q_tiles[2] = 1;
      s.q_base = geo::offset(s.b, 0, static_cast<int64_t>(s.hkv) * pr.groups(), 0, pr.N, pr.H, Traits::kHeadDim);
      s.q_step[0] = static_cast<int64_t>(pr.H) * Traits::kHeadDim;
      s.q_step[1] = s.q_step[2] = 0;
      s.q_lim[0] = static_cast<int32_t>(pr.N);
      s.q_lim[1] = s.q_lim[2] = 1;
      if (tid == 0) ks = s;
      return;
    }
    s.is_add = 0;
    s.add0 = 0;
    int32_t lin = static_cast<int32_t>(blockIdx.x);  // 32-bit, as in TileScheduler::compute
    int32_t t[3], g[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) t[a] = grid.tile(lin, a);
    lin = grid.group(lin);
#pragma unroll
    for (int a = 2; a >= 0; --a) {
      g[a] = lin % pr.axis[a].d;
      lin /= pr.axis[a].d;
    }
    bool live = true;
    int32_t n = 1;
#pragma unroll
    for (int a = 0; a < 3; ++a) {
      const geo::Axis& ax = pr.axis[a];
      const int32_t Lg = a < kRank ? geo::group_length(ax, g[a]) : 1;
      const int32_t k0 = a < kRank ? t[a] * KVTile::extent(a) : 0;
      live = live && k0 < Lg;
      const int32_t k1 = geo::imin(k0 + KVTile::extent(a), Lg) - 1;  // last valid key
      int32_t qb = 0, qt = 1, flo = 0, fhi = 1;
      if (a < kRank && k0 < Lg) {  // uniform over the warp
        const geo::Range any = geo::inverse_range_any(ax, k0, k1, Lg, search);
        const geo::Range all = geo::inverse_range_all(ax, k0, k1, Lg, search);
        qb = any.begin;
        qt = (any.end - any.begin + QTile::extent(a) - 1) / QTile::extent(a);
        flo = all.begin;
        fhi = all.end;
      }
      s.g[a] = g[a];
      s.Lg[a] = Lg;
      s.k0[a] = k0;
      s.q_begin[a] = qb;
      s.q_tiles[a] = qt;
      s.full_lo[a] = flo;
      s.full_hi[a] = fhi;
      n *= qt;
    }
    s.live = live;
    s.n_q_tiles = n;
    int32_t x0[3];
    int64_t tok_stride = 1;
#pragma unroll
    for (int a = 2; a >= 0; --a) {
      x0[a] = geo::token_of(pr.axis[a], g[a], 0);
      s.q_step[a] = static_cast<int64_t>(pr.axis[a].d) * tok_stride * pr.H * Traits::kHeadDim;
      s.q_lim[a] = s.Lg[a];
      tok_stride *= pr.axis[a].L;
    }
    s.q_base = geo::offset(s.b, pr.token(x0), static_cast<int64_t>(s.hkv) * pr.groups(), 0, pr.N, pr.H,
                           Traits::kHeadDim);
    if (tid == 0) ks = s;
  }

  // True when every valid query of the Q tile at org holds every valid key of the KV tile.
  __device__ __forceinline__ static bool q_tile_full(const KVSchedule& ks, const int32_t org[3]) {
    bool full = true;
#pragma unroll
    for (int a = 0; a < kRank; ++a)
      full = full && org[a] >= ks.full_lo[a] && geo::imin(org[a] + QTile::extent(a), ks.Lg[a]) <= ks.full_hi[a];
    return full;
  }

  // Row offset (element, [B, N or Na, Hkv, D]) of key row r, or -1 outside.
  __device__ __forceinline__ static int64_t kv_row_offset(const geo::Problem& pr, const KVSchedule& ks, int r) {
    if (ks.is_add) {
      const int64_t j = ks.add0 + r;
      return j < pr.Na ? geo::offset(ks.b, j, ks.hkv, 0, pr.Na, pr.Hkv, Traits::kHeadDim) : int64_t{-1};
    }
    int32_t x[3] = {0, 0, 0};
#pragma unroll
    for (int a = 0; a < kRank; ++a) {
      const int32_t pos = ks.k0[a] + KVTile::coord(r, a);
      if (pos >= ks.Lg[a]) return -1;
      x[a] = geo::token_of(pr.axis[a], ks.g[a], pos);
    }
    return geo::offset(ks.b, pr.token(x), ks.hkv, 0, pr.N, pr.Hkv, Traits::kHeadDim);
  }
};

// Walks the Q tiles of a key-stationary CTA without divisions: an odometer over ks.q_tiles (last axis
// fastest), then the next query head of the group. Tile origins are group positions (window CTAs) or
// token indices on axis 0 (additional-keys CTAs, whose columns are consecutive tokens).
template <class Traits>
struct QTileWalker {
  using QTile = typename Traits::QTile;
  int32_t head = 0;  // query head in the group (hkv * G + head)
  int32_t i[3] = {0, 0, 0};

  __device__ __forceinline__ void origin(const KVSchedule& ks, int32_t org[3]) const {
    if (ks.is_add) {
      org[0] = i[0] * Traits::kBlockM;
      org[1] = org[2] = 0;
      return;
    }
#pragma unroll
    for (int a = 0; a < 3; ++a) org[a] = a < Traits::kRank ? ks.q_begin[a] + i[a] * QTile::extent(a) : 0;
  }

  // Element offsets of the query columns of the tile at org in q/dO (head hkv * G + head): the QTile
  // box of group positions (window CTAs) or kBlockM consecutive tokens (additional-keys CTAs).
  template <class Box_, int kBoxRank>
  __device__ __forceinline__ BoxRows<Box_, kBoxRank> rows(const KVSchedule& ks, const int32_t org[3]) const {
    return {ks.q_base + static_cast<int64_t>(head) * Traits::kHeadDim,
            {ks.q_step[0], ks.q_step[1], ks.q_step[2]},
            {org[0], org[1], org[2]},
            {ks.q_lim[0], ks.q_lim[1], ks.q_lim[2]}};
  }
  __device__ __forceinline__ BoxRows<QTile, Traits::kRank> window_rows(const KVSchedule& ks, const int32_t org[3]) const {
    return rows<QTile, Traits::kRank>(ks, org);
  }
  __device__ __forceinline__ BoxRows<Box<Traits::kBlockM, 1, 1>, 1> token_rows(const KVSchedule& ks,
                                                                               const int32_t org[3]) const {
    return rows<Box<Traits::kBlockM, 1, 1>, 1>(ks, org);
  }

  __device__ __forceinline__ void advance(const KVSchedule& ks) {
    if (++i[2] == ks.q_tiles[2]) {  // axes past the rank (and of additional-keys CTAs) have one tile
      i[2] = 0;
      if (++i[1] == ks.q_tiles[1]) {
        i[1] = 0;
        if (++i[0] == ks.q_tiles[0]) {
          i[0] = 0;
          ++head;
        }
      }
    }
  }
};

// Host: tiles of Tile per axis over the longest dilation group, and the grid's x extent (tiles times
// groups); false when it does not fit a grid dimension.
template <class Tile>
bool tiles_per_axis(const geo::Problem& pr, int32_t tiles[3], int64_t* blocks) {
  *blocks = 1;
  for (int a = 0; a < 3; ++a) {
    const int64_t group_len = (pr.axis[a].L + pr.axis[a].d - 1) / pr.axis[a].d;
    const int64_t t = (group_len + Tile::extent(a) - 1) / Tile::extent(a);
    tiles[a] = static_cast<int32_t>(t);
    *blocks *= t * pr.axis[a].d;
  }
  return *blocks <= std::numeric_limits<int32_t>::max();
}

// Host: the key tiles of Tile per axis (tiles_per_axis) and their order for `resident` CTAs at once
// (order_kv_tiles; 0: raster order), and the grid's x extent; false when it does not fit.
template <class Tile>
bool kv_tile_grid(const geo::Problem& pr, int64_t resident, KVTileGrid* grid, int64_t* blocks) {
  if (!tiles_per_axis<Tile>(pr, grid->tiles, blocks)) return false;
  const int32_t extent[3] = {Tile::extent(0), Tile::extent(1), Tile::extent(2)};
  order_kv_tiles(pr, extent, resident, grid);
  return true;
}

}  // namespace fused
}  // namespace jax_na
