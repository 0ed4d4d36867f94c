// Fused backward preprocessing: delta = rowsum(dO * O) - d_lse per query row (float32), read by
// both backward kernels. d_lse enters here because d lse / d s = P: dS = P (dP - rowsum(dO O) + d_lse).
#pragma once

#include <cutlass/numeric_types.h>

#include <cstdint>

namespace jax_na {
namespace fused {

// kTPR threads per row, each 16 bytes (kElems elements) of O and dO; rows = B * N * H.
template <class Element, int kHeadDim>
__global__ void __launch_bounds__(256) fused_bwd_delta_kernel(const Element* __restrict__ out,
                                                              const Element* __restrict__ d_out,
                                                              const float* __restrict__ d_lse,
                                                              float* __restrict__ delta, int64_t rows) {
  constexpr int kElems = 16 / int(sizeof(Element));
  constexpr int kTPR = kHeadDim / kElems;
  static_assert(kTPR <= 32 && (32 % kTPR) == 0, "threads per row");
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row = t / kTPR;
  const int part = static_cast<int>(t % kTPR);
  float acc = 0.f;
  if (row < rows) {
    const int64_t off = row * kHeadDim + part * kElems;
    const uint4 o4 = *reinterpret_cast<const uint4*>(out + off);
    const uint4 d4 = *reinterpret_cast<const uint4*>(d_out + off);
    const Element* o = reinterpret_cast<const Element*>(&o4);
    const Element* d = reinterpret_cast<const Element*>(&d4);
#pragma unroll
    for (int i = 0; i < kElems; ++i) acc += static_cast<float>(o[i]) * static_cast<float>(d[i]);
  }
#pragma unroll
  for (int m = kTPR / 2; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (row < rows && part == 0) delta[row] = acc - d_lse[row];
}

}  // namespace fused
}  // namespace jax_na
