// Fused backward, key-stationary part: dK and dV (on SM80 MMAs, or on Hopper wgmma through Sm90Gemm).
//
// One CTA = one KV tile of kBlockN keys (64: 4 warps portable, one warpgroup on Hopper; one batch
// item, kv head and dilation group; or kBlockN additional keys). K and V stay in shared memory; the
// CTA walks the Q tiles of its inverse neighbourhood for each of the G query heads of its kv head
// (KVScheduler, QTileWalker), Q/dO/lse/delta double-buffered: gathered with cp.async by every thread, or on
// Hopper (Gemm::kTmaLoads, problems without dilation) Q/dO by one thread's TMA boxes, completing on
// a per-stage mbarrier, so that the other threads only issue lse/delta. Per Q tile, with the keys
// as MMA rows:
//   S^T = K Q^T, dP^T = V dO^T, P^T = exp(scale S^T - lse) (masked), dV += P^T dO,
//   dS^T = P^T (dP^T - delta), dK += dS^T Q
// dK = scale * sum. Every key belongs to exactly one CTA: no atomics, deterministic, GQA reduced
// in registers. With Gemm::kUnitSkips (the portable warps; not Hopper's warpgroups, measured slower)
// each MMA unit skips the products of the Q tiles its own keys do not meet (UnitQueryIntervals in
// mask.cuh). Query columns outside the group load as zeros (Q = dO = lse = delta = 0), which makes
// their dV and dK contributions exactly zero without a mask. (The Hopper backward's
// non-deterministic mode, which also adds dQ, has its own kernel: hopper/mainloop_bwd.cuh.)
// Head dims over 128 walk the Q tiles once per 128 dK/dV columns (Traits::kDPasses), recomputing S^T
// and dP^T: two 256-column accumulators would not fit the register file.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <cmath>
#include <cstdint>

#include "fused/bwd_tile_math.cuh"
#include "fused/copy.cuh"
#include "fused/epilogue.cuh"
#include "fused/gemm.cuh"  // Sm80Gemm
#include "fused/hopper/pipeline.cuh"  // LoadStages2
#include "fused/hopper/tma.cuh"
#include "fused/kernel_traits.cuh"
#include "fused/mask.cuh"
#include "fused/params.cuh"
#include "fused/softmax.cuh"
#include "fused/tile_scheduler.cuh"

namespace jax_na {
namespace fused {

// Shared memory of the dK/dV kernel: K, V, two stages each of Q and dO (each tile at a multiple of
// its size: the 1024-byte alignment the Hopper GMMA layouts need), then two stages of (lse, delta),
// the keys' query intervals (InverseRangeTable, then UnitQueryIntervals), the schedule and one
// mbarrier per Q/dO stage (TMA loads).
template <class Traits>
struct DkdvSmem {
  static constexpr int kK = 0;
  static constexpr int kV = kK + Traits::kSmemKV;
  static constexpr int kQ = kV + Traits::kSmemKV;        // stage s at kQ + s * kSmemQ
  static constexpr int kDO = kQ + 2 * Traits::kSmemQ;    // stage s at kDO + s * kSmemQ
  static constexpr int kSmall = kDO + 2 * Traits::kSmemQ;  // stage s at kSmall + s * kSmallStage
  static constexpr int kLse = 0;                          // offsets inside a small stage
  static constexpr int kDelta = kLse + Traits::kBlockM * 4;
  static constexpr int kSmallStage = kDelta + Traits::kBlockM * 4;
  static constexpr int kInv = kSmall + 2 * kSmallStage;
  static constexpr int kUnitInv = kInv + Traits::kInvEntries * 8;  // up to 3 * kNWarps int2
  static constexpr int kSched = kInv + Traits::kSmemInv;
  static constexpr int kBars = kSched + Traits::kSmemSched;
  static constexpr int kBytes = kBars + Traits::kSmemBars;
  static_assert(kBytes == Traits::kSmemBytes, "smem plan");
  static_assert(Traits::kSmemKV % 1024 == 0 && Traits::kSmemQ % 1024 == 0, "tile alignment");
};

// Gemm: the MMA policy (Sm80Gemm: mma.sync; Sm90Gemm in hopper/gemm.cuh: wgmma, with the products
// in flight while the exponentials of the other one run).
template <class Traits, class Gemm = Sm80Gemm<Traits>>
__global__ void __launch_bounds__(Traits::kNThreads, kDkdvMinBlocks<Traits>)
    fused_bwd_dkdv_kernel(const __grid_constant__ BwdKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using Element = typename Traits::Element;
  using L = DkdvSmem<Traits>;
  using KS = KVScheduler<Traits>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;
  // One pass's dK/dV columns: the same policy over Traits at head dim kHeadDimOut.
  using OutTraits = typename Traits::OutTraits;
  using OutGemm = typename Gemm::template Rebind<OutTraits>;
  constexpr int kDOut = OutTraits::kHeadDim;
  static_assert(kDOut == Traits::kHeadDimOut && kD == kDOut * Traits::kDPasses, "dK/dV columns per pass");

  extern __shared__ __align__(1024) char smem_raw[];
  Element* sK = reinterpret_cast<Element*>(smem_raw + L::kK);
  Element* sV = reinterpret_cast<Element*>(smem_raw + L::kV);
  static_assert(sizeof(KVSchedule) <= Traits::kSmemSched, "schedule smem");
  KVSchedule& ks = *reinterpret_cast<KVSchedule*>(smem_raw + L::kSched);
  auto sQ = [&](int s) { return reinterpret_cast<Element*>(smem_raw + L::kQ + s * Traits::kSmemQ); };
  auto sdO = [&](int s) { return reinterpret_cast<Element*>(smem_raw + L::kDO + s * Traits::kSmemQ); };
  auto small = [&](int s, int off) { return smem_raw + L::kSmall + s * L::kSmallStage + off; };

  const int tid = threadIdx.x;
  // Warp-uniform by construction (a lane-0 shuffle): ptxas must see that no branch steers a wgmma.
  const int warp = __shfl_sync(0xffffffffu, tid / 32, 0);
  const int lane = tid % 32;
  // MMA units (warps, or warpgroups on Hopper) own consecutive key rows; with Gemm::kUnitSkips each
  // skips the products of the Q tiles its keys do not meet (UnitQueryIntervals).
  constexpr int kUnits = Traits::kNWarps / Gemm::kWarpsPerMma;
#if defined(JNA_BWD_EXPERIMENT_NO_UNIT_SKIP)  // experiment knob: every unit takes every Q tile
  constexpr bool kUnitSkip = false;
#elif defined(JNA_BWD_EXPERIMENT_UNIT_SKIP)  // experiment knob: the units skip on either policy
  constexpr bool kUnitSkip = true;
#else
  constexpr bool kUnitSkip = Gemm::kUnitSkips;
#endif
  static_assert(Traits::kBlockN == 16 * Traits::kNWarps, "one 16-row block of the K/V tile per warp");
  using UnitIntervals = UnitQueryIntervals<Traits, kUnits>;
  const int unit = warp / Gemm::kWarpsPerMma;

  constexpr bool kTma = Gemm::kTmaLoads;
  LoadStages2 q_stages(smem_raw + L::kBars);  // Q/dO stage s landed
  if constexpr (kTma) {
    if (tid == 0) q_stages.init();
  }
  KS::compute(p.pr, p.kv_grid, p.n_window_ctas, ks, tid);
  __syncthreads();
  if (!ks.live) return;  // uniform over the CTA
  const geo::Problem& pr = p.pr;
  const int32_t n_iters = __shfl_sync(0xffffffffu, pr.groups() * ks.n_q_tiles, 0);

  auto kv_off = [&](int r) { return KS::kv_row_offset(pr, ks, r); };
  load_rows<Traits, kBlockN, Element, typename Traits::SmemLayoutKV>(
      sK, static_cast<const Element*>(ks.is_add ? p.add_k : p.k), tid, kv_off);
  load_rows<Traits, kBlockN, Element, typename Traits::SmemLayoutKV>(
      sV, static_cast<const Element*>(ks.is_add ? p.add_v : p.v), tid, kv_off);

  // Loads the Q tile `walker` is at into stage s: Q and dO rows, lse/delta per query; then steps the
  // walker on.
  QTileWalker<Traits> load_walker;
  auto issue_q = [&](int s) {
    int32_t org[3];
    load_walker.origin(ks, org);
    bool tma = false;  // uniform over the CTA
    if constexpr (kTma) {
      tma = p.q_tma && !ks.is_add && box_fits_tma<Traits::kRank, typename Traits::QTile>(pr, org);
      if (tid == 0) {
        q_stages.arrive(s, tma ? 2 * Traits::kSmemQ : 0);
        if (tma)
          load_q_do_tma<Traits>(p.q_maps, pr, ks.hkv * pr.groups() + load_walker.head, static_cast<int32_t>(ks.b),
                                org, sQ(s), sdO(s), &q_stages.bar[s]);
      }
    }
    auto gather = [&](const auto& rows) {
      if (!tma)
        load_rows_pair<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(
            sQ(s), static_cast<const Element*>(p.q), sdO(s), static_cast<const Element*>(p.d_out), tid, rows);
      if (tid < kBlockM) {
        const int64_t off = rows(tid);
        const int64_t row = off >= 0 ? off / kD : 0;  // [B, N, H] row = element offset / D
        cp_async_4(small(s, L::kLse) + 4 * tid, p.lse + row, off >= 0);
        cp_async_4(small(s, L::kDelta) + 4 * tid, p.delta + row, off >= 0);
      }
    };
    if (ks.is_add)
      gather(load_walker.token_rows(ks, org));
    else
      gather(load_walker.window_rows(ks, org));
    load_walker.advance(ks);
  };
  if (n_iters > 0) issue_q(0);
  cp_async_commit();
  // Visible after the loop's first barrier.
  int2* s_inv = reinterpret_cast<int2*>(smem_raw + L::kInv);
  int2* s_unit = reinterpret_cast<int2*>(smem_raw + L::kUnitInv);
  if (!ks.is_add) {
    InverseRangeTable<Traits>::store(pr, ks, s_inv, tid);
    if constexpr (kUnitSkip) UnitIntervals::store(pr, ks, s_unit, tid);
  }

  Gemm gemm(tid);
  OutGemm out_gemm(tid);
  auto acc_dk = out_gemm.template acc<kBlockN, kDOut>();
  auto acc_dv = out_gemm.template acc<kBlockN, kDOut>();
  Tensor dk_rc = make_tensor(acc_dk.data(), row_col(acc_dk.layout()));
  Tensor dv_rc = make_tensor(acc_dv.data(), row_col(acc_dv.layout()));

  for (int pass = 0; pass < Traits::kDPasses; ++pass) {
    clear(acc_dk);
    clear(acc_dv);
    const int col0 = pass * kDOut;  // this pass's columns of a (rows, D) tile: the (rows, kDOut) tile at rows * col0
    QTileWalker<Traits> walker;     // tile i (load_walker is one ahead)
    for (int32_t i = 0; i < n_iters; ++i) {
      const int s = i & 1;
      cp_async_wait<0>();
      if constexpr (kTma) q_stages.wait(s);
      gemm.fence_smem_writes();
      __syncthreads();  // stage s (and K, V) visible; every warp done with stage s ^ 1
      if (i + 1 < n_iters) {
        issue_q(s ^ 1);  // tile i + 1
        cp_async_commit();
      }
      int32_t org[3];
      walker.origin(ks, org);
      walker.advance(ks);
      // This unit's keys meet the Q tile. Uniform over the unit: its warps read the same entries (on
      // Hopper the four warps of a warpgroup; the lane-0 shuffle shows ptxas it is warp-uniform, as
      // a branch that steers wgmma must be, see `warp`).
      bool meets = true;
      if constexpr (kUnitSkip)
        meets = __shfl_sync(0xffffffffu, ks.is_add || UnitIntervals::meets(s_unit, unit, org), 0) != 0;
// Experiment knob: unit 0 alone computes (a lone unit's step; a no-op where the CTA is one unit, as
// the default Hopper CTA: there only with -DJNA_BWD_EXPERIMENT_TWO_WARPGROUPS).
#if defined(JNA_BWD_EXPERIMENT_ONE_UNIT)
      meets = meets && unit == 0;
#endif
      if (!meets) continue;  // this unit has nothing to do on this tile
      const bool full = ks.is_add || KS::q_tile_full(ks, org);
      const float* s_lse = reinterpret_cast<const float*>(small(s, L::kLse));
      const float* s_dlt = reinterpret_cast<const float*>(small(s, L::kDelta));

      auto acc_s = gemm.template acc<kBlockN, kBlockM>();
      auto acc_dp = gemm.template acc<kBlockN, kBlockM>();
      Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
      Tensor dp_rc = make_tensor(acc_dp.data(), row_col(acc_dp.layout()));
      // P^T and dS^T as operands, declared here: the dV and dK products reading them stay in flight
      // until the step's last wait.
      Tensor rP = make_tensor_like<Element>(acc_s);
      Tensor rdS = make_tensor_like<Element>(acc_dp);
      gemm.template ss<kBlockN, kBlockM>(acc_s, sK, sQ(s));
      gemm.template ss<kBlockN, kBlockM>(acc_dp, sV, sdO(s));
      gemm.template wait<1>(acc_s);  // S^T done, dP^T may still run
      if (!full)
        mask_inverse_tile<Traits>(s_rc, s_inv, org, warp, lane);
      probabilities_t(s_rc, s_lse, p.scale_log2, lane);
      convert_fragment_into(acc_s, rP);
      out_gemm.template rs<kBlockM>(acc_dv, rP, sdO(s) + kBlockM * col0);  // dV += P^T dO
      gemm.template wait<1>(acc_dp);                                       // dP^T done, dV in flight
      score_grads_t(dp_rc, s_rc, s_dlt, lane);
      convert_fragment_into(acc_dp, rdS);
      out_gemm.template rs<kBlockM>(acc_dk, rdS, sQ(s) + kBlockM * col0);  // dK += dS^T Q
      out_gemm.template wait<0>(acc_dv, acc_dk, rP, rdS);  // stage s is read by nothing after this
    }

    // Epilogue: dK * scale and dV -> smem -> rows of dk/dv (or d_add_k/d_add_v). One pass: over K and
    // V; more: over the Q/dO stages (free now; K and V serve the next pass, whose Q tile 0 loads next).
    cp_async_wait<0>();
    __syncthreads();
    using OutLayout = typename OutTraits::template SmemLayoutRows<kBlockN>;
    static_assert(Traits::kDPasses == 1 || 2 * kBlockN * kDOut <= 4 * kBlockM * kD, "dK/dV staging over Q/dO");
    Element* s_dk = Traits::kDPasses == 1 ? sK : sQ(0);
    Element* s_dv = Traits::kDPasses == 1 ? sV : sQ(0) + kBlockN * kDOut;
    acc_to_smem<Traits::kNWarps, Element, OutLayout>(dk_rc, s_dk, p.scale, warp, lane);
    acc_to_smem<Traits::kNWarps, Element, OutLayout>(dv_rc, s_dv, 1.f, warp, lane);
    __syncthreads();
    store_rows<OutTraits, kBlockN, OutLayout>(static_cast<Element*>(ks.is_add ? p.d_add_k : p.dk) + col0, s_dk,
                                              tid, kv_off);
    store_rows<OutTraits, kBlockN, OutLayout>(static_cast<Element*>(ks.is_add ? p.d_add_v : p.dv) + col0, s_dv,
                                              tid, kv_off);
    if (pass + 1 < Traits::kDPasses) {
      __syncthreads();  // the staging read out before Q tile 0 lands there
      load_walker = QTileWalker<Traits>{};
      if (n_iters > 0) issue_q(0);
      cp_async_commit();
    }
  }
#endif
}

}  // namespace fused
}  // namespace jax_na
