// PN: weights[r, w] = alpha * a[r] . b[key(r, w)] (+ rpb[h, offset(r, w)]) on tensor cores, written as
// OutT (the input dtype, or float32 scores).
//
// One CTA = one 128-query tile (query_tile.cuh). Per KV tile of its window box: S = A B^T (SM80 MMAs,
// both tiles in smem), then every product whose key lies in its query's window is written to that
// window entry (window_entry.cuh). The KV tiles partition the box, so each entry is written exactly
// once; entries outside a causal window (no key) get the masked value first.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>
#include <cstdint>

#include "fused/gemm.cuh"  // Sm80Gemm
#include "fused/softmax.cuh"  // row_col
#include "gemm/query_tile.cuh"
#include "gemm/window_entry.cuh"

namespace jax_na {
namespace gemm {

// Masked entries (a causal window shorter than the kernel on some axis) of the CTA's rows get `fill`.
// s_wrow: weight-row offset per CTA row (-1 outside the group).
template <class Traits, class OutT>
__device__ __forceinline__ void fill_masked_entries(const geo::Problem& pr, const int64_t* s_wrow, const int2* s_win,
                                                    OutT* out, OutT fill, int tid) {
  for (int64_t i = tid; i < Traits::kBlockM * pr.W; i += Traits::kNThreads) {
    const int row = static_cast<int>(i / pr.W);
    const int64_t w = i - row * pr.W;
    if (s_wrow[row] < 0) continue;
    int32_t wa[geo::kMaxRank];
    pr.window_coords(w, wa);
    bool masked = false;
#pragma unroll
    for (int a = 0; a < Traits::kRank; ++a) {
      const int2 win = fused::RowWindowTable<Traits>::at(s_win, a, row);
      masked = masked || win.x + wa[a] >= win.y;
    }
    if (masked) out[s_wrow[row] + w] = fill;
  }
}

// PN's region of QTileSmem: per warp, its rows of the score tile as floats (fragment row r of lane
// quad q at staging row 8 r + q), so that the window entries go out row by row with consecutive lanes
// on consecutive keys (direct stores from the MMA fragments touch 8 rows per instruction: on an H100
// 2.3x slower on p1, 1.5x on p2, 12% faster on p4 (7x7)); then the weight-row offset of every CTA row.
template <class Traits>
struct PnStaging {
  static constexpr int kRowsPerWarp = Traits::kBlockM / Traits::kNWarps;
  static constexpr int kStride = Traits::kBlockN + 4;  // floats per staging row (padded against bank conflicts)
  static constexpr int kScoreBytes = Traits::kNWarps * kRowsPerWarp * kStride * 4;
  static constexpr int kBytes = kScoreBytes + Traits::kBlockM * 8;
};

template <class Traits, class OutT>
__global__ void __launch_bounds__(Traits::kNThreads) gemm_pn_kernel(const __grid_constant__ GemmParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using Element = typename Traits::Element;
  using TS = fused::TileScheduler<Traits>;
  using KVTile = typename Traits::KVTile;
  using St = PnStaging<Traits>;
  constexpr int kRank = Traits::kRank;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;

  extern __shared__ __align__(1024) char smem_raw[];
  const QTileSmem<Traits> sm(smem_raw);
  float* s_scores = reinterpret_cast<float*>(sm.extra);
  int64_t* s_wrow = reinterpret_cast<int64_t*>(sm.extra + St::kScoreBytes);
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const geo::Problem& pr = p.pr;
  fused::CtaSchedule& cs = *sm.cs;

  TS::compute(pr, p.q_tiles, blockIdx, cs, tid);
  __syncthreads();
  if (!cs.live) return;  // uniform over the CTA
  fused::load_rows<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(
      sm.q, static_cast<const Element*>(p.a), tid, [&](int r) { return TS::q_row_offset(pr, cs, r); });
  fused::RowWindowTable<Traits>::store(pr, cs, sm.win, tid);
  if (tid < kBlockM) {
    const int64_t off = TS::q_row_offset(pr, cs, tid);
    s_wrow[tid] = off >= 0 ? off / Traits::kHeadDim * pr.W : -1;  // [B, N, H] row = offset / E
  }
  fused::KVTileWalker<Traits> walker;
  issue_key_tile<Traits>(pr, cs, walker, p.b, sm.b_stage(0), cs.flags[0], tid);
  fused::cp_async_commit();
  __syncthreads();  // windows, row offsets visible

  const OutT masked = static_cast<OutT>(p.masked_neg_inf ? -INFINITY : 0.f);
  bool causal = false;
#pragma unroll
  for (int a = 0; a < kRank; ++a) causal = causal || pr.axis[a].causal;
  OutT* out = static_cast<OutT*>(p.out);
  if (causal) fill_masked_entries<Traits>(pr, s_wrow, sm.win, out, masked, tid);

  fused::Sm80Gemm<Traits> gemm(tid);
  using RowCol = decltype(fused::row_col(gemm.template acc<kBlockM, kBlockN>().layout()));
  constexpr int kRows = decltype(size<0>(RowCol{}))::value;
  constexpr int kCols = decltype(size<1>(RowCol{}))::value;
  static_assert(kRows * 8 == St::kRowsPerWarp, "staging rows");
  const Element* rpb = p.rpb ? static_cast<const Element*>(p.rpb) + cs.h * pr.rpb_size() : nullptr;
  float* st = s_scores + warp * St::kRowsPerWarp * St::kStride;

  for_each_key_tile<Traits>(pr, cs, walker, p.b, sm, tid, warp, [&](int stage, const int32_t (&org)[3]) {

    auto acc = gemm.template acc<kBlockM, kBlockN>();
    gemm.template ss<kBlockM, kBlockN>(acc, sm.q, sm.b_stage(stage));
    Tensor s_rc = make_tensor(acc.data(), fused::row_col(acc.layout()));
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < kCols; c += 2)
        *reinterpret_cast<float2*>(st + (r * 8 + lane / 4) * St::kStride + fused::acc_col(c, lane)) =
            make_float2(p.alpha * s_rc(r, c), p.alpha * s_rc(r, c + 1));
    }
    __syncwarp();
    // The key of column `lane + 32 j` per axis (the same for every row).
    int32_t kp[kBlockN / 32][3];
#pragma unroll
    for (int j = 0; j < kBlockN / 32; ++j)
#pragma unroll
      for (int a = 0; a < 3; ++a) kp[j][a] = a < kRank ? org[a] + KVTile::coord(lane + 32 * j, a) : 0;
    for (int lr = 0; lr < St::kRowsPerWarp; ++lr) {
      const int row = fused::acc_row<Traits::kNWarps>(lr / 8, warp, (lr % 8) * 4);
      const int64_t wrow = s_wrow[row];
      if (wrow < 0) continue;  // warp-uniform
      int2 win[3] = {make_int2(0, 1), make_int2(0, 1), make_int2(0, 1)};
      int32_t qb[3] = {0, 0, 0};  // bias offset of key position 0: k - 1 - query position
#pragma unroll
      for (int a = 0; a < kRank; ++a) {
        win[a] = fused::RowWindowTable<Traits>::at(sm.win, a, row);
        qb[a] = pr.axis[a].k - 1 - (cs.q0[a] + fused::q_row_coord<Traits>(row, a));
      }
#pragma unroll
      for (int j = 0; j < kBlockN / 32; ++j) {
        const int32_t w = window_entry<kRank>(kp[j], win, p.w_stride);
        if (w < 0) continue;
        float v = st[lr * St::kStride + lane + 32 * j];
        if (rpb != nullptr) {
          int32_t idx = 0;
#pragma unroll
          for (int a = 0; a < kRank; ++a) idx += (kp[j][a] + qb[a]) * p.rpb_stride[a];
          v += static_cast<float>(rpb[idx]);
        }
        out[wrow + w] = static_cast<OutT>(v);
      }
    }
    __syncwarp();  // the staging rows are rewritten by the next tile
  });
#endif
}

}  // namespace gemm
}  // namespace jax_na
