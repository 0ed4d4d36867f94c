// Register-staged tensor-core GEMMs of the fused kernels (CuTe TiledMMA, SM80 MMA atoms, ldmatrix).
#pragma once

#include <cute/tensor.hpp>

namespace jax_na {
namespace fused {

// acc += A(smem) * B(smem), both staged through registers with ldmatrix, one k-slice ahead.
template <class TiledMma, class Acc, class TA, class TB, class TsA, class TsB, class CopyA, class CopyB,
          class ThrCopyA, class ThrCopyB>
__device__ __forceinline__ void gemm_ss(TiledMma& mma, Acc& acc, TA& rA, TB& rB, const TsA& sA, const TsB& sB,
                                        const CopyA& copy_a, const CopyB& copy_b, const ThrCopyA& thr_a,
                                        const ThrCopyB& thr_b) {
  using namespace cute;
  Tensor rA_view = thr_a.retile_D(rA);
  Tensor rB_view = thr_b.retile_D(rB);
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
#pragma unroll
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i + 1 < size<2>(rA)) {
      copy(copy_a, sA(_, _, i + 1), rA_view(_, _, i + 1));
      copy(copy_b, sB(_, _, i + 1), rB_view(_, _, i + 1));
    }
    gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// acc += A(registers) * B(smem).
template <class TiledMma, class Acc, class TA, class TB, class TsB, class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_rs(TiledMma& mma, Acc& acc, const TA& rA, TB& rB, const TsB& sB,
                                        const CopyB& copy_b, const ThrCopyB& thr_b) {
  using namespace cute;
  Tensor rB_view = thr_b.retile_D(rB);
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
#pragma unroll
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i + 1 < size<2>(rA)) copy(copy_b, sB(_, _, i + 1), rB_view(_, _, i + 1));
    gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

}  // namespace fused
}  // namespace jax_na
