// Fused backward, query-stationary part: dQ (on SM80 MMAs, or on Hopper wgmma through Sm90Gemm).
//
// One CTA = one Q tile, the same tiles and KV-tile walk as the forward (TileScheduler, per-warp
// skipping, mask-free full tiles). Per KV tile:
//   S = Q K^T, dP = dO V^T, P = exp(scale S - lse) (masked), dS = P (dP - delta), dQ += dS K
// with K/V double-buffered (tile n+1 loads while tile n computes): gathered with cp.async by every
// thread, or on Hopper (Gemm::kTmaLoads, window tiles of problems without dilation) by one thread's
// TMA boxes, completing on a per-stage mbarrier. dQ = scale * sum; no atomics, so the result is
// deterministic. dK/dV come from the key-stationary kernel (mainloop_bwd_dkdv.cuh).
// Head dims over 128 walk the KV tiles once per 128 dQ columns (Traits::kDPasses), recomputing S and
// dP: 128 columns of dQ accumulators is what fits the register file beside them.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>

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

// Shared memory of the dQ kernel: Q, dO, two stages of K and V, row windows, schedule, an mbarrier
// per K/V stage (TMA loads).
template <class Traits>
struct DqSmem {
  static constexpr int kQ = 0;
  static constexpr int kDO = kQ + Traits::kSmemQ;
  static constexpr int kK = kDO + Traits::kSmemQ;         // 2 stages
  static constexpr int kV = kK + 2 * Traits::kSmemKV;     // 2 stages
  static constexpr int kWin = kV + 2 * Traits::kSmemKV;
  static constexpr int kSched = kWin + Traits::kSmemWin;
  static constexpr int kBars = kSched + Traits::kSmemSched;
  static constexpr int kBytes = kBars + 2 * 8;  // LoadStages2
};

// Gemm: the MMA policy (Sm80Gemm, or Sm90Gemm from hopper/gemm.cuh: then a warpgroup skips a KV tile
// only when none of its four warps has a key of it in its windows).
template <class Traits, class Gemm = Sm80Gemm<Traits>>
__global__ void __launch_bounds__(Traits::kNThreads, kDqMinBlocks<Traits>) fused_bwd_dq_kernel(const __grid_constant__ BwdKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using Element = typename Traits::Element;
  using L = DqSmem<Traits>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kKVElems = kBlockN * kD;
  // One pass's dQ columns: the same policy over Traits at head dim kHeadDimOut.
  using OutTraits = typename Traits::OutTraits;
  using OutGemm = typename Gemm::template Rebind<OutTraits>;
  constexpr int kDOut = OutTraits::kHeadDim;
  static_assert(kDOut == Traits::kHeadDimOut && kD == kDOut * Traits::kDPasses, "dQ columns per pass");
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr uint32_t kGroupMask = (1u << Gemm::kWarpsPerMma) - 1;

  extern __shared__ __align__(1024) char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw + L::kQ);
  Element* sdO = reinterpret_cast<Element*>(smem_raw + L::kDO);
  Element* sK = reinterpret_cast<Element*>(smem_raw + L::kK);
  Element* sV = reinterpret_cast<Element*>(smem_raw + L::kV);
  int2* s_win = reinterpret_cast<int2*>(smem_raw + L::kWin);
  static_assert(sizeof(CtaSchedule) <= Traits::kSmemSched, "schedule smem");
  static_assert(Traits::kSmemQ % 1024 == 0 && Traits::kSmemKV % 1024 == 0, "tile alignment");
  CtaSchedule& cs = *reinterpret_cast<CtaSchedule*>(smem_raw + L::kSched);
  using TS = TileScheduler<Traits>;

  const int tid = threadIdx.x;
  // Warp-uniform by construction (a lane-0 shuffle): ptxas must see that no branch steers a wgmma.
  const int warp = __shfl_sync(0xffffffffu, tid / 32, 0);
  const int lane = tid % 32;
  const int group_warp0 = warp / Gemm::kWarpsPerMma * Gemm::kWarpsPerMma;

  constexpr bool kTma = Gemm::kTmaLoads;
  LoadStages2 kv_stages(smem_raw + L::kBars);  // K/V stage s landed
  if constexpr (kTma) {
    if (tid == 0) kv_stages.init();
  }
  TS::compute(p.pr, p.q_tiles, blockIdx, cs, tid);
  __syncthreads();
  if (!cs.live) return;  // uniform over the CTA
  const geo::Problem& pr = p.pr;

  auto q_row_offset = [&](int r) { return TS::q_row_offset(pr, cs, r); };
  KVTileWalker<Traits> kv_walker;
  auto load_kv = [&](int stage) {
    Element* k_dst = sK + stage * kKVElems;
    Element* v_dst = sV + stage * kKVElems;
    int32_t org[3];
    kv_walker.origin(cs, org);
    bool tma = false;  // uniform over the CTA
    if constexpr (kTma) {
      tma = p.kv_tma && kv_walker.n < cs.n_window_tiles && kv_tile_fits_tma<Traits>(pr, org);
      if (tid == 0) {
        kv_stages.arrive(stage, tma ? kv_tile_tma_bytes<Traits>() : 0);
        if (tma) load_kv_tma<Traits>(p.kv_maps, pr, cs, org, k_dst, v_dst, &kv_stages.bar[stage]);
      }
    }
    if (!tma) TS::load_kv(pr, cs, kv_walker.n, org, p.k, p.v, p.add_k, p.add_v, k_dst, v_dst, tid);
    kv_walker.publish(pr, cs, org, cs.flags[stage], tid);
    kv_walker.advance(cs);
  };

  // Prologue: Q, dO, row windows, K/V tile 0.
  load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(sQ, static_cast<const Element*>(p.q), tid,
                                                                    q_row_offset);
  load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(sdO, static_cast<const Element*>(p.d_out), tid,
                                                                    q_row_offset);
  RowWindowTable<Traits>::store(pr, cs, s_win, tid);
  load_kv(0);
  cp_async_commit();

  Gemm gemm(tid);
  OutGemm out_gemm(tid);
  auto acc_dq = out_gemm.template acc<kBlockM, kDOut>();

  // Per-row lse (log2 domain) and delta; rows outside the group get lse = +inf (P = 0).
  Tensor acc_dq_rc = make_tensor(acc_dq.data(), row_col(acc_dq.layout()));
  constexpr int kRows = decltype(size<0>(acc_dq_rc))::value;
  float lse2[kRows], dlt[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t off = q_row_offset(acc_row<Traits::kNWarps>(r, warp, lane));
    lse2[r] = off >= 0 ? p.lse[off / kD] * kLog2e : INFINITY;
    dlt[r] = off >= 0 ? p.delta[off / kD] : 0.f;
  }

  const int32_t n_tiles = __shfl_sync(0xffffffffu, cs.n_tiles, 0);
  for (int pass = 0; pass < Traits::kDPasses; ++pass) {
    clear(acc_dq);
    // Not unrolled: on Hopper the dP wait after the exponentials branches on n's parity, which an
    // unroll by two would make constant (ptxas would then hoist the wait above that work again).
#pragma unroll 1
    for (int32_t n = 0; n < n_tiles; ++n) {
      const int stage = n & 1;
      cp_async_wait<0>();
      if constexpr (kTma) kv_stages.wait(stage);
      gemm.fence_smem_writes();
      __syncthreads();  // K/V(n) visible; every warp done with stage (n + 1) & 1
      if (n + 1 < n_tiles) {
        load_kv(stage ^ 1);  // tile n + 1
        cp_async_commit();
      }
      const TileFlags& tf = cs.flags[stage];
      const uint32_t active = __shfl_sync(0xffffffffu, tf.active, 0);
      if (!((active >> group_warp0) & kGroupMask)) continue;  // uniform over the MMA's warps
      // A warp without any key of the tile in its windows masks all of it (its full bit is clear).
      const bool full = (tf.full >> warp) & 1u;

      auto acc_s = gemm.template acc<kBlockM, kBlockN>();
      auto acc_dp = gemm.template acc<kBlockM, kBlockN>();
      gemm.template ss<kBlockM, kBlockN>(acc_s, sQ, sK + stage * kKVElems);
      gemm.template ss<kBlockM, kBlockN>(acc_dp, sdO, sV + stage * kKVElems);
      gemm.template wait<1>(acc_s);  // S done, dP may still run

      Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
      Tensor dp_rc = make_tensor(acc_dp.data(), row_col(acc_dp.layout()));
      if (!full) {
        const int32_t org[3] = {tf.org[0], tf.org[1], tf.org[2]};
        mask_tile<Traits>(s_rc, s_win, pr, cs.n_window_tiles, n, org, warp, lane);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int c = 0; c < size<1>(s_rc); ++c) s_rc(r, c) = fast_exp2(s_rc(r, c) * p.scale_log2 - lse2[r]);
      }
      gemm.template wait_after<0>(n, acc_dp);  // dP ran beside the exponentials
      // dS = P (dP - delta), in place of S.
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int c = 0; c < size<1>(s_rc); ++c) s_rc(r, c) *= dp_rc(r, c) - dlt[r];
      }
      Tensor rdS = convert_fragment<Element>(acc_s);
      // dQ[:, this pass's columns] += dS K[:, those columns] (a (kBlockN, kDOut) tile: SmemLayoutRows)
      out_gemm.template rs<kBlockN>(acc_dq, rdS, sK + stage * kKVElems + pass * kBlockN * kDOut);
      out_gemm.template wait<0>(acc_dq, rdS);  // stage is read by nothing after this
    }

    // Epilogue: dQ * scale -> smem -> rows of dq (one pass: over Q; more: over the K stages, free now,
    // then K/V tile 0 again for the next pass).
    cp_async_wait<0>();
    __syncthreads();
    Element* s_out = Traits::kDPasses == 1 ? sQ : sK;
    static_assert(Traits::kDPasses == 1 || kBlockM * kDOut <= 2 * kKVElems, "dQ staging over the K stages");
    using OutLayout = typename OutTraits::template SmemLayoutRows<kBlockM>;
    acc_to_smem<Traits::kNWarps, Element, OutLayout>(acc_dq_rc, s_out, p.scale, warp, lane);
    __syncthreads();
    store_rows<OutTraits, kBlockM, OutLayout>(static_cast<Element*>(p.dq) + pass * kDOut, s_out, tid,
                                              q_row_offset);
    if (pass + 1 < Traits::kDPasses) {
      __syncthreads();  // s_out read out before K/V tile 0 lands there
      kv_walker = KVTileWalker<Traits>{};
      load_kv(0);
      cp_async_commit();
    }
  }
#endif
}

}  // namespace fused
}  // namespace jax_na
