// Warpgroup MMA (wgmma) helpers of the Hopper fused kernels.
#pragma once

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <type_traits>

namespace jax_na {
namespace fused {

// Issues acc (=|+=) A . B over all k-blocks as one wgmma batch (asynchronous: wgmma_wait completes it).
// A and B: smem descriptors or (A only) registers, as partitioned by the TiledMMA; neither they nor
// acc may be touched until the batch completed.
template <bool kZeroInit, class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void wgmma_issue(TiledMma& mma, TA const& a, TB const& b, TC& acc) {
  using namespace cute;
  // A in registers holds the MMA's input values; A in smem is a tensor of wgmma descriptors.
  constexpr bool kRegA = std::is_same_v<std::remove_cv_t<typename TA::value_type>, typename TiledMma::ValTypeA>;
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// Waits until at most kPending wgmma batches of this warpgroup are in flight; fences the registers
// of the batches that completed (their accumulators, and register A operands).
template <int kPending, class... Frags>
__device__ __forceinline__ void wgmma_wait(Frags&... frags) {
  cute::warpgroup_wait<kPending>();
  (cute::warpgroup_fence_operand(frags), ...);
}

// The accumulator fragment ((2, 2, N/8), 1, 1) of a 64 x N wgmma viewed as the register A operand
// ((2, 2, 2), 1, N/16) of the next wgmma (k-block j = accumulator 8-column blocks 2j, 2j + 1). Both
// are compact in the same order, so only the layout changes.
template <class Layout>
__device__ __forceinline__ auto acc_to_gmma_a_layout(Layout) {
  using namespace cute;
  using l = Layout;
  static_assert(decltype(size<1>(l{}))::value == 1 && decltype(size<2>(l{}))::value == 1, "one MMA per warpgroup");
  constexpr int kN8 = decltype(size<0, 2>(l{}))::value;
  static_assert(kN8 % 2 == 0, "columns");
  return make_layout(make_shape(make_shape(_2{}, _2{}, _2{}), _1{}, Int<kN8 / 2>{}),
                     make_stride(make_stride(_1{}, _2{}, _4{}), _0{}, _8{}));
}

}  // namespace fused
}  // namespace jax_na
