// What both forward kernels (portable and Hopper) do around their main loops: the shared-memory
// carve-up, the prologue (schedule, Q tile, per-row windows) and the epilogue (O / rowsum through
// smem to 16-byte row stores, lse per row).
#pragma once

#include <cstdint>

#include "fused/copy.cuh"
#include "fused/epilogue.cuh"
#include "fused/mask.cuh"
#include "fused/params.cuh"
#include "fused/tile_scheduler.cuh"

namespace jax_na {
namespace fused {

// Q tile (reused for O by the portable kernel), kStages K and V tiles, row windows, the CTA schedule.
template <class Traits>
struct FwdSmem {
  using Element = typename Traits::Element;
  static constexpr int kKVElems = Traits::kBlockN * Traits::kHeadDim;
  static constexpr int kOffK = Traits::kSmemQ;
  static constexpr int kOffV = kOffK + Traits::kStages * Traits::kSmemKV;
  static constexpr int kOffWin = kOffV + Traits::kStages * Traits::kSmemKV;
  static constexpr int kOffSched = kOffWin + Traits::kSmemWin;
  static_assert(sizeof(CtaSchedule) <= Traits::kSmemSched, "schedule smem");
  static_assert(Traits::kStages <= CtaSchedule::kMaxStages, "tile flags per stage");

  Element* q;
  Element* k;
  Element* v;
  int2* win;
  CtaSchedule* cs;

  __device__ __forceinline__ explicit FwdSmem(char* raw)
      : q(reinterpret_cast<Element*>(raw)),
        k(reinterpret_cast<Element*>(raw + kOffK)),
        v(reinterpret_cast<Element*>(raw + kOffV)),
        win(reinterpret_cast<int2*>(raw + kOffWin)),
        cs(reinterpret_cast<CtaSchedule*>(raw + kOffSched)) {}
  __device__ __forceinline__ Element* k_stage(int s) const { return k + s * kKVElems; }
  __device__ __forceinline__ Element* v_stage(int s) const { return v + s * kKVElems; }
};

// Fills the schedule (then a CTA barrier). False when the CTA owns no query (uniform over the CTA).
template <class Traits>
__device__ __forceinline__ bool fwd_schedule(const FwdKernelParams& p, const FwdSmem<Traits>& sm, int tid) {
  TileScheduler<Traits>::compute(p.pr, p.q_tiles, blockIdx, *sm.cs, tid);
  __syncthreads();
  return sm.cs->live != 0;
}

// Issues the Q tile (cp.async by the Traits::kLoadThreads loading threads, uncommitted).
template <class Traits>
__device__ __forceinline__ void fwd_load_q(const FwdKernelParams& p, const FwdSmem<Traits>& sm, int tid) {
  using TS = TileScheduler<Traits>;
  const CtaSchedule& cs = *sm.cs;
  load_rows<Traits, Traits::kBlockM, typename Traits::Element, typename Traits::SmemLayoutQ>(
      sm.q, static_cast<const typename Traits::Element*>(p.q), tid,
      [&](int r) { return TS::q_row_offset(p.pr, cs, r); });
}

// Schedule, Q tile (uncommitted: it joins the caller's first cp.async group) and the rows' windows,
// all threads loading. False when the CTA owns no query.
template <class Traits>
__device__ __forceinline__ bool fwd_prologue(const FwdKernelParams& p, const FwdSmem<Traits>& sm, int tid) {
  if (!fwd_schedule<Traits>(p, sm, tid)) return false;
  fwd_load_q<Traits>(p, sm, tid);
  RowWindowTable<Traits>::store(p.pr, *sm.cs, sm.win, tid);
  return true;
}

// Issues KV tile `walker` is at into `stage` (cp.async, uncommitted) with its flags.
template <class Traits>
__device__ __forceinline__ void fwd_issue_kv(const FwdKernelParams& p, const FwdSmem<Traits>& sm,
                                             KVTileWalker<Traits>& walker, int stage, int tid) {
  walker.issue(p.pr, *sm.cs, p.k, p.v, p.add_k, p.add_v, sm.k_stage(stage), sm.v_stage(stage),
               sm.cs->flags[stage], tid);
}

// o_rc: the normalized output (rows, cols) of this thread; lse: per fragment row. Every MMA reading
// sQ must have completed in every warp (the caller's loop ends with them waited for). tid, warp:
// among the kNThreads computing threads; sync(): a barrier over exactly those threads.
// OutTraits (head dim = the columns of o_rc), s_out, col0 and write_lse serve kernels that produce
// the output in passes of columns: o_rc holds columns [col0, col0 + OutTraits::kHeadDim), staged in
// s_out (a free (kBlockM, OutTraits::kHeadDim) tile of smem), and only one pass writes the lse.
template <class Traits, class OutTraits = Traits, class TensorO, int kRows, class Sync>
__device__ __forceinline__ void fwd_epilogue(const FwdKernelParams& p, const FwdSmem<Traits>& sm, const TensorO& o_rc,
                                             const float (&lse)[kRows], int tid, int warp, int lane, Sync&& sync,
                                             typename Traits::Element* s_out = nullptr, int col0 = 0,
                                             bool write_lse = true) {
  using TS = TileScheduler<Traits>;
  using Element = typename Traits::Element;
  using OutLayout = typename OutTraits::template SmemLayoutRows<Traits::kBlockM>;
  const CtaSchedule& cs = *sm.cs;
  auto q_row_offset = [&](int r) { return TS::q_row_offset(p.pr, cs, r); };
  if (s_out == nullptr) s_out = sm.q;
  cp_async_wait<0>();
  sync();  // s_out (sQ by default) is reused for O
  acc_to_smem<Traits::kNWarps, Element, OutLayout>(o_rc, s_out, 1.f, warp, lane);
  if (write_lse && (lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t off = q_row_offset(acc_row<Traits::kNWarps>(r, warp, lane));
      if (off >= 0) p.lse[off / Traits::kHeadDim] = lse[r];  // [B, N, H] row index = element offset / D
    }
  }
  sync();
  store_rows<OutTraits, Traits::kBlockM, OutLayout>(static_cast<Element*>(p.out) + col0, s_out, tid, q_row_offset);
}

}  // namespace fused
}  // namespace jax_na
