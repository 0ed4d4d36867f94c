// Epilogues of the fused kernels: float accumulators -> Element registers / shared memory ->
// 16-byte stores of gathered token rows.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

#include <cstdint>
#include <type_traits>

namespace jax_na {
namespace fused {

// Tile row of fragment row r (row_col view of the SM80 accumulator) for warps stacked along M.
template <int kNWarps>
__device__ __forceinline__ int acc_row(int r, int warp, int lane) {
  return (r >> 1) * (16 * kNWarps) + warp * 16 + (lane >> 2) + (r & 1) * 8;
}

// Tile column of fragment column c.
__device__ __forceinline__ int acc_col(int c, int lane) { return (c >> 1) * 8 + (c & 1) + 2 * (lane & 3); }

// Two floats -> one register of two 16-bit values (lo in the low half), rounded to nearest even.
template <class Element>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  static_assert(sizeof(Element) == 2, "16-bit elements");
  uint32_t d;
  if constexpr (std::is_same_v<Element, cutlass::bfloat16_t>) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  } else {
    static_assert(std::is_same_v<Element, cutlass::half_t>, "bf16 or fp16");
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
  }
  return d;
}

// dst = Element(acc), value by value in storage order (same layout). 16-bit types are written a
// register (pair) at a time: through cutlass's array converter nvcc split each converted register
// into its halves and rebuilt the operand registers of the next MMA (about 160 PRMT/LOP3/SHF per
// 64 x 128 tile and thread in the Hopper forward's loop).
template <class TensorF, class TensorE>
__device__ __forceinline__ void convert_fragment_into(const TensorF& acc, TensorE& dst) {
  using namespace cute;
  using Element = typename TensorE::value_type;
  constexpr int kN = decltype(size(acc))::value;
  static_assert(kN == decltype(size(dst))::value, "same fragment");
  const float* src = raw_pointer_cast(acc.data());
  if constexpr (sizeof(Element) == 2) {
    static_assert(kN % 2 == 0, "pairs");
    uint32_t* words = reinterpret_cast<uint32_t*>(raw_pointer_cast(dst.data()));
#pragma unroll
    for (int j = 0; j < kN / 2; ++j) words[j] = pack_pair<Element>(src[2 * j], src[2 * j + 1]);
  } else {
    Element* out = raw_pointer_cast(dst.data());
#pragma unroll
    for (int i = 0; i < kN; ++i) out[i] = static_cast<Element>(src[i]);
  }
}

// Element copy of a float fragment (same layout).
template <class Element, class TensorF>
__device__ __forceinline__ auto convert_fragment(const TensorF& acc) {
  using namespace cute;
  Tensor r = make_tensor_like<Element>(acc);
  convert_fragment_into(acc, r);
  return r;
}

// acc_rc (rows, cols) * scale -> smem tile (SmemLayout (rows, D)), as Element pairs.
template <int kNWarps, class Element, class SmemLayout, class TensorAcc>
__device__ __forceinline__ void acc_to_smem(const TensorAcc& acc_rc, Element* smem, float scale, int warp,
                                            int lane) {
  using namespace cute;
  constexpr int kRows = decltype(size<0>(acc_rc))::value;
  constexpr int kCols = decltype(size<1>(acc_rc))::value;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int row = acc_row<kNWarps>(r, warp, lane);
#pragma unroll
    for (int c = 0; c < kCols; c += 2) {
      cutlass::Array<Element, 2> pair;
      pair[0] = static_cast<Element>(acc_rc(r, c) * scale);
      pair[1] = static_cast<Element>(acc_rc(r, c + 1) * scale);
      *reinterpret_cast<cutlass::Array<Element, 2>*>(smem + SmemLayout{}(row, acc_col(c, lane))) = pair;
    }
  }
}

// A fragment already converted to Element (rows, cols; the accumulator's layout, as acc_to_smem's
// acc_rc) -> smem tile: the registers' pairs as they are, no float copy kept alive for the store.
template <int kNWarps, class SmemLayout, class TensorRC>
__device__ __forceinline__ void frag_to_smem(const TensorRC& rc, typename TensorRC::value_type* smem, int warp,
                                             int lane) {
  using namespace cute;
  using Element = typename TensorRC::value_type;
#pragma unroll
  for (int r = 0; r < size<0>(rc); ++r) {
    const int row = acc_row<kNWarps>(r, warp, lane);
#pragma unroll
    for (int c = 0; c < size<1>(rc); c += 2) {
      cutlass::Array<Element, 2> pair;
      pair[0] = rc(r, c);
      pair[1] = rc(r, c + 1);
      *reinterpret_cast<cutlass::Array<Element, 2>*>(smem + SmemLayout{}(row, acc_col(c, lane))) = pair;
    }
  }
}

// acc_rc (rows, cols) -> Element pairs stored straight into gathered rows of `out` (row_off[r]: the
// element offset of fragment row r, or -1 to skip), for kernels that cannot spare the smem a staged
// store needs. A quad of lanes fills 16 contiguous bytes of a row per store; L2 merges the sectors.
template <class Element, class TensorAcc, int kRows>
__device__ __forceinline__ void acc_to_rows(const TensorAcc& acc_rc, Element* out, const int64_t (&row_off)[kRows],
                                            int lane) {
  using namespace cute;
  static_assert(decltype(size<0>(acc_rc))::value == kRows, "one offset per fragment row");
  constexpr int kCols = decltype(size<1>(acc_rc))::value;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (row_off[r] < 0) continue;
    Element* row = out + row_off[r];
#pragma unroll
    for (int c = 0; c < kCols; c += 2) {
      cutlass::Array<Element, 2> pair;
      pair[0] = static_cast<Element>(acc_rc(r, c));
      pair[1] = static_cast<Element>(acc_rc(r, c + 1));
      *reinterpret_cast<cutlass::Array<Element, 2>*>(row + acc_col(c, lane)) = pair;
    }
  }
}

// kRows smem rows -> gathered rows of `out` (row_offset(row): element offset or -1 to skip).
template <class Traits, int kRows, class SmemLayout, class Element, class RowOffset>
__device__ __forceinline__ void store_rows(Element* out, const Element* smem, int tid, RowOffset&& row_offset) {
  const int chunk = tid % Traits::kChunks;
  const int row0 = tid / Traits::kChunks;
  static_assert(kRows % Traits::kRowsPerPass == 0, "rows per pass");
#pragma unroll
  for (int i = 0; i < kRows / Traits::kRowsPerPass; ++i) {
    const int row = row0 + i * Traits::kRowsPerPass;
    const int64_t off = row_offset(row);
    if (off >= 0)
      *reinterpret_cast<uint4*>(out + off + chunk * Traits::kChunkElems) =
          *reinterpret_cast<const uint4*>(smem + SmemLayout{}(row, chunk * Traits::kChunkElems));
  }
}

}  // namespace fused
}  // namespace jax_na
