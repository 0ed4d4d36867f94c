// Warpgroup MMA (wgmma) helpers of the Hopper fused kernels.
#pragma once

#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

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

// wgmma_wait for one arm of a branch: ptxas moves a wait_group up through the independent
// instructions of its basic block (up to the last wgmma: the forward's softmax waited for the P.V
// it was meant to overlap) but not across a branch, so a wait that must follow some work goes in
// the arms of a branch taken after it. LLVM hoists identical asm out of both arms into the block
// above: each arm's wait carries its own kArm in its asm text. wait_group is .aligned over the
// warpgroup: the branch must go the same way in its four warps, so it tests a value uniform by
// construction (a step index's parity; a 128-thread vote per step measured slower in the forward).
template <int kPending, int kArm, class... Frags>
__device__ __forceinline__ void wgmma_wait_in_arm(Frags&... frags) {
  asm volatile("wgmma.wait_group.sync.aligned %0; // arm %1\n" ::"n"(kPending), "n"(kArm) : "memory");
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

// The backward kernels' GEMMs on warpgroup MMAs: the interface of Sm80Gemm (fused/gemm.cuh), with
// Traits::kNWarps / 4 warpgroups stacked along M (64 rows each) and the smem tiles tagged with the
// 128-byte-swizzle GMMA layouts (the same bytes the cp.async gathers write). The products are
// asynchronous: wait<kPending>(frags...) completes all but the last kPending issued, and neither
// the operands nor the accumulators may be touched before. Every warp of a warpgroup must issue.
template <class Traits>
struct Sm90Gemm {
  template <class OtherTraits>
  using Rebind = Sm90Gemm<OtherTraits>;  // the same policy over other tiles (a pass's output columns)
  using Element = typename Traits::Element;
  static constexpr int kD = Traits::kHeadDim;
  static constexpr int kWarpsPerMma = 4;
  static constexpr bool kTmaLoads = true;  // the dK/dV kernel's Q/dO tiles by TMA where the problem allows
  // The dK/dV kernel's warpgroups take every Q tile (no unit skips): skipping measured slower (H100,
  // bf16, backward alone, session 31: p1 +5%, p3 +3%, p2 +2%): a lone warpgroup's step takes 81-84%
  // of a pair's, so a skip saves little, and the branch costs more than that in the loop.
  static constexpr bool kUnitSkips = false;
  static_assert(Traits::kNWarps % 4 == 0, "whole warpgroups");
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<Traits::kNWarps / 4>, cute::_1, cute::_1>>;
  // M x N x K products: A (and B) K-major in smem, or A in registers and B MN-major (transposed).
  template <int N, int K>
  using MmaSS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<N>, cute::Int<K>>>(),
      AtomLayout{}));
  template <int N, int K>
  using MmaRS = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, cute::Int<N>, cute::Int<K>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AtomLayout{}));
  // A (kRows, kCols) row tile in smem, and the same bytes viewed as (kCols, kRows) (MN-major operand).
  template <int kRows, int kCols = kD>
  using Rows = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<Element>{},
                                            cute::Shape<cute::Int<kRows>, cute::Int<kCols>>{}));
  template <int kRows, int kCols = kD>
  using RowsT = decltype(cute::composition(
      Rows<kRows, kCols>{}, cute::make_layout(cute::Shape<cute::Int<kCols>, cute::Int<kRows>>{}, cute::GenRowMajor{})));

  // M x N x K products with both operands MN-major in smem (A^T B with A a (K x M) and B a (K x N)
  // row tile): the warpgroups side by side along N, M = 64 (dQ = dS K in the dK/dV kernel).
  static constexpr int kWarpGroups = Traits::kNWarps / 4;
  template <int M, int N, int K>
  using MmaTN = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::Int<M>, cute::Int<N / kWarpGroups>, cute::Int<K>>,
                                 cute::GMMA::Major::MN, cute::GMMA::Major::MN>(),
      cute::Layout<cute::Shape<cute::_1, cute::Int<kWarpGroups>, cute::_1>>{}));

  int tid;
  // The warpgroup's first thread, through a lane-0 shuffle so that ptxas knows it is warp-uniform:
  // the slices that only make wgmma descriptors take it, and their descriptors then stay in uniform
  // registers (the thread's own index put each descriptor in ordinary registers, moved to uniform
  // ones per wgmma with R2UR). The accumulators' coordinates take `tid`.
  int wg_tid;
  __device__ __forceinline__ explicit Sm90Gemm(int tid_)
      : tid(tid_), wg_tid(__shfl_sync(0xffffffffu, tid_ & ~127, 0)) {}

  template <int M, int N>
  __device__ __forceinline__ auto acc_tn() const {
    static_assert(M == 64, "one warpgroup MMA along M");
    return cute::partition_fragment_C(MmaTN<M, N, 16>{}, cute::Shape<cute::Int<M>, cute::Int<N>>{});
  }
  // (row, column) in the M x N product of each value of an acc_tn fragment.
  template <int M, int N>
  __device__ __forceinline__ auto coords_tn() const {
    return MmaTN<M, N, 16>{}.get_thread_slice(tid).partition_C(
        cute::make_identity_tensor(cute::Shape<cute::Int<M>, cute::Int<N>>{}));
  }
  // acc (M x N) = A^T B: A a (K x M) row tile (layout Rows<K, M>), B a (K x N) row tile (N = kD, or
  // a block of 64-column blocks of a (K x kD) tile, which starts at element K x its first column).
  template <int M, int K, int N = kD, class Acc>
  __device__ __forceinline__ void tn(Acc& acc, const Element* a, const Element* b) const {
    using namespace cute;
    MmaTN<M, N, K> mma;
    auto thr = mma.get_thread_slice(wg_tid);
    Tensor sAt = make_tensor(make_smem_ptr(a), RowsT<K, M>{});
    Tensor sBt = make_tensor(make_smem_ptr(b), RowsT<K, N>{});
    wgmma_issue<true>(mma, thr.partition_fragment_A(sAt), thr.partition_fragment_B(sBt), acc);
  }

  template <int M, int N>
  __device__ __forceinline__ auto acc() const {
    return cute::partition_fragment_C(MmaSS<N, kD>{}, cute::Shape<cute::Int<M>, cute::Int<N>>{});
  }

  template <int M, int N, class Acc>
  __device__ __forceinline__ void ss(Acc& acc, const Element* a, const Element* b) const {
    using namespace cute;
    MmaSS<N, kD> mma;
    auto thr = mma.get_thread_slice(wg_tid);
    Tensor sA = make_tensor(make_smem_ptr(a), Rows<M>{});
    Tensor sB = make_tensor(make_smem_ptr(b), Rows<N>{});
    wgmma_issue<true>(mma, thr.partition_fragment_A(sA), thr.partition_fragment_B(sB), acc);
  }

  template <int K, class Acc, class TA>
  __device__ __forceinline__ void rs(Acc& acc, TA& a, const Element* b) const {
    using namespace cute;
    MmaRS<kD, K> mma;
    auto thr = mma.get_thread_slice(wg_tid);
    Tensor ra = make_tensor(a.data(), acc_to_gmma_a_layout(a.layout()));
    Tensor sBt = make_tensor(make_smem_ptr(b), RowsT<K>{});
    wgmma_issue<false>(mma, ra, thr.partition_fragment_B(sBt), acc);
  }

  template <int kPending, class... Frags>
  __device__ __forceinline__ void wait(Frags&... frags) const {
    wgmma_wait<kPending>(frags...);
  }
  // wait, kept after the work before it: a branch on `uniform` (any value the same in the whole
  // warpgroup, e.g. the step index) ends that work's basic block and each arm waits
  // (wgmma_wait_in_arm). A warpgroup vote would do too, at a 128-thread barrier per call.
  template <int kPending, class... Frags>
  __device__ __forceinline__ void wait_after(int32_t uniform, Frags&... frags) const {
    if (uniform & 1)
      wgmma_wait_in_arm<kPending, 0>(frags...);
    else
      wgmma_wait_in_arm<kPending, 1>(frags...);
  }
  // cp.async writes are generic-proxy writes; wgmma reads smem through the async proxy.
  __device__ __forceinline__ void fence_smem_writes() const { cutlass::arch::fence_view_async_shared(); }
};

}  // namespace fused
}  // namespace jax_na
