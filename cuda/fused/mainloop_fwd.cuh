// The fused neighborhood-attention forward kernel (portable sm80-class path).
//
// One CTA = one Q tile (128 queries of one batch item, head and dilation group). Main loop over the
// KV tiles of the CTA's window box, then the additional-keys tiles, FlashAttention-2 style with
// K/V double-buffered (one barrier per tile):
//   wait K/V(n); barrier; issue K/V(n+1) | S = Q K^T | mask, online softmax, O += P V
// Each warp skips the tiles that miss all of its queries' windows and skips the mask arithmetic on
// tiles that lie inside all of them; in the 16-bit one-pass kernels (kernel_traits.cuh: WithHalfTiles)
// it computes over one half of a tile (along axis 0) where its windows meet only that half. Prologue and
// epilogue: cta_fwd.cuh.
// Head dims over 128 walk the KV tiles once per 128 output columns (Traits::kDPasses), recomputing S
// and the softmax: 256 columns of O accumulators would not fit the register file beside S.
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>

#include "fused/cta_fwd.cuh"
#include "fused/epilogue.cuh"
#include "fused/gemm.cuh"
#include "fused/kernel_traits.cuh"
#include "fused/mask.cuh"
#include "fused/softmax.cuh"
#include "fused/tile_scheduler.cuh"

namespace jax_na {
namespace fused {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, Traits::kMinBlocks) fused_fwd_kernel(const __grid_constant__ FwdKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;
  static_assert(Traits::kStages == 2, "one barrier per tile needs two stages");

  extern __shared__ __align__(128) char smem_raw[];
  const FwdSmem<Traits> sm(smem_raw);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

#if defined(JNA_FWD_TRACE)  // phase timestamps of thread 0 (trace.cuh; test_fused_fwd.cu --trace)
  CtaTrace* tr = tid == 0 ? trace_slot(p.trace) : nullptr;
  trace_begin(tr);
#endif
  if (!fwd_prologue<Traits>(p, sm, tid)) return;
  JNA_TRACE(tr, kTraceScheduled);
  const CtaSchedule& cs = *sm.cs;
  KVTileWalker<Traits> kv_walker;
  fwd_issue_kv<Traits>(p, sm, kv_walker, 0, tid);
  cp_async_commit();

  // One pass's output columns: the (kBlockN, kDOut) V tile at kBlockN * col0 of a stage.
  using OutTraits = typename Traits::OutTraits;
  constexpr int kDOut = OutTraits::kHeadDim;
  static_assert(kDOut == Traits::kHeadDimOut && kD == kDOut * Traits::kDPasses, "output columns per pass");

  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Traits::SmemLayoutQ{});
  Tensor sK0 = make_tensor(make_smem_ptr(sm.k), typename Traits::SmemLayoutKV{});
  Tensor sVt_plain = make_tensor(make_smem_ptr(sm.v), make_layout(Shape<Int<kDOut>, Int<kBlockN>>{}));

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor rQ = thr_mma.partition_fragment_A(sQ);         // (MMA, MMA_M, MMA_K)
  Tensor rK = thr_mma.partition_fragment_B(sK0);        // (MMA, MMA_N, MMA_K)
  Tensor rVt = thr_mma.partition_fragment_B(sVt_plain);  // (MMA, MMA_N=kDOut/8, MMA_K=kBlockN/16)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kDOut>>{});

  auto copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tsQ = thr_copy_q.partition_S(sQ);
  auto copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  auto copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);

  Tensor acc_o_rc = make_tensor(acc_o.data(), row_col(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;

  for (int pass = 0; pass < Traits::kDPasses; ++pass) {
    const int col0 = pass * kDOut;
    clear(acc_o);
    OnlineSoftmax<kRows> softmax;
    softmax.init();
    for (int32_t n = 0; n < cs.n_tiles; ++n) {
      const int stage = n & 1;
      cp_async_wait<0>();
      __syncthreads();  // K/V(n) (and Q, windows, flags) visible; every warp done with stage (n + 1) & 1
      if (n == 0) JNA_TRACE(tr, kTraceFirstKV);
      if (n + 1 < cs.n_tiles) {
        fwd_issue_kv<Traits>(p, sm, kv_walker, stage ^ 1, tid);  // tile n + 1: overlaps with this tile's math
        cp_async_commit();
      }
      const TileFlags& tf = cs.flags[stage];
      if (!((tf.active >> warp) & 1u)) continue;
      const bool full = (tf.full >> warp) & 1u;

      if constexpr (Traits::kHalfTiles) {
        // A warp whose windows meet only one half of the tile along axis 0 (a boundary tile of its
        // window box: masked) computes over that half alone: the steps below on the half's keys.
        const bool lo = (tf.active >> (kHalfLoShift + warp)) & 1u;
        const bool hi = (tf.active >> (kHalfHiShift + warp)) & 1u;
        if (lo != hi) {
          const int half = hi ? 1 : 0;
          constexpr int kHalf = Traits::kBlockNHalf;
          Tensor sK = make_tensor(make_smem_ptr(sm.k_stage(stage) + half * Traits::kHalfElems),
                                  typename Traits::SmemLayoutKVHalf{});
          Tensor sVt = make_tensor(make_smem_ptr(sm.v_stage(stage) + half * Traits::kHalfElems),
                                   typename Traits::SmemLayoutVtHalf{});
          Tensor rKh = thr_mma.partition_fragment_B(sK);
          Tensor rVth = thr_mma.partition_fragment_B(
              make_tensor(make_smem_ptr(sm.v), make_layout(Shape<Int<kD>, Int<kHalf>>{})));
          Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHalf>>{});
          clear(acc_s);
          gemm_ss(tiled_mma, acc_s, rQ, rKh, tsQ, thr_copy_k.partition_S(sK), copy_q, copy_k, thr_copy_q, thr_copy_k);
          Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
          const int32_t org[3] = {tf.org[0] + half * Traits::HalfKVTile::extent(0), tf.org[1], tf.org[2]};
          mask_window_tile<Traits, typename Traits::HalfKVTile>(s_rc, sm.win, org, warp, lane);
          softmax.update(s_rc, acc_o_rc, p.scale_log2);
          Tensor rP = convert_fragment<Element>(acc_s);
          Tensor rPa = make_tensor(rP.data(), acc_to_a_layout<sizeof(Element)>(rP.layout()));
          gemm_rs(tiled_mma, acc_o, rPa, rVth, thr_copy_v.partition_S(sVt), copy_v, thr_copy_v);
          continue;
        }
      }

      Tensor sK = make_tensor(make_smem_ptr(sm.k_stage(stage)), typename Traits::SmemLayoutKV{});
      Tensor sVt = make_tensor(make_smem_ptr(sm.v_stage(stage) + kBlockN * col0), typename OutTraits::SmemLayoutVt{});
      Tensor tsK = thr_copy_k.partition_S(sK);
      Tensor tsVt = thr_copy_v.partition_S(sVt);
      Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_s);
      gemm_ss(tiled_mma, acc_s, rQ, rK, tsQ, tsK, copy_q, copy_k, thr_copy_q, thr_copy_k);

      Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
      if (!full) {
        const int32_t org[3] = {tf.org[0], tf.org[1], tf.org[2]};
        mask_tile<Traits>(s_rc, sm.win, p.pr, cs.n_window_tiles, n, org, warp, lane);
      }
      softmax.update(s_rc, acc_o_rc, p.scale_log2);

      // P (registers, converted to Element) . V
      Tensor rP = convert_fragment<Element>(acc_s);
      Tensor rPa = make_tensor(rP.data(), acc_to_a_layout<sizeof(Element)>(rP.layout()));
      gemm_rs(tiled_mma, acc_o, rPa, rVt, tsVt, copy_v, thr_copy_v);
    }

    JNA_TRACE(tr, kTraceLoopDone);
    float lse[kRows];
    softmax.finalize(acc_o_rc, p.scale, lse);
    constexpr bool kOnePass = Traits::kDPasses == 1;
    static_assert(kOnePass || kBlockM * kDOut <= Traits::kStages * kBlockN * kD, "O staging over the K stages");
    // One pass: O staged over Q. More: over the K stages (free now; Q serves the next pass), the
    // lse written once.
    fwd_epilogue<Traits, OutTraits>(p, sm, acc_o_rc, lse, tid, warp, lane, [] { __syncthreads(); },
                                    kOnePass ? sm.q : sm.k, col0, pass == 0);
#if defined(JNA_FWD_TRACE)
    trace_end(tr, cs.n_tiles);
#endif
    if (pass + 1 < Traits::kDPasses) {
      __syncthreads();  // the staging read out before K/V tile 0 lands there
      kv_walker = KVTileWalker<Traits>{};
      fwd_issue_kv<Traits>(p, sm, kv_walker, 0, tid);
      cp_async_commit();
    }
  }
#endif
}

}  // namespace fused
}  // namespace jax_na
