// Global <-> shared copies of gathered token rows: every row of a Q/K/V tile is one token's head
// vector (D contiguous elements at a 64-bit offset), rows of a tile are scattered over the
// [B, *S, heads, D] tensor. 16-byte cp.async per chunk; rows outside the tensor are zero-filled.
#pragma once

#include <cstdint>

namespace jax_na {
namespace fused {

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#endif
}

// 4-byte cp.async (zero-fill when !valid).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Passes of the loading threads over a tile of kRows rows (kLoadRowsPerPass rows each). A tile
// shorter than one pass (short rows, e.g. head dim 32: many rows per pass, against 32-key tiles)
// takes one pass in which the threads past its rows load nothing.
template <class Traits, int kRows>
struct LoadPasses {
  static constexpr bool kPartial = kRows < Traits::kLoadRowsPerPass;
  static_assert(kPartial || kRows % Traits::kLoadRowsPerPass == 0, "rows per pass");
  static constexpr int kPasses = kPartial ? 1 : kRows / Traits::kLoadRowsPerPass;
};

// Copies a tile of kRows gathered rows into a swizzled smem tile. row_offset(row) returns the element
// offset of the row in `base`, or -1 when the row is outside the tensor (zero-filled). Called by the
// Traits::kLoadThreads loading threads (tid below that).
template <class Traits, int kRows, class Element, class SmemLayout, class RowOffset>
__device__ __forceinline__ void load_rows(Element* smem, const Element* base, int tid, RowOffset&& row_offset) {
  constexpr int kPasses = LoadPasses<Traits, kRows>::kPasses;
  const int chunk = tid % Traits::kChunks;
  const int row0 = tid / Traits::kChunks;
#pragma unroll
  for (int i = 0; i < kPasses; ++i) {
    const int row = row0 + i * Traits::kLoadRowsPerPass;
    if (LoadPasses<Traits, kRows>::kPartial && row >= kRows) break;
    const int64_t off = row_offset(row);
    const bool valid = off >= 0;
    const Element* src = base + (valid ? off + chunk * Traits::kChunkElems : 0);
    cp_async_16(smem + SmemLayout{}(row, chunk * Traits::kChunkElems), src, valid);
  }
}

// Two tiles with the same rows (K and V): one row-offset computation per row for both.
template <class Traits, int kRows, class Element, class SmemLayout, class RowOffset>
__device__ __forceinline__ void load_rows_pair(Element* smem_a, const Element* base_a, Element* smem_b,
                                               const Element* base_b, int tid, RowOffset&& row_offset) {
  constexpr int kPasses = LoadPasses<Traits, kRows>::kPasses;
  const int chunk = tid % Traits::kChunks;
  const int row0 = tid / Traits::kChunks;
#pragma unroll(Traits::kLoadUnroll)
  for (int i = 0; i < kPasses; ++i) {
    const int row = row0 + i * Traits::kLoadRowsPerPass;
    if (LoadPasses<Traits, kRows>::kPartial && row >= kRows) break;
    const int64_t off = row_offset(row);
    const bool valid = off >= 0;
    const int64_t src = valid ? off + chunk * Traits::kChunkElems : 0;
    const int dst = SmemLayout{}(row, chunk * Traits::kChunkElems);
    cp_async_16(smem_a + dst, base_a + src, valid);
    cp_async_16(smem_b + dst, base_b + src, valid);
  }
}

}  // namespace fused
}  // namespace jax_na
