// Epilogues of the fused kernels: float accumulators -> Element registers / shared memory ->
// 16-byte stores of gathered token rows.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_conversion.h>

#include <cstdint>

namespace jax_na {
namespace fused {

// Tile row of fragment row r (row_col view of the SM80 accumulator) for warps stacked along M.
template <int kNWarps>
__device__ __forceinline__ int acc_row(int r, int warp, int lane) {
  return (r >> 1) * (16 * kNWarps) + warp * 16 + (lane >> 2) + (r & 1) * 8;
}

// Tile column of fragment column c.
__device__ __forceinline__ int acc_col(int c, int lane) { return (c >> 1) * 8 + (c & 1) + 2 * (lane & 3); }

// Element copy of a float fragment (same layout).
template <class Element, class TensorF>
__device__ __forceinline__ auto convert_fragment(const TensorF& acc) {
  using namespace cute;
  Tensor r = make_tensor_like<Element>(acc);
  constexpr int kN = decltype(size(acc))::value;
  cutlass::NumericArrayConverter<Element, float, kN> cvt;
  *reinterpret_cast<cutlass::Array<Element, kN>*>(r.data()) =
      cvt(*reinterpret_cast<const cutlass::Array<float, kN>*>(acc.data()));
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
