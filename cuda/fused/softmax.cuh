// Online softmax in float32 over the score fragments of the SM80 m16n8k16 accumulator.
//
// Accumulator layout per thread: ((2, 2), MMA_M, MMA_N) = ((col pair, row half), m atom, n atom).
// row_col() views it as (rows, cols) = ((row half, m atom), (col pair, n atom)); a thread's row r holds
// its columns spread over the 4 lanes of a quad (lane % 4), so row reductions are two xor-shuffles.
// Scores are raw q.k; the softmax is taken of scale * q.k, computed as exp2(s * scale_log2 - m * scale_log2).
#pragma once

#include <cute/tensor.hpp>

#include <cmath>

namespace jax_na {
namespace fused {

// SM90 wgmma accumulators are ((2, 2, N/8), MMA_M, MMA_N) with the same per-thread (row, column)
// ownership inside a 64-row warpgroup tile (col pair, row half, 8-column block): row_col() views them
// as ((row half, m), ((col pair, n block), n)) so that the masks and softmax serve both paths.
template <class Layout>
__device__ __forceinline__ auto row_col(Layout l) {
  using namespace cute;
  static_assert(decltype(rank(l))::value == 3, "accumulator layout");
  if constexpr (decltype(rank<0>(l))::value == 3) {
    return make_layout(make_layout(get<0, 1>(l), get<1>(l)),
                       make_layout(make_layout(get<0, 0>(l), get<0, 2>(l)), get<2>(l)));
  } else {
    return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
  }
}

// Accumulator layout ((2,2), M, N) -> A-operand register layout: ((2,2,2), M, N/2) for m16n8k16
// (kElementBytes 2); ((2,2), M, N) for float32's m16n8k8, the value modes swapped (A: row half, k
// half; the accumulator's column pair is read as the k half, which the B operand's permuted k
// order matches: kernel_traits.cuh, TransposedRows).
template <int kElementBytes = 2, class Layout>
__device__ __forceinline__ auto acc_to_a_layout(Layout l) {
  using namespace cute;
  if constexpr (kElementBytes == 4) {
    return make_layout(make_layout(get<0, 1>(l), get<0, 0>(l)), get<1>(l), get<2>(l));
  } else {
    auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2,2), M, (2, N/2))
    return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
  }
}

// 2^x with the hardware approximation (ex2.approx.ftz: ~2 ulp, flushes denormal results to 0, gives 0
// for -inf): the probabilities are rounded to 16 bits before the P.V product anyway.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// How far (log2 units) a row's maximum may rise above the running maximum the probabilities are
// taken against before that reference moves: while it stays within the slack the output needs no
// rescale (alpha = 1), and the probabilities stay below 2^slack, far inside float32/bfloat16/float16
// range. The result is exact either way (O, the row sum and the lse share the reference); the slack
// only takes the rescale of O (a multiply per accumulator per tile) off most tiles. 0 moves the
// reference whenever the maximum grows (the classic online softmax).
#ifndef JNA_SOFTMAX_RESCALE_SLACK
#define JNA_SOFTMAX_RESCALE_SLACK 8
#endif
constexpr float kRescaleSlackLog2 = JNA_SOFTMAX_RESCALE_SLACK;
static_assert(kRescaleSlackLog2 >= 0.f && kRescaleSlackLog2 <= 14.f,
              "the probabilities reach 2^slack before the 16-bit P.V operand: at most 2^14 (float16 max 65504)");

// Row reductions run as kReduceChains independent chains over the columns (a single chain puts every
// FMNMX/FADD latency on the softmax's critical path), folded pairwise at the end.
template <int kCols>
constexpr int kReduceChains = kCols >= 8 ? 4 : 1;

template <int kChains, class Op>
__device__ __forceinline__ float fold_chains(float (&v)[kChains], Op op) {
#pragma unroll
  for (int w = kChains / 2; w > 0; w /= 2)
#pragma unroll
    for (int i = 0; i < w; ++i) v[i] = op(v[i], v[i + w]);
  return v[0];
}

// Max of init and the columns of row r of s_rc.
template <class TensorS>
__device__ __forceinline__ float row_max(const TensorS& s_rc, int r, float init) {
  constexpr int kCols = decltype(cute::size<1>(s_rc))::value;
  constexpr int kChains = kReduceChains<kCols>;
  float m[kChains];
#pragma unroll
  for (int i = 0; i < kChains; ++i) m[i] = init;
#pragma unroll
  for (int c = 0; c < kCols; ++c) m[c % kChains] = fmaxf(m[c % kChains], s_rc(r, c));
  return fold_chains(m, [](float a, float b) { return fmaxf(a, b); });
}

template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows];  // reference maximum of raw scores the probabilities are taken against (-inf: none yet)
  float row_sum[kRows];  // this thread's partial sum of exp (reduced over the quad at the end)

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      row_max[r] = -INFINITY;
      row_sum[r] = 0.f;
    }
  }

  // s_rc: scores (rows, cols), masked entries -inf; overwritten by the unnormalized probabilities.
  // o_rc: output accumulator (rows, cols), rescaled to the new reference maximum.
  template <class TensorS, class TensorO>
  __device__ __forceinline__ void update(TensorS& s_rc, TensorO& o_rc, float scale_log2) {
    float alpha[kRows];
    if (update_scores(s_rc, scale_log2, alpha)) rescale(o_rc, alpha);
  }

  // The two halves of update(), for callers that overlap the output rescale with an MMA in flight:
  // scores -> probabilities and the factor alpha per row that the output accumulator needs ...
  // Returns whether any thread of the warp has a row with alpha != 1 (warp-uniform): else the
  // rescale can be skipped.
  template <class TensorS>
  __device__ __forceinline__ bool update_scores(TensorS& s_rc, float scale_log2, float alpha[kRows]) {
    using namespace cute;
    static_assert(decltype(size<0>(s_rc))::value == kRows, "rows");
    constexpr int kCols = decltype(size<1>(s_rc))::value;
    bool moved = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float mx = quad_max(fused::row_max(s_rc, r, row_max[r]));
      // The reference moves only when the maximum rises more than the slack above it (always from
      // -inf: the first scores of a row).
      const bool move = mx * scale_log2 > row_max[r] * scale_log2 + kRescaleSlackLog2;
      const float ref = move ? mx : row_max[r];
      // A row that has seen only masked scores keeps -inf: use 0 so exp2 gives 0, never NaN.
      const float m_scaled = (ref == -INFINITY) ? 0.f : ref * scale_log2;
      alpha[r] = move ? fast_exp2(row_max[r] * scale_log2 - m_scaled) : 1.f;  // 0 when row_max was -inf
      moved = moved || move;
      row_max[r] = ref;
      constexpr int kChains = kReduceChains<kCols>;
      float sum[kChains];
#pragma unroll
      for (int i = 0; i < kChains; ++i) sum[i] = 0.f;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
#if defined(JNA_FWD_EXPERIMENT_NO_EXP)  // experiment knob: the exponentials' cost (wrong P)
        const float pexp = s_rc(r, c) * scale_log2 - m_scaled;
#else
        const float pexp = fast_exp2(s_rc(r, c) * scale_log2 - m_scaled);
#endif
        s_rc(r, c) = pexp;
        sum[c % kChains] += pexp;
      }
      row_sum[r] = row_sum[r] * alpha[r] + fold_chains(sum, [](float a, float b) { return a + b; });
    }
    return __any_sync(0xffffffffu, moved);
  }

  // ... and that rescale.
  template <class TensorO>
  __device__ __forceinline__ static void rescale(TensorO& o_rc, const float alpha[kRows]) {
    using namespace cute;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= alpha[r];
    }
  }

  // Normalizes o_rc by the row sums; returns lse (natural log of the scaled scores) per row.
  template <class TensorO>
  __device__ __forceinline__ void finalize(TensorO& o_rc, float scale, float lse[kRows]) {
    using namespace cute;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const float inv = (sum > 0.f) ? 1.f / sum : 0.f;
      lse[r] = (sum > 0.f) ? row_max[r] * scale + logf(sum) : -INFINITY;
#pragma unroll
      for (int c = 0; c < size<1>(o_rc); ++c) o_rc(r, c) *= inv;
    }
  }
};

}  // namespace fused
}  // namespace jax_na
