// Register-staged tensor-core GEMMs of the fused kernels (CuTe TiledMMA, SM80 MMA atoms, ldmatrix).
#pragma once

#include <cute/tensor.hpp>

#include "fused/softmax.cuh"  // acc_to_a_layout

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
    cute::gemm(mma, rA(_, _, i), rB(_, _, i), acc);
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
    cute::gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// An SM80 A-operand fragment layout ((values), M, K) viewed as (rows, cols) in the order row_col()
// views the accumulator's: rows (row half, m atom), column c = tile column acc_col(c). m16n8k16 values
// (col pair, row half, col half) already are in row_col()'s order; m16n8k8 (float32) values are (row
// half, k half), the accumulator's swapped (acc_to_a_layout<4> swaps them back), the k half standing for
// the column pair under the permuted k order of TransposedRows.
template <int kElementBytes, class Layout>
__device__ __forceinline__ auto a_row_col(Layout l) {
  if constexpr (kElementBytes == 4) {
    return row_col(acc_to_a_layout<4>(l));
  } else {
    return row_col(l);
  }
}

// The GEMMs of the backward kernels on SM80 tensor cores (mma.sync, ldmatrix), behind the interface
// the Hopper policy (hopper/gemm.cuh: Sm90Gemm) shares, so that one kernel body serves both:
//   acc<M, N>()            an M x N float accumulator fragment,
//   ss<M, N>(acc, a, b)    acc = A B^T with A (M x D) and B (N x D) row tiles in smem,
//   rs<K>(acc, a, b)       acc += A B with A an Element copy of an (M x K) accumulator and B a (K x D)
//                          row tile in smem (read transposed),
//   wait<kPending>(frags)  completes the products issued (a no-op here: these run synchronously),
//   wait_after<kPending>(u, frags)  the same, not before the work above it (u: a warpgroup-uniform
//                          int the Hopper policy branches on),
//   fence_smem_writes()    orders this thread's completed cp.async writes before the MMAs' reads.
// kWarpsPerMma: warps that must issue a product together (1 here, a warpgroup on Hopper).
// kTmaLoads: the dK/dV kernel loads its Q/dO tiles by TMA where the problem allows (Hopper only).
// kUnitSkips: the dK/dV kernel's MMA units skip the Q tiles their own keys miss (UnitQueryIntervals).
template <class Traits>
struct Sm80Gemm {
  template <class OtherTraits>
  using Rebind = Sm80Gemm<OtherTraits>;  // the same policy over other tiles (a pass's output columns)
  using Element = typename Traits::Element;
  static constexpr int kD = Traits::kHeadDim;
  static constexpr int kWarpsPerMma = 1;
  static constexpr bool kTmaLoads = false;  // every tile by cp.async (portable)
  // A portable warp that skips leaves its SM sub-partition to the other CTA's warps (not yet timed).
  static constexpr bool kUnitSkips = true;
  typename Traits::TiledMma mma;
  int tid;
  __device__ __forceinline__ explicit Sm80Gemm(int tid_) : tid(tid_) {}

  template <int M, int N>
  __device__ __forceinline__ auto acc() const {
    return cute::partition_fragment_C(mma, cute::Shape<cute::Int<M>, cute::Int<N>>{});
  }

  template <int M, int N, class Acc>
  __device__ __forceinline__ void ss(Acc& acc, const Element* a, const Element* b) {
    using namespace cute;
    auto thr = mma.get_thread_slice(tid);
    Tensor sA = make_tensor(make_smem_ptr(a), typename Traits::template SmemLayoutRows<M>{});
    Tensor sB = make_tensor(make_smem_ptr(b), typename Traits::template SmemLayoutRows<N>{});
    Tensor rA = thr.partition_fragment_A(sA);
    Tensor rB = thr.partition_fragment_B(sB);
    auto copy_a = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma);
    auto copy_b = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma);
    auto thr_a = copy_a.get_thread_slice(tid);
    auto thr_b = copy_b.get_thread_slice(tid);
    clear(acc);
    gemm_ss(mma, acc, rA, rB, thr_a.partition_S(sA), thr_b.partition_S(sB), copy_a, copy_b, thr_a, thr_b);
  }

  template <int K, class Acc, class TA>
  __device__ __forceinline__ void rs(Acc& acc, TA& a, const Element* b) {
    using namespace cute;
    Tensor ra = make_tensor(a.data(), acc_to_a_layout<sizeof(Element)>(a.layout()));
    rs_a<K>(acc, ra, b);
  }

  // An A-operand register fragment of an M x K product (Element values); a_row_col() views it as
  // (rows, cols), and column c holds tile column acc_col(c, lane) (for float32 through the permuted k
  // order of the B operand's transposed view: kernel_traits.cuh, TransposedRows).
  template <int M, int K>
  __device__ __forceinline__ auto a_frag() const {
    using namespace cute;  // only the shape of the (unread) tensor matters
    return mma.get_thread_slice(tid).partition_fragment_A(
        make_tensor(make_gmem_ptr(static_cast<const Element*>(nullptr)), make_layout(Shape<Int<M>, Int<K>>{})));
  }

  // acc += A B with A an (M x K) A-operand fragment (a_frag) and B a (K x D) row tile in smem (read
  // transposed).
  template <int K, class Acc, class TA>
  __device__ __forceinline__ void rs_a(Acc& acc, TA& ra, const Element* b) {
    using namespace cute;
    auto thr = mma.get_thread_slice(tid);
    Tensor sBt = make_tensor(make_smem_ptr(b), typename Traits::template SmemLayoutRowsT<K>{});
    // The register fragment takes its shape from a plain (D, K) layout (the swizzled one is smem only).
    Tensor rB = thr.partition_fragment_B(make_tensor(make_smem_ptr(b), make_layout(Shape<Int<kD>, Int<K>>{})));
    auto copy_bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma);
    auto thr_bt = copy_bt.get_thread_slice(tid);
    gemm_rs(mma, acc, ra, rB, thr_bt.partition_S(sBt), copy_bt, thr_bt);
  }

  template <int kPending, class... Frags>
  __device__ __forceinline__ void wait(Frags&...) const {}
  template <int kPending, class... Frags>
  __device__ __forceinline__ void wait_after(int32_t, Frags&...) const {}
  __device__ __forceinline__ void fence_smem_writes() const {}
};

}  // namespace fused
}  // namespace jax_na
