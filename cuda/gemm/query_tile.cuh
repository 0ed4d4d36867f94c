// What the query-stationary kernels (PN, NN) share: shared memory, the prologue (schedule, per-row
// windows) and the key-side tile loads. The tiling, schedule and window bookkeeping are the fused
// forward's (fused/tile_scheduler.cuh, fused/mask.cuh): a CTA owns a 128-query tile of one batch item,
// head and dilation group and walks the KV tiles of its window box; each warp skips the tiles that
// miss its queries' windows.
#pragma once

#include <cstdint>

#include "fused/copy.cuh"
#include "fused/mask.cuh"  // RowWindowTable
#include "fused/tile_scheduler.cuh"
#include "gemm/params.cuh"

namespace jax_na {
namespace gemm {

// The query tile (PN: its rows; NN: the output staging), two key-side tile stages, per-row windows,
// the schedule, then a kernel-specific region of `extra_bytes` (PN: score staging; NN: weight rows).
template <class Traits>
struct QTileSmem {
  using Element = typename Traits::Element;
  static constexpr int kOffB = Traits::kSmemQ;
  static constexpr int kOffWin = kOffB + 2 * Traits::kSmemKV;
  static constexpr int kOffSched = kOffWin + Traits::kSmemWin;
  static constexpr int kOffExtra = kOffSched + Traits::kSmemSched;
  static_assert(sizeof(fused::CtaSchedule) <= Traits::kSmemSched, "schedule smem");
  static_assert(kOffExtra % 16 == 0, "extra region alignment");
  static constexpr int bytes(int64_t extra_bytes) { return kOffExtra + static_cast<int>((extra_bytes + 15) / 16 * 16); }

  Element* q;
  Element* b;
  int2* win;
  fused::CtaSchedule* cs;
  char* extra;
  __device__ __forceinline__ explicit QTileSmem(char* raw)
      : q(reinterpret_cast<Element*>(raw)),
        b(reinterpret_cast<Element*>(raw + kOffB)),
        win(reinterpret_cast<int2*>(raw + kOffWin)),
        cs(reinterpret_cast<fused::CtaSchedule*>(raw + kOffSched)),
        extra(raw + kOffExtra) {}
  __device__ __forceinline__ Element* b_stage(int s) const { return b + s * Traits::kBlockN * Traits::kHeadDim; }
};

// cp.async of the key-side rows (K for PN, V for NN) of the tile `walker` is at into `dst` (uncommitted);
// warp 0 publishes the tile's origin and per-warp flags in f; the walker steps on.
template <class Traits>
__device__ __forceinline__ void issue_key_tile(const geo::Problem& pr, const fused::CtaSchedule& cs,
                                               fused::KVTileWalker<Traits>& walker, const void* b,
                                               typename Traits::Element* dst, fused::TileFlags& f, int tid) {
  using Element = typename Traits::Element;
  int32_t org[3];
  walker.origin(cs, org);
  const fused::BoxRows<typename Traits::KVTile, Traits::kRank> rows{
      cs.kv_base, {cs.kv_step[0], cs.kv_step[1], cs.kv_step[2]}, {org[0], org[1], org[2]}, {cs.Lg[0], cs.Lg[1], cs.Lg[2]}};
  fused::load_rows<Traits, Traits::kBlockN, Element, typename Traits::SmemLayoutKV>(dst, static_cast<const Element*>(b),
                                                                                    tid, rows);
  walker.publish(pr, cs, org, f, tid);
  walker.advance(cs);
}

// The main loop of the query-stationary kernels: body(stage, org) for every KV tile of the CTA (origin
// org, key-side rows in sm.b_stage(stage)) that meets the windows of some query of this warp; two
// stages, one barrier per tile, the next tile's rows loading during this one's math. The first tile
// must have been issued (issue_key_tile into stage 0, committed).
template <class Traits, class Body>
__device__ __forceinline__ void for_each_key_tile(const geo::Problem& pr, fused::CtaSchedule& cs,
                                                  fused::KVTileWalker<Traits>& walker, const void* b,
                                                  const QTileSmem<Traits>& sm, int tid, int warp, Body&& body) {
  for (int32_t n = 0; n < cs.n_tiles; ++n) {
    const int stage = n & 1;
    fused::cp_async_wait<0>();
    __syncthreads();  // tile n (and its flags) visible; every warp done with stage (n + 1) & 1
    if (n + 1 < cs.n_tiles) {
      issue_key_tile<Traits>(pr, cs, walker, b, sm.b_stage(stage ^ 1), cs.flags[stage ^ 1], tid);
      fused::cp_async_commit();
    }
    const fused::TileFlags& tf = cs.flags[stage];
    if (!((tf.active >> warp) & 1u)) continue;
    const int32_t org[3] = {tf.org[0], tf.org[1], tf.org[2]};
    body(stage, org);
  }
}

// Per fragment row of this thread: the element offset of its weight row ([B, N, H, W]; -1 outside the
// group) and its window on each axis.
template <class Traits, int kRows>
struct RowWindows {
  int64_t weights_row[kRows];
  int2 win[kRows][3];
  __device__ __forceinline__ RowWindows(const geo::Problem& pr, const fused::CtaSchedule& cs, const int2* s_win,
                                        int warp, int lane) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = fused::acc_row<Traits::kNWarps>(r, warp, lane);
      const int64_t off = fused::TileScheduler<Traits>::q_row_offset(pr, cs, row);
      weights_row[r] = off >= 0 ? off / Traits::kHeadDim * pr.W : -1;  // [B, N, H] row = offset / E
#pragma unroll
      for (int a = 0; a < 3; ++a) win[r][a] = a < Traits::kRank ? fused::RowWindowTable<Traits>::at(s_win, a, row) : make_int2(0, 1);
    }
  }
};

}  // namespace gemm
}  // namespace jax_na
