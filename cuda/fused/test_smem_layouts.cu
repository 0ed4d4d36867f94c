// Host test of the portable kernels' swizzled shared-memory tiles (kernel_traits.cuh: SmemLayoutRows
// and its transposed view), for every dtype and head dim the kernels are instantiated for and tiles
// of 16 to 128 rows: the layout is a bijection onto the tile, each 16-byte chunk of a row is
// contiguous (the unit of cp.async and ldmatrix), the 8 rows an ldmatrix reads at one chunk index
// land in 8 distinct 16-byte bank groups (no bank conflict), and the 16-bit transposed view reads
// the same elements. Compiled with nvcc as a host program (CuTe layouts are host code too).
#include <cstdio>
#include <vector>

#include "fused/kernel_traits.cuh"

namespace {

long g_checked = 0, g_failed = 0;

template <jax_na::DType kDType, int kHeadDim, int kRows>
void check_tile() {
  using T = jax_na::fused::TraitsBase<kDType, kHeadDim, 1, 4>;
  using L = typename T::template SmemLayoutRows<kRows>;
  using LT = typename T::template SmemLayoutRowsT<kRows>;
  constexpr int kBytes = int(sizeof(typename T::Element));
  constexpr int kChunk = 16 / kBytes;
  std::vector<int> seen(kRows * kHeadDim, 0);
  long failed = 0;
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kHeadDim; ++c) {
      const int o = L{}(r, c);
      failed += o < 0 || o >= kRows * kHeadDim || seen[o]++ != 0;           // bijection
      failed += c % kChunk != 0 && o != L{}(r, c - c % kChunk) + c % kChunk;  // chunks contiguous
      if (kBytes == 2) failed += LT{}(c, r) != o;                             // transposed view
      ++g_checked;
    }
  for (int r0 = 0; r0 < kRows; r0 += 8)
    for (int c = 0; c < kHeadDim; c += kChunk) {
      int groups[8];
      for (int i = 0; i < 8; ++i) groups[i] = (L{}(r0 + i, c) * kBytes / 16) % 8;
      for (int i = 0; i < 8; ++i)
        for (int j = i + 1; j < 8; ++j) failed += groups[i] == groups[j];
    }
  if (failed) std::printf("FAIL dtype %d head dim %d rows %d: %ld wrong\n", int(kDType), kHeadDim, kRows, failed);
  g_failed += failed;
}

template <jax_na::DType kDType, int kHeadDim>
void check_dim() {
  check_tile<kDType, kHeadDim, 16>();
  check_tile<kDType, kHeadDim, 32>();
  check_tile<kDType, kHeadDim, 64>();
  check_tile<kDType, kHeadDim, 128>();
}

}  // namespace

int main() {
  using jax_na::DType;
  check_dim<DType::kBF16, 32>();
  check_dim<DType::kBF16, 64>();
  check_dim<DType::kBF16, 128>();
  check_dim<DType::kBF16, 256>();
  check_dim<DType::kF16, 32>();
  check_dim<DType::kF16, 128>();
  check_dim<DType::kF32, 64>();
  check_dim<DType::kF32, 128>();
  std::printf("%ld elements checked, %ld wrong\n", g_checked, g_failed);
  std::printf("test_smem_layouts: %s\n", g_failed == 0 ? "OK" : "FAILED");
  return g_failed == 0 ? 0 : 1;
}
