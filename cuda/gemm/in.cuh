// IN (inverse neighbourhood): out[k] = alpha * sum over the queries r whose window holds key k (and
// over the query heads of k's kv head) of weights[r, w(r, k)] a[r], on tensor cores.
//
// One CTA = one KV tile of 64 keys (one batch item, kv head and dilation group); it walks the Q tiles
// of its keys' inverse neighbourhood for each query head of the group (fused/tile_scheduler.cuh:
// KVScheduler, QTileWalker, as the fused backward's dK/dV kernel), the query rows and their weight-row
// offsets and windows double-buffered. Per Q tile: the (keys x queries) operand P^T is gathered from
// the weight rows into A-operand registers (0 for a key outside a query's window), then acc += P^T A
// (SM80 MMAs). Every key belongs to exactly one CTA: no atomics, deterministic.
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>

#include "fused/copy.cuh"
#include "fused/epilogue.cuh"  // acc_to_smem, store_rows
#include "fused/gemm.cuh"      // Sm80Gemm
#include "fused/mask.cuh"      // store_column_windows
#include "fused/softmax.cuh"   // row_col
#include "fused/tile_scheduler.cuh"
#include "gemm/params.cuh"
#include "gemm/window_entry.cuh"

namespace jax_na {
namespace gemm {

// Two stages of query rows, the output staging tile, two stages of (weight-row offset, window per
// axis) per query, the schedule.
template <class Traits>
struct InSmem {
  static constexpr int kA = 0;                                  // stage s at kA + s * kSmemQ
  static constexpr int kOut = kA + 2 * Traits::kSmemQ;
  static constexpr int kSmall = kOut + Traits::kSmemKV;           // stage s at kSmall + s * kSmallStage
  static constexpr int kWRow = 0;                                 // int64 per query
  static constexpr int kWin = kWRow + Traits::kBlockM * 8;        // int2 per query and axis
  static constexpr int kSmallStage = kWin + Traits::kBlockM * Traits::kRank * 8;
  static constexpr int kSched = kSmall + 2 * kSmallStage;
  static constexpr int kBytes = kSched + Traits::kSmemSched;
  static_assert(sizeof(fused::KVSchedule) <= Traits::kSmemSched, "schedule smem");
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) gemm_in_kernel(const __grid_constant__ GemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using Element = typename Traits::Element;
  using L = InSmem<Traits>;
  using KS = fused::KVScheduler<Traits>;
  using KVTile = typename Traits::KVTile;
  constexpr int kRank = Traits::kRank;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;

  extern __shared__ __align__(1024) char smem_raw[];
  fused::KVSchedule& ks = *reinterpret_cast<fused::KVSchedule*>(smem_raw + L::kSched);
  auto sA = [&](int s) { return reinterpret_cast<Element*>(smem_raw + L::kA + s * Traits::kSmemQ); };
  Element* sOut = reinterpret_cast<Element*>(smem_raw + L::kOut);
  auto s_wrow = [&](int s) { return reinterpret_cast<int64_t*>(smem_raw + L::kSmall + s * L::kSmallStage + L::kWRow); };
  auto s_win = [&](int s) { return reinterpret_cast<int2*>(smem_raw + L::kSmall + s * L::kSmallStage + L::kWin); };

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const geo::Problem& pr = p.pr;
  KS::compute(pr, p.kv_grid, p.n_kv_ctas, ks, tid);
  __syncthreads();
  if (!ks.live) return;  // uniform over the CTA
  const int32_t n_iters = pr.groups() * ks.n_q_tiles;

  // Q tile the walker is at -> stage s: its query rows, and per query its weight-row offset and window.
  fused::QTileWalker<Traits> load_walker;
  auto issue_q = [&](int s) {
    int32_t org[3];
    load_walker.origin(ks, org);
    const auto rows = load_walker.window_rows(ks, org);
    fused::load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(sA(s), static_cast<const Element*>(p.a),
                                                                             tid, rows);
    if (tid < kBlockM) {
      const int64_t off = rows(tid);
      s_wrow(s)[tid] = off >= 0 ? off / kD * pr.W : -1;  // [B, N, H] row = offset / E
      fused::store_column_windows<Traits>(pr, ks, org, s_win(s), tid);
    }
    load_walker.advance(ks);
  };
  if (n_iters > 0) issue_q(0);
  fused::cp_async_commit();

  fused::Sm80Gemm<Traits> gemm(tid);
  auto acc = gemm.template acc<kBlockN, kD>();
  clear(acc);
  // P^T is gathered straight into A-operand registers, viewed as (rows, cols) (rows in the
  // accumulator's order).
  using PRowCol = decltype(fused::a_row_col<sizeof(Element)>(gemm.template a_frag<kBlockN, kBlockM>().layout()));
  constexpr int kRows = decltype(size<0>(PRowCol{}))::value;
  constexpr int kCols = decltype(size<1>(PRowCol{}))::value;
  int32_t kp[kRows][3];  // key position per fragment row and axis
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = fused::acc_row<Traits::kNWarps>(r, warp, lane);
#pragma unroll
    for (int a = 0; a < 3; ++a) kp[r][a] = a < kRank ? ks.k0[a] + KVTile::coord(row, a) : 0;
  }
  const Element* attn = static_cast<const Element*>(p.attn);

  for (int32_t i = 0; i < n_iters; ++i) {
    const int s = i & 1;
    fused::cp_async_wait<0>();
    __syncthreads();  // stage s visible; every warp done with stage s ^ 1
    if (i + 1 < n_iters) {
      issue_q(s ^ 1);
      fused::cp_async_commit();
    }
    Tensor rP = gemm.template a_frag<kBlockN, kBlockM>();
    Tensor p_rc = make_tensor(rP.data(), fused::a_row_col<sizeof(Element)>(rP.layout()));
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = fused::acc_col(c, lane);
      const int64_t wrow = s_wrow(s)[col];
      int2 win[3] = {make_int2(0, 1), make_int2(0, 1), make_int2(0, 1)};
#pragma unroll
      for (int a = 0; a < kRank; ++a) win[a] = s_win(s)[a * kBlockM + col];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int32_t w = window_entry<kRank>(kp[r], win, p.w_stride);
        p_rc(r, c) = (w >= 0 && wrow >= 0) ? attn[wrow + w] : Element(0);
      }
    }
    gemm.template rs_a<kBlockM>(acc, rP, sA(s));  // acc += P^T A
  }

  fused::cp_async_wait<0>();
  __syncthreads();
  Tensor acc_rc = make_tensor(acc.data(), fused::row_col(acc.layout()));
  fused::acc_to_smem<Traits::kNWarps, Element, typename Traits::SmemLayoutKV>(acc_rc, sOut, p.alpha, warp, lane);
  __syncthreads();
  fused::store_rows<Traits, kBlockN, typename Traits::SmemLayoutKV>(
      static_cast<Element*>(p.out), sOut, tid, [&](int r) { return KS::kv_row_offset(pr, ks, r); });
#endif
}

}  // namespace gemm
}  // namespace jax_na
