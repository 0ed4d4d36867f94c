// The fused neighborhood-attention forward kernel (portable sm80-class path).
//
// One CTA = one Q tile (128 queries of one batch item, head and dilation group). Main loop over the
// KV tiles of the CTA's window box, then the additional-keys tiles, FlashAttention-2 style with
// K/V double-buffered (one barrier per tile):
//   wait K/V(n); barrier; issue K/V(n+1) | S = Q K^T | mask, online softmax, O += P V
// Each warp skips the tiles that miss all of its queries' windows and skips the mask arithmetic on
// tiles that lie inside all of them. Epilogue: O / rowsum -> smem -> 16-byte stores; lse per row.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

#include <cstdint>

#include "fused/copy.cuh"
#include "fused/epilogue.cuh"
#include "fused/gemm.cuh"
#include "fused/kernel_traits.cuh"
#include "fused/mask.cuh"
#include "fused/softmax.cuh"
#include "fused/tile_scheduler.cuh"
#include "geometry/window.cuh"

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

  constexpr int kKVElems = kBlockN * kD;
  extern __shared__ __align__(128) char smem_raw[];
  Element* sQ_ptr = reinterpret_cast<Element*>(smem_raw);
  Element* sK_ptr = reinterpret_cast<Element*>(smem_raw + Traits::kSmemQ);                        // 2 stages
  Element* sV_ptr = reinterpret_cast<Element*>(smem_raw + Traits::kSmemQ + 2 * Traits::kSmemKV);  // 2 stages
  int2* s_win = reinterpret_cast<int2*>(smem_raw + Traits::kSmemQ + 4 * Traits::kSmemKV);
  static_assert(sizeof(CtaSchedule) <= Traits::kSmemSched, "schedule smem");
  CtaSchedule& cs =
      *reinterpret_cast<CtaSchedule*>(smem_raw + Traits::kSmemQ + 4 * Traits::kSmemKV + Traits::kSmemWin);
  using TS = TileScheduler<Traits>;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;

  TS::compute(p.pr, p.q_tiles, cs, tid);
  __syncthreads();
  if (!cs.live) return;  // uniform over the CTA
  const geo::Problem& pr = p.pr;

  auto q_row_offset = [&](int r) { return TS::q_row_offset(pr, cs, r); };
  auto load_kv = [&](int32_t n, int stage) {
    TS::load_kv(pr, cs, n, p.k, p.v, p.add_k, p.add_v, sK_ptr + stage * kKVElems, sV_ptr + stage * kKVElems, tid);
  };

  // Prologue: Q tile, per-row windows, K/V tile 0.
  load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(sQ_ptr, static_cast<const Element*>(p.q), tid,
                                                                    q_row_offset);
  store_row_windows<Traits>(pr, cs, s_win, tid);
  load_kv(0, 0);
  cp_async_commit();

  Tensor sQ = make_tensor(make_smem_ptr(sQ_ptr), typename Traits::SmemLayoutQ{});
  Tensor sK0 = make_tensor(make_smem_ptr(sK_ptr), typename Traits::SmemLayoutKV{});
  Tensor sVt_plain = make_tensor(make_smem_ptr(sV_ptr), make_layout(Shape<Int<kD>, Int<kBlockN>>{}));

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor rQ = thr_mma.partition_fragment_A(sQ);         // (MMA, MMA_M, MMA_K)
  Tensor rK = thr_mma.partition_fragment_B(sK0);        // (MMA, MMA_N, MMA_K)
  Tensor rVt = thr_mma.partition_fragment_B(sVt_plain);  // (MMA, MMA_N=D/8, MMA_K=kBlockN/16)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);

  auto copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tsQ = thr_copy_q.partition_S(sQ);
  auto copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  auto copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);

  Tensor acc_o_rc = make_tensor(acc_o.data(), row_col(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  OnlineSoftmax<kRows> softmax;
  softmax.init();

  for (int32_t n = 0; n < cs.n_tiles; ++n) {
    const int stage = n & 1;
    cp_async_wait<0>();
    __syncthreads();  // K/V(n) (and Q, windows) visible; every warp done with stage (n + 1) & 1
    if (n + 1 < cs.n_tiles) {
      load_kv(n + 1, stage ^ 1);  // overlaps with this tile's math
      cp_async_commit();
    }
    int32_t org[3];
    bool active, full;
    TS::tile_info(pr, cs, n, warp, org, &active, &full);
    if (!active) continue;

    Tensor sK = make_tensor(make_smem_ptr(sK_ptr + stage * kKVElems), typename Traits::SmemLayoutKV{});
    Tensor sVt = make_tensor(make_smem_ptr(sV_ptr + stage * kKVElems), typename Traits::SmemLayoutVt{});
    Tensor tsK = thr_copy_k.partition_S(sK);
    Tensor tsVt = thr_copy_v.partition_S(sVt);
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_ss(tiled_mma, acc_s, rQ, rK, tsQ, tsK, copy_q, copy_k, thr_copy_q, thr_copy_k);

    Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
    if (!full) mask_tile<Traits>(s_rc, s_win, pr, cs, n, org, warp, lane);
    softmax.update(s_rc, acc_o_rc, p.scale_log2);

    // P (registers, converted to Element) . V
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor rPa = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
    gemm_rs(tiled_mma, acc_o, rPa, rVt, tsVt, copy_v, thr_copy_v);
  }

  // Epilogue.
  float lse[kRows];
  softmax.finalize(acc_o_rc, p.scale, lse);
  cp_async_wait<0>();
  __syncthreads();  // sQ is reused for O
  Element* sO_ptr = sQ_ptr;
  acc_to_smem<Traits::kNWarps, Element, typename Traits::SmemLayoutQ>(acc_o_rc, sO_ptr, 1.f, warp, lane);
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t off = q_row_offset(acc_row<Traits::kNWarps>(r, warp, lane));
      if (off >= 0) p.lse[off / kD] = lse[r];  // [B, N, H] row index = element offset / D
    }
  }
  __syncthreads();
  store_rows<Traits, kBlockM, typename Traits::SmemLayoutQ>(static_cast<Element*>(p.out), sO_ptr, tid, q_row_offset);
#endif
}

}  // namespace fused
}  // namespace jax_na
