// Fused backward preprocessing: delta = rowsum(dO * O) - d_lse per query row (float32), read by
// both backward kernels. d_lse enters here because d lse / d s = P: dS = P (dP - rowsum(dO O) + d_lse).
// Where the dK/dV kernel adds dQ into a float32 buffer, this kernel zeroes the buffer on the way, and
// a last kernel converts it.
#pragma once

#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

#include <cstdint>

namespace jax_na {
namespace fused {

// kTPR threads per row, each 16 bytes (kElems elements) of O and dO (and zeroing kElems floats of
// dq_accum row `row` unless it is null: every row's D columns, whatever query row it holds; its
// kRowFloats - D padding floats are left as they are, nothing reads them); rows = B * N * H.
template <class Element, int kHeadDim, int kRowFloats = kHeadDim>
__global__ void __launch_bounds__(256) fused_bwd_delta_kernel(const Element* __restrict__ out,
                                                              const Element* __restrict__ d_out,
                                                              const float* __restrict__ d_lse,
                                                              float* __restrict__ delta,
                                                              float* __restrict__ dq_accum, int64_t rows) {
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
    if (dq_accum != nullptr) {
#pragma unroll
      for (int i = 0; i < kElems; i += 4)
        *reinterpret_cast<float4*>(dq_accum + row * kRowFloats + part * kElems + i) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  }
#pragma unroll
  for (int m = kTPR / 2; m > 0; m /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, m);
  if (row < rows && part == 0) delta[row] = acc - d_lse[row];
}

// dq = scale * dq_accum in Element: dq_accum's head-major rows ([B, H, N] of kRowFloats floats, the
// first kHeadDim the sums) into dq's [B, N, H, kHeadDim]. Grid (x: N * kHeadDim / 8 in 256-thread
// blocks, y: H, z: B), 8 values per thread: a warp reads 32 contiguous bytes per thread along a
// row and writes whole 16-byte pieces of dq's rows.
template <class Element, int kHeadDim, int kRowFloats>
__global__ void __launch_bounds__(256) fused_bwd_dq_convert_kernel(const float* __restrict__ dq_accum,
                                                                   Element* __restrict__ dq, float scale,
                                                                   int64_t N) {
  constexpr int kChunks = kHeadDim / 8;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= N * kChunks) return;
  const int64_t n = t / kChunks;
  const int c = static_cast<int>(t % kChunks) * 8;
  const int64_t h = blockIdx.y, H = gridDim.y, b = blockIdx.z;
  const float* src = dq_accum + ((b * H + h) * N + n) * kRowFloats + c;
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 e = reinterpret_cast<const float4*>(src)[1];
  const float v[8] = {a.x, a.y, a.z, a.w, e.x, e.y, e.z, e.w};
  cutlass::Array<Element, 8> r;
#pragma unroll
  for (int i = 0; i < 8; ++i) r[i] = static_cast<Element>(v[i] * scale);
  static_assert(sizeof(r) % 16 == 0, "16-byte stores");
  Element* dst = dq + ((b * N + n) * H + h) * kHeadDim + c;
#pragma unroll
  for (int i = 0; i < int(sizeof(r)) / 16; ++i)
    reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(&r)[i];
}

}  // namespace fused
}  // namespace jax_na
