// Compile-time configuration of the Hopper (sm90a) fused forward: the portable forward's tiling
// (FwdTraits: 128-query boxes, 8 warps with 16-row sub-boxes, KV boxes of kBlockN keys) with the
// GEMMs on warpgroup MMAs (wgmma): two consumer warpgroups stacked along M, 64 query rows each, and
// one producer warpgroup in front of them (threads 0-127) that loads K/V by TMA where it can and
// gathers the rest (Q, additional keys, dilated problems) with cp.async.
// kNThreads counts the consumers (the MMA, softmax and epilogue threads of the shared code);
// kLoadThreads the producer (the gathers of copy.cuh).
//
// Smem: Q 16-32 KB + 3 stages of K and V (up to 192 KB for 128-key tiles at D = 128) + the row
// windows (at most 1 KB) + the pipeline's mbarriers and the consumers' QTileOrigin fits the 227 KB (no room for a second Q tile or a staged O: see mainloop_fwd.cuh).
// The per-thread ownership of accumulator rows/columns is the same as the portable kernel's (warp w
// holds rows 16w..16w+15), so the scheduler, masks, softmax and epilogue are shared. The smem tiles
// are the same bytes (128-byte swizzle of 8 x 64-element atoms); the GMMA layouts below only tag them
// for wgmma descriptors.
#pragma once

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "fused/kernel_traits.cuh"

namespace jax_na {
namespace fused {

// K/V smem stages.
constexpr int kHopperFwdStages = 3;

// Shapes_: one of HopperFwdTiles (tile_shapes.cuh). The two consumer warpgroups split the Q tile
// along axis 0 (warps 0-3 hold its first half: the warp grid is row-major) and each skips the K/V
// tiles its own half's windows miss.
template <DType kDType_, int kHeadDim_, int kRank_, class Shapes_,
          int kBlockN_ = Shapes_::KVTile::kSize>
struct HopperFwdTraits : FwdTraits<kDType_, kHeadDim_, kRank_, kBlockN_, 8, kHopperFwdStages, Shapes_> {
  using Base = FwdTraits<kDType_, kHeadDim_, kRank_, kBlockN_, 8, kHopperFwdStages, Shapes_>;
  using typename Base::Element;
  using Base::kBlockM;
  using Base::kBlockN;
  using Base::kHeadDim;
  static constexpr int kMinBlocks = 1;
  static constexpr int kNWarpGroups = 2;  // consumers
  static_assert(Base::kDPasses == 1, "the Hopper forward takes head dims up to 128 (one pass of O columns)");

  static constexpr int kLoadThreads = 128;  // the producer warpgroup
  static constexpr int kLoadRowsPerPass = kLoadThreads / Base::kChunks;
  static constexpr int kLoadUnroll = 2;  // rows in flight per producer thread (its registers are few)
  static constexpr int kLaunchThreads = Base::kNThreads + kLoadThreads;
  // setmaxnreg: the producer keeps addresses and the schedule of the next Q tile (computed while the
  // consumers finish the last one) and hands the rest to the consumers. 72 / 216 measured 0.5-1.5%
  // faster than 56 / 224 on the problem set (the producer's schedule spills less; its K/V loop has no
  // spill either way); 96 / 200 slowed 1-D. The consumers can take only what the producer gave back
  // (else setmaxnreg.inc waits forever): the launch allocates 168 registers per thread (384
  // threads), so 128 p + 256 c <= 384 x 168.
  static constexpr int kProducerRegs = 72;
  static constexpr int kConsumerRegs = 216;
  static constexpr int kLaunchRegs = 65536 / kLaunchThreads / 8 * 8;
  static_assert(kLoadThreads * kProducerRegs + Base::kNThreads * kConsumerRegs <= kLaunchThreads * kLaunchRegs,
                "setmaxnreg: the consumers take more registers than the producer releases");
  // After the portable kernel's smem (FwdSmem): the mbarriers (FwdPipeline: Q full and empty,
  // schedule full and empty, per stage K/V full and empty), then the consumers' QTileOrigin.
  static constexpr int kOffBarriers = Base::kSmemBytes;
  static constexpr int kOffOrigin = kOffBarriers + 8 * (4 + 2 * Base::kStages);
  static constexpr int kSmemBytes = kOffOrigin + 48;
  static_assert(kSmemBytes <= 232448, "more than the 227 KB of dynamic shared memory a CTA may take on sm_90");
  static_assert(kOffBarriers % 8 == 0, "mbarrier alignment");

  // S = Q K^T: both operands from smem (K-major). O += P V: P from registers, V from smem read
  // transposed (MN-major: the head dim is contiguous).
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kNWarpGroups>, cute::_1, cute::_1>>;
  using TiledMmaS = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kHeadDim>>>(),
      AtomLayout{}));
  using TiledMmaO = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<Element, Element, float,
                                 cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>(),
      AtomLayout{}));

  using GmmaAtom = cute::GMMA::Layout_K_SW128_Atom<Element>;
  using GmmaLayoutQ = decltype(cute::tile_to_shape(GmmaAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using GmmaLayoutK = decltype(cute::tile_to_shape(GmmaAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  using GmmaLayoutVt = decltype(cute::composition(
      GmmaLayoutK{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
};

}  // namespace fused
}  // namespace jax_na
