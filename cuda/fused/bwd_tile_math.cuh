// The per-tile math of the key-stationary backward kernels (mainloop_bwd_dkdv.cuh and the Hopper
// hopper/mainloop_bwd.cuh), on accumulators viewed as (key rows, query columns) (row_col()).
#pragma once

#include <cute/tensor.hpp>

#include <cstdint>

#include "fused/epilogue.cuh"  // acc_row, acc_col
#include "fused/softmax.cuh"   // fast_exp2

namespace jax_na {
namespace fused {

// P^T in place of S^T: exp2(scale_log2 S^T - log2(e) lse) with lse per query column (smem).
template <class TensorS>
__device__ __forceinline__ void probabilities_t(TensorS& s_rc, const float* lse, float scale_log2, int lane) {
  using namespace cute;
  constexpr float kLog2e = 1.4426950408889634f;
#pragma unroll
  for (int c = 0; c < size<1>(s_rc); ++c) {
    const float lse2 = lse[acc_col(c, lane)] * kLog2e;
#pragma unroll
    for (int r = 0; r < size<0>(s_rc); ++r)
#if defined(JNA_BWD_EXPERIMENT_NO_EXP)  // experiment knob: the exponentials' cost (wrong P)
      s_rc(r, c) = s_rc(r, c) * scale_log2 - lse2;
#else
      s_rc(r, c) = fast_exp2(s_rc(r, c) * scale_log2 - lse2);
#endif
  }
}

// dS^T in place of dP^T: P^T (dP^T - delta) with delta per query column (smem).
template <class TensorDP, class TensorP>
__device__ __forceinline__ void score_grads_t(TensorDP& dp_rc, const TensorP& p_rc, const float* delta, int lane) {
  using namespace cute;
#pragma unroll
  for (int c = 0; c < size<1>(dp_rc); ++c) {
    const float dlt = delta[acc_col(c, lane)];
#pragma unroll
    for (int r = 0; r < size<0>(dp_rc); ++r) dp_rc(r, c) = p_rc(r, c) * (dp_rc(r, c) - dlt);
  }
}

// The key rows past the data (zero K rows of a partial tile) must add nothing to dQ: their dS =
// exp(-lse) (0 - delta) is unused for dK/dV but may overflow (fp16: beyond 65504 once lse < -11)
// where tiles skip the mask (additional keys, fully-inside tiles), and inf * 0 is NaN. Bit r of the
// mask: this thread's accumulator row r holds a key (kv_off(row) >= 0).
template <int kNWarps, class Acc, class KvOffset>
__device__ __forceinline__ uint32_t key_row_bits(const Acc& acc, const KvOffset& kv_off, int warp, int lane) {
  using namespace cute;
  constexpr int kRows = decltype(size<0>(make_tensor(acc.data(), row_col(acc.layout()))))::value;
  static_assert(kRows <= 32, "row bits");
  uint32_t bits = ~0u;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    if (kv_off(acc_row<kNWarps>(r, warp, lane)) < 0) bits &= ~(1u << r);
  return bits;
}
template <class TensorRC>
__device__ __forceinline__ void zero_rows_outside(TensorRC& rc, uint32_t key_rows) {
  using namespace cute;
  if (key_rows == ~0u) return;
#pragma unroll
  for (int r = 0; r < size<0>(rc); ++r)
    if (!((key_rows >> r) & 1u))
#pragma unroll
      for (int c = 0; c < size<1>(rc); ++c) rc(r, c) = 0.f;
}

}  // namespace fused
}  // namespace jax_na
