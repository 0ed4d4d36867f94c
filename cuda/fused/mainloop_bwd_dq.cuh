// Fused backward, query-stationary part: dQ (portable sm80-class path).
//
// One CTA = one Q tile, the same tiles and KV-tile walk as the forward (TileScheduler, per-warp
// skipping, mask-free full tiles). Per KV tile:
//   S = Q K^T, dP = dO V^T, P = exp(scale S - lse) (masked), dS = P (dP - delta), dQ += dS K
// with K/V double-buffered (tile n+1 loads while tile n computes). dQ = scale * sum; no atomics, so
// the result is deterministic. dK/dV come from the key-stationary kernel (mainloop_bwd_dkdv.cuh).
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>

#include "fused/copy.cuh"
#include "fused/epilogue.cuh"
#include "fused/gemm.cuh"
#include "fused/kernel_traits.cuh"
#include "fused/mask.cuh"
#include "fused/params.cuh"
#include "fused/softmax.cuh"
#include "fused/tile_scheduler.cuh"

namespace jax_na {
namespace fused {

// Shared memory of the dQ kernel: Q, dO, two stages of K and V, row windows, schedule.
template <class Traits>
struct DqSmem {
  static constexpr int kQ = 0;
  static constexpr int kDO = kQ + Traits::kSmemQ;
  static constexpr int kK = kDO + Traits::kSmemQ;         // 2 stages
  static constexpr int kV = kK + 2 * Traits::kSmemKV;     // 2 stages
  static constexpr int kWin = kV + 2 * Traits::kSmemKV;
  static constexpr int kSched = kWin + Traits::kSmemWin;
  static constexpr int kBytes = kSched + Traits::kSmemSched;
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1) fused_bwd_dq_kernel(const __grid_constant__ BwdKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using Element = typename Traits::Element;
  using L = DqSmem<Traits>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kKVElems = kBlockN * kD;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) char smem_raw[];
  Element* sQ_ptr = reinterpret_cast<Element*>(smem_raw + L::kQ);
  Element* sdO_ptr = reinterpret_cast<Element*>(smem_raw + L::kDO);
  Element* sK_ptr = reinterpret_cast<Element*>(smem_raw + L::kK);
  Element* sV_ptr = reinterpret_cast<Element*>(smem_raw + L::kV);
  int2* s_win = reinterpret_cast<int2*>(smem_raw + L::kWin);
  static_assert(sizeof(CtaSchedule) <= Traits::kSmemSched, "schedule smem");
  CtaSchedule& cs = *reinterpret_cast<CtaSchedule*>(smem_raw + L::kSched);
  using TS = TileScheduler<Traits>;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  TS::compute(p.pr, p.q_tiles, cs, tid);
  __syncthreads();
  if (!cs.live) return;  // uniform over the CTA
  const geo::Problem& pr = p.pr;

  auto q_row_offset = [&](int r) { return TS::q_row_offset(pr, cs, r); };
  KVTileWalker<Traits> kv_walker;
  auto load_kv = [&](int stage) {
    kv_walker.issue(pr, cs, p.k, p.v, p.add_k, p.add_v, sK_ptr + stage * kKVElems, sV_ptr + stage * kKVElems,
                    cs.flags[stage], tid);
  };

  // Prologue: Q, dO, row windows, K/V tile 0.
  load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(sQ_ptr, static_cast<const Element*>(p.q), tid,
                                                                    q_row_offset);
  load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(
      sdO_ptr, static_cast<const Element*>(p.d_out), tid, q_row_offset);
  store_row_windows<Traits>(pr, cs, s_win, tid);
  load_kv(0);
  cp_async_commit();

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(sdO_ptr), typename Traits::SmemLayoutQ{});
  Tensor sK0 = make_tensor(make_smem_ptr(sK_ptr), typename Traits::SmemLayoutKV{});
  Tensor sKt_plain = make_tensor(make_smem_ptr(sK_ptr), make_layout(Shape<Int<kD>, Int<kBlockN>>{}));
  Tensor rQ = thr_mma.partition_fragment_A(sQ);
  Tensor rdO = thr_mma.partition_fragment_A(sdO);
  Tensor rK = thr_mma.partition_fragment_B(sK0);
  Tensor rV = thr_mma.partition_fragment_B(sK0);
  Tensor rKt = thr_mma.partition_fragment_B(sKt_plain);
  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_dq);

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_a = copy_a.get_thread_slice(tid);
  Tensor tsQ = thr_copy_a.partition_S(sQ);
  Tensor tsdO = thr_copy_a.partition_S(sdO);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto thr_copy_bt = copy_bt.get_thread_slice(tid);

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

  for (int32_t n = 0; n < cs.n_tiles; ++n) {
    const int stage = n & 1;
    cp_async_wait<0>();
    __syncthreads();  // K/V(n) visible; every warp done with stage (n + 1) & 1
    if (n + 1 < cs.n_tiles) {
      load_kv(stage ^ 1);  // tile n + 1
      cp_async_commit();
    }
    const TileFlags& tf = cs.flags[stage];
    if (!((tf.active >> warp) & 1u)) continue;
    const bool full = (tf.full >> warp) & 1u;

    Tensor sK = make_tensor(make_smem_ptr(sK_ptr + stage * kKVElems), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(sV_ptr + stage * kKVElems), typename Traits::SmemLayoutKV{});
    Tensor sKt = make_tensor(make_smem_ptr(sK_ptr + stage * kKVElems), typename Traits::SmemLayoutVt{});
    Tensor tsK = thr_copy_b.partition_S(sK);
    Tensor tsV = thr_copy_b.partition_S(sV);
    Tensor tsKt = thr_copy_bt.partition_S(sKt);

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(tiled_mma, acc_s, rQ, rK, tsQ, tsK, copy_a, copy_b, thr_copy_a, thr_copy_b);
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_ss(tiled_mma, acc_dp, rdO, rV, tsdO, tsV, copy_a, copy_b, thr_copy_a, thr_copy_b);

    Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), row_col(acc_dp.layout()));
    if (!full) {
      const int32_t org[3] = {tf.org[0], tf.org[1], tf.org[2]};
      mask_tile<Traits>(s_rc, s_win, pr, cs, n, org, warp, lane);
    }
    // dS = P (dP - delta), in place of S.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < size<1>(s_rc); ++c) {
        const float pr_ = fast_exp2(s_rc(r, c) * p.scale_log2 - lse2[r]);
        s_rc(r, c) = pr_ * (dp_rc(r, c) - dlt[r]);
      }
    }
    Tensor rdS = convert_fragment<Element>(acc_s);
    Tensor rdSa = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));
    gemm_rs(tiled_mma, acc_dq, rdSa, rKt, tsKt, copy_bt, thr_copy_bt);
  }

  // Epilogue: dQ * scale -> smem (sQ) -> rows of dq.
  cp_async_wait<0>();
  __syncthreads();
  acc_to_smem<Traits::kNWarps, Element, typename Traits::SmemLayoutQ>(acc_dq_rc, sQ_ptr, p.scale, warp, lane);
  __syncthreads();
  store_rows<Traits, kBlockM, typename Traits::SmemLayoutQ>(static_cast<Element*>(p.dq), sQ_ptr, tid, q_row_offset);
#endif
}

}  // namespace fused
}  // namespace jax_na
