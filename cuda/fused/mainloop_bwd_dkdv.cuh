// Fused backward, key-stationary part: dK and dV (portable sm80-class path).
//
// One CTA = one KV tile of 64 keys (one batch item, kv head and dilation group; or 64 additional
// keys). K and V stay in shared memory; the CTA walks the Q tiles of its inverse neighbourhood for
// each of the G query heads of its kv head (KVScheduler), Q/dO/lse/delta double-buffered. Per Q tile,
// with the keys as MMA rows:
//   S^T = K Q^T, dP^T = V dO^T, P^T = exp(scale S^T - lse) (masked), dV += P^T dO,
//   dS^T = P^T (dP^T - delta), dK += dS^T Q
// dK = scale * sum. Every key belongs to exactly one CTA: no atomics, deterministic, GQA reduced
// in registers. Query columns outside the group load as zeros (Q = dO = lse = delta = 0), which
// makes their dV and dK contributions exactly zero without a mask.
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

// Shared memory of the dK/dV kernel: K, V, two stages of (Q, dO, lse, delta, column windows), schedule.
template <class Traits>
struct DkdvSmem {
  static constexpr int kK = 0;
  static constexpr int kV = kK + Traits::kSmemKV;
  static constexpr int kStage = kV + Traits::kSmemKV;  // stage s at kStage + s * Traits::kSmemStage
  static constexpr int kQ = 0;                          // offsets inside a stage
  static constexpr int kDO = kQ + Traits::kSmemQ;
  static constexpr int kLse = kDO + Traits::kSmemQ;
  static constexpr int kDelta = kLse + Traits::kBlockM * 4;
  static constexpr int kWin = kDelta + Traits::kBlockM * 4;
  static constexpr int kSched = kStage + 2 * Traits::kSmemStage;
  static constexpr int kBytes = kSched + Traits::kSmemSched;
  static_assert(kBytes == Traits::kSmemBytes, "smem plan");
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    fused_bwd_dkdv_kernel(const __grid_constant__ BwdKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using Element = typename Traits::Element;
  using L = DkdvSmem<Traits>;
  using KS = KVScheduler<Traits>;
  constexpr int kRank = Traits::kRank;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) char smem_raw[];
  Element* sK_ptr = reinterpret_cast<Element*>(smem_raw + L::kK);
  Element* sV_ptr = reinterpret_cast<Element*>(smem_raw + L::kV);
  static_assert(sizeof(KVSchedule) <= Traits::kSmemSched, "schedule smem");
  KVSchedule& ks = *reinterpret_cast<KVSchedule*>(smem_raw + L::kSched);
  auto stage_ptr = [&](int s, int off) { return smem_raw + L::kStage + s * Traits::kSmemStage + off; };

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  KS::compute(p.pr, p.kv_tiles, p.n_window_ctas, ks, tid);
  __syncthreads();
  if (!ks.live) return;  // uniform over the CTA
  const geo::Problem& pr = p.pr;
  const int32_t G = pr.groups();
  const int32_t n_iters = G * ks.n_q_tiles;

  auto kv_off = [&](int r) { return KS::kv_row_offset(pr, ks, r); };
  load_rows<Traits, kBlockN, Element, typename Traits::SmemLayoutKV>(
      sK_ptr, static_cast<const Element*>(ks.is_add ? p.add_k : p.k), tid, kv_off);
  load_rows<Traits, kBlockN, Element, typename Traits::SmemLayoutKV>(
      sV_ptr, static_cast<const Element*>(ks.is_add ? p.add_v : p.v), tid, kv_off);

  // Q tile i (query head hkv * G + i / n_q_tiles): origin in group positions, or token tile origin.
  auto q_origin = [&](int32_t i, int32_t org[3]) {
    const int32_t t = i % ks.n_q_tiles;
    if (ks.is_add) {
      org[0] = t * kBlockM;
      org[1] = org[2] = 0;
    } else {
      KS::q_tile_origin(ks, t, org);
    }
  };
  // Loads Q tile i into stage s: Q, dO rows, lse/delta per query, and each query's window.
  auto issue_q = [&](int32_t i, int s) {
    int32_t org[3];
    q_origin(i, org);
    const int64_t h = static_cast<int64_t>(ks.hkv) * G + i / ks.n_q_tiles;
    auto q_off = [&](int c) -> int64_t {
      const int64_t tok = KS::q_token(pr, ks, org, c);
      return tok >= 0 ? geo::offset(ks.b, tok, h, 0, pr.N, pr.H, kD) : int64_t{-1};
    };
    load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(
        reinterpret_cast<Element*>(stage_ptr(s, L::kQ)), static_cast<const Element*>(p.q), tid, q_off);
    load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(
        reinterpret_cast<Element*>(stage_ptr(s, L::kDO)), static_cast<const Element*>(p.d_out), tid, q_off);
    if (tid < kBlockM) {
      const int64_t tok = KS::q_token(pr, ks, org, tid);
      const int64_t row = tok >= 0 ? (ks.b * pr.N + tok) * pr.H + h : 0;
      cp_async_4(stage_ptr(s, L::kLse) + 4 * tid, p.lse + row, tok >= 0);
      cp_async_4(stage_ptr(s, L::kDelta) + 4 * tid, p.delta + row, tok >= 0);
      if (!ks.is_add) {
        int2* win = reinterpret_cast<int2*>(stage_ptr(s, L::kWin));
#pragma unroll
        for (int a = 0; a < kRank; ++a) {
          const int32_t pos = org[a] + Traits::QTile::coord(tid, a);
          int2 w = make_int2(0, 0);  // outside the group: empty window
          if (pos < ks.Lg[a]) {
            const int32_t st = geo::window_start(pr.axis[a], pos, ks.Lg[a]);
            w = make_int2(st, geo::window_end(pr.axis[a], pos, ks.Lg[a], st));
          }
          win[a * kBlockM + tid] = w;
        }
      }
    }
  };
  if (n_iters > 0) issue_q(0, 0);
  cp_async_commit();

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor sK = make_tensor(make_smem_ptr(sK_ptr), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(sV_ptr), typename Traits::SmemLayoutKV{});
  Tensor sQ0 = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(stage_ptr(0, L::kQ))),
                           typename Traits::SmemLayoutQ{});
  Tensor sQt_plain = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(stage_ptr(0, L::kQ))),
                                 make_layout(Shape<Int<kD>, Int<kBlockM>>{}));
  Tensor rK = thr_mma.partition_fragment_A(sK);
  Tensor rV = thr_mma.partition_fragment_A(sV);
  Tensor rQ = thr_mma.partition_fragment_B(sQ0);
  Tensor rdO = thr_mma.partition_fragment_B(sQ0);
  Tensor rQt = thr_mma.partition_fragment_B(sQt_plain);
  Tensor rdOt = thr_mma.partition_fragment_B(sQt_plain);
  Tensor acc_dk = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kD>>{});
  Tensor acc_dv = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kD>>{});
  clear(acc_dk);
  clear(acc_dv);

  auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_a = copy_a.get_thread_slice(tid);
  Tensor tsK = thr_copy_a.partition_S(sK);
  Tensor tsV = thr_copy_a.partition_S(sV);
  auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_b = copy_b.get_thread_slice(tid);
  auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto thr_copy_bt = copy_bt.get_thread_slice(tid);

  for (int32_t i = 0; i < n_iters; ++i) {
    const int s = i & 1;
    cp_async_wait<0>();
    __syncthreads();  // stage s (and K, V) visible; every warp done with stage s ^ 1
    if (i + 1 < n_iters) {
      issue_q(i + 1, s ^ 1);
      cp_async_commit();
    }
    int32_t org[3];
    q_origin(i, org);
    const bool full = ks.is_add || KS::q_tile_full(ks, org);

    Element* q_ptr = reinterpret_cast<Element*>(stage_ptr(s, L::kQ));
    Element* do_ptr = reinterpret_cast<Element*>(stage_ptr(s, L::kDO));
    const float* s_lse = reinterpret_cast<const float*>(stage_ptr(s, L::kLse));
    const float* s_dlt = reinterpret_cast<const float*>(stage_ptr(s, L::kDelta));
    Tensor sQ = make_tensor(make_smem_ptr(q_ptr), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(do_ptr), typename Traits::SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(q_ptr), typename Traits::SmemLayoutQt{});
    Tensor sdOt = make_tensor(make_smem_ptr(do_ptr), typename Traits::SmemLayoutQt{});
    Tensor tsQ = thr_copy_b.partition_S(sQ);
    Tensor tsdO = thr_copy_b.partition_S(sdO);
    Tensor tsQt = thr_copy_bt.partition_S(sQt);
    Tensor tsdOt = thr_copy_bt.partition_S(sdOt);

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_s);
    gemm_ss(tiled_mma, acc_s, rK, rQ, tsK, tsQ, copy_a, copy_b, thr_copy_a, thr_copy_b);
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockN>, Int<kBlockM>>{});
    clear(acc_dp);
    gemm_ss(tiled_mma, acc_dp, rV, rdO, tsV, tsdO, copy_a, copy_b, thr_copy_a, thr_copy_b);

    Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), row_col(acc_dp.layout()));
    constexpr int kRows = decltype(size<0>(s_rc))::value;
    constexpr int kCols = decltype(size<1>(s_rc))::value;
    if (!full)
      mask_inverse_tile<Traits>(s_rc, reinterpret_cast<const int2*>(stage_ptr(s, L::kWin)), ks.k0, warp, lane);
    // P^T in place of S^T; dS^T in place of dP^T.
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = acc_col(c, lane);
      const float lse2 = s_lse[col] * kLog2e;
      const float dlt = s_dlt[col];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const float pv = fast_exp2(s_rc(r, c) * p.scale_log2 - lse2);
        s_rc(r, c) = pv;
        dp_rc(r, c) = pv * (dp_rc(r, c) - dlt);
      }
    }
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor rPa = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
    gemm_rs(tiled_mma, acc_dv, rPa, rdOt, tsdOt, copy_bt, thr_copy_bt);
    Tensor rdS = convert_fragment<Element>(acc_dp);
    Tensor rdSa = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));
    gemm_rs(tiled_mma, acc_dk, rdSa, rQt, tsQt, copy_bt, thr_copy_bt);
  }

  // Epilogue: dK * scale and dV -> smem (over K and V) -> rows of dk/dv (or d_add_k/d_add_v).
  cp_async_wait<0>();
  __syncthreads();
  Tensor dk_rc = make_tensor(acc_dk.data(), row_col(acc_dk.layout()));
  Tensor dv_rc = make_tensor(acc_dv.data(), row_col(acc_dv.layout()));
  acc_to_smem<Traits::kNWarps, Element, typename Traits::SmemLayoutKV>(dk_rc, sK_ptr, p.scale, warp, lane);
  acc_to_smem<Traits::kNWarps, Element, typename Traits::SmemLayoutKV>(dv_rc, sV_ptr, 1.f, warp, lane);
  __syncthreads();
  store_rows<Traits, kBlockN, typename Traits::SmemLayoutKV>(
      static_cast<Element*>(ks.is_add ? p.d_add_k : p.dk), sK_ptr, tid, kv_off);
  store_rows<Traits, kBlockN, typename Traits::SmemLayoutKV>(
      static_cast<Element*>(ks.is_add ? p.d_add_v : p.dv), sV_ptr, tid, kv_off);
#endif
}

}  // namespace fused
}  // namespace jax_na
