// NN: out[r] = alpha * sum_w weights[r, w] b[key(r, w)] on tensor cores.
//
// One CTA = one 128-query tile (query_tile.cuh). Its weight rows are copied to shared memory first
// (when they fit, else read from global memory through the same pointers). Per KV tile of its window
// box: the (queries x keys) operand P is gathered from the weight rows into A-operand registers
// (window_entry.cuh: 0 for a key outside a query's window), then O += P V (SM80 MMAs, V read
// transposed from smem). O goes out through smem as 16-byte row stores.
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>

#include "fused/epilogue.cuh"  // acc_to_smem, store_rows
#include "fused/gemm.cuh"      // Sm80Gemm
#include "fused/softmax.cuh"   // row_col
#include "gemm/query_tile.cuh"
#include "gemm/window_entry.cuh"

namespace jax_na {
namespace gemm {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) gemm_nn_kernel(const __grid_constant__ GemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using Element = typename Traits::Element;
  using TS = fused::TileScheduler<Traits>;
  using KVTile = typename Traits::KVTile;
  constexpr int kRank = Traits::kRank;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;

  extern __shared__ __align__(1024) char smem_raw[];
  const QTileSmem<Traits> sm(smem_raw);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const geo::Problem& pr = p.pr;
  fused::CtaSchedule& cs = *sm.cs;
  auto q_off = [&](int r) { return TS::q_row_offset(pr, cs, r); };

  TS::compute(pr, p.q_tiles, blockIdx, cs, tid);
  __syncthreads();
  if (!cs.live) return;  // uniform over the CTA
  fused::RowWindowTable<Traits>::store(pr, cs, sm.win, tid);
  fused::KVTileWalker<Traits> walker;
  issue_key_tile<Traits>(pr, cs, walker, p.b, sm.b_stage(0), cs.flags[0], tid);
  fused::cp_async_commit();
  const Element* attn = static_cast<const Element*>(p.attn);
  Element* s_weights = reinterpret_cast<Element*>(sm.extra);  // [kBlockM, W] when staged
  if (p.stage_weights) {
    for (int row = warp; row < kBlockM; row += Traits::kNWarps) {  // a warp per row: coalesced
      const int64_t off = q_off(row);
      const Element* src = attn + (off >= 0 ? off / kD * pr.W : 0);
      for (int64_t w = lane; w < pr.W; w += 32) s_weights[row * pr.W + w] = off >= 0 ? src[w] : Element(0);
    }
  }
  __syncthreads();  // windows (and staged weights) visible

  fused::Sm80Gemm<Traits> gemm(tid);
  auto acc_o = gemm.template acc<kBlockM, kD>();
  clear(acc_o);
  // P is gathered straight into A-operand registers, viewed as (rows, cols) (rows in the
  // accumulator's order, as RowWindows holds them).
  using PRowCol = decltype(fused::a_row_col<sizeof(Element)>(gemm.template a_frag<kBlockM, kBlockN>().layout()));
  constexpr int kRows = decltype(size<0>(PRowCol{}))::value;
  constexpr int kCols = decltype(size<1>(PRowCol{}))::value;
  const RowWindows<Traits, kRows> rows(pr, cs, sm.win, warp, lane);
  const Element* wrow[kRows];  // this thread's weight rows (smem or gmem), null outside the group
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = fused::acc_row<Traits::kNWarps>(r, warp, lane);
    wrow[r] = rows.weights_row[r] < 0 ? nullptr
              : p.stage_weights      ? s_weights + row * pr.W
                                     : attn + rows.weights_row[r];
  }

  for_each_key_tile<Traits>(pr, cs, walker, p.b, sm, tid, warp, [&](int stage, const int32_t (&org)[3]) {

    Tensor rP = gemm.template a_frag<kBlockM, kBlockN>();
    Tensor p_rc = make_tensor(rP.data(), fused::a_row_col<sizeof(Element)>(rP.layout()));
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = fused::acc_col(c, lane);
      int32_t kp[3] = {0, 0, 0};
#pragma unroll
      for (int a = 0; a < kRank; ++a) kp[a] = org[a] + KVTile::coord(col, a);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int32_t w = window_entry<kRank>(kp, rows.win[r], p.w_stride);
        p_rc(r, c) = (w >= 0 && wrow[r] != nullptr) ? wrow[r][w] : Element(0);
      }
    }
    gemm.template rs_a<kBlockN>(acc_o, rP, sm.b_stage(stage));  // O += P V
  });

  fused::cp_async_wait<0>();
  __syncthreads();  // sm.q stages O
  Tensor o_rc = make_tensor(acc_o.data(), fused::row_col(acc_o.layout()));
  fused::acc_to_smem<Traits::kNWarps, Element, typename Traits::SmemLayoutQ>(o_rc, sm.q, p.alpha, warp, lane);
  __syncthreads();
  fused::store_rows<Traits, kBlockM, typename Traits::SmemLayoutQ>(static_cast<Element*>(p.out), sm.q, tid, q_off);
#endif
}

}  // namespace gemm
}  // namespace jax_na
