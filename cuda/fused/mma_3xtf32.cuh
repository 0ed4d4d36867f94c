// float32 products on SM80 tensor cores at float32 accuracy ("3xTF32"): each operand x is split into
// big = tf32(x) and small = tf32(x - big) (x - big is exact), and a.b = a_big.b_big + a_big.b_small +
// a_small.b_big (the dropped a_small.b_small is below float32's rounding). Three m16n8k8 TF32 MMAs per
// product, small terms first. A single TF32 product keeps 10 mantissa bits, which SEMANTICS.md's
// float32 tolerances do not allow.
//
// The operation has the register interface of CuTe's SM80_16x8x8_F32TF32TF32F32_TN (same thread/value
// layouts), with float operand fragments: smem tiles and registers hold plain floats, the split happens
// per MMA.
#pragma once

#include <cute/arch/mma_sm80.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

#include <cstdint>

namespace jax_na {
namespace fused {

struct SM80_16x8x8_F32F32x3TF32_TN {
  using DRegisters = float[4];
  using ARegisters = uint32_t[4];
  using BRegisters = uint32_t[2];
  using CRegisters = float[4];

  // x -> (tf32(x), tf32(x - tf32(x))), both as tf32 bit patterns.
  CUTE_HOST_DEVICE static void split(uint32_t x, uint32_t& big, uint32_t& small) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(big) : "f"(__uint_as_float(x)));
    const float rest = __uint_as_float(x) - __uint_as_float(big);
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(small) : "f"(rest));
#else
    big = x;
    small = 0;
#endif
  }

  CUTE_HOST_DEVICE static void fma(float& d0, float& d1, float& d2, float& d3, uint32_t const& a0,
                                   uint32_t const& a1, uint32_t const& a2, uint32_t const& a3, uint32_t const& b0,
                                   uint32_t const& b1, float const& c0, float const& c1, float const& c2,
                                   float const& c3) {
    uint32_t ab[4], as[4], bb[2], bs[2];
    split(a0, ab[0], as[0]);
    split(a1, ab[1], as[1]);
    split(a2, ab[2], as[2]);
    split(a3, ab[3], as[3]);
    split(b0, bb[0], bs[0]);
    split(b1, bb[1], bs[1]);
    // The three products go into a fresh accumulator t, which is then added to c in float32 (round to
    // nearest): the tensor cores align and truncate the addends of their accumulation, an error of
    // ~2^-23 of the largest addend per MMA and biased, so chaining the MMAs straight through c (a
    // running sum over a long contraction: O over KV tiles, dK/dV over query tiles) loses bits with
    // every step (measured: the additional keys' gradients over 2880 queries at 4e-5 of their norm,
    // the naive kernels' float32 at 5e-7).
    using Tf32 = cute::SM80_16x8x8_F32TF32TF32F32_TN;
    float t0, t1, t2, t3;
    Tf32::fma(t0, t1, t2, t3, as[0], as[1], as[2], as[3], bb[0], bb[1], 0.f, 0.f, 0.f, 0.f);
    Tf32::fma(t0, t1, t2, t3, ab[0], ab[1], ab[2], ab[3], bs[0], bs[1], t0, t1, t2, t3);
    Tf32::fma(t0, t1, t2, t3, ab[0], ab[1], ab[2], ab[3], bb[0], bb[1], t0, t1, t2, t3);
    d0 = c0 + t0;
    d1 = c1 + t1;
    d2 = c2 + t2;
    d3 = c3 + t3;
  }
};

}  // namespace fused
}  // namespace jax_na

namespace cute {
// The TF32 atom's layouts, with float operand fragments.
template <>
struct MMA_Traits<jax_na::fused::SM80_16x8x8_F32F32x3TF32_TN> : MMA_Traits<SM80_16x8x8_F32TF32TF32F32_TN> {
  using ValTypeA = float;
  using ValTypeB = float;
};
}  // namespace cute
