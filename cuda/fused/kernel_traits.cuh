// Compile-time configuration of the fused kernels (portable sm80-class path): CuTe MMA / shared-memory
// layouts / copy atoms over the tile shapes of tile_shapes.cuh.
//
// A forward CTA owns kBlockM = 128 queries forming a box QTile (in dilation-group positions); each of
// its warps (8 of 16 rows, or 4 of 32: two MMA atoms) owns a compact sub-box WarpTile of them, so
// that a warp can skip the KV tiles that miss its own queries' windows. KV tiles hold kBlockN keys
// (default 64) forming a box KVTile. Tuning knobs (compile definitions, for experiments):
// JNA_FUSED_BLOCK_N (32 or 64), JNA_FUSED_MIN_BLOCKS (__launch_bounds__ min blocks). The user picks
// among the compiled tile configurations at run time (tile_shapes.cuh).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "common/dtype.h"
#include "fused/mma_3xtf32.cuh"
#include "fused/tile_shapes.cuh"

namespace jax_na {
namespace fused {

template <DType kDType>
struct ElementOf;
template <>
struct ElementOf<DType::kF16> {
  using type = cutlass::half_t;
  using MmaOp = cute::SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct ElementOf<DType::kBF16> {
  using type = cutlass::bfloat16_t;
  using MmaOp = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
// float32 at float32 accuracy (3xTF32, mma_3xtf32.cuh): the portable fused kernels and gemm/ (the Hopper
// kernels are 16-bit only).
template <>
struct ElementOf<DType::kF32> {
  using type = float;
  using MmaOp = SM80_16x8x8_F32F32x3TF32_TN;
};

// What every fused kernel shares: element type, head dim, rank, kNWarps warps stacked along M of the
// SM80 TiledMMA (m16n8k16; m16n8k8 for float32; warp w holds rows 16w + 16 kNWarps i), swizzled smem
// tiles, ldmatrix atoms and the 16-byte gmem <-> smem chunking.
template <DType kDType_, int kHeadDim_, int kRank_, int kNWarps_>
struct TraitsBase {
  using Element = typename ElementOf<kDType_>::type;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kRank = kRank_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kLaunchThreads = kNThreads;  // plus a producer warpgroup where there is one

  // Elements per 16-byte chunk (8 or 4) and per MMA k-step (16 or 8: 32 bytes either way).
  static constexpr int kChunkElems = 16 / int(sizeof(Element));
  static constexpr int kMmaK = 2 * kChunkElems;
  static constexpr int kChunkShift = kChunkElems == 8 ? 3 : 2;
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename ElementOf<kDType_>::MmaOp>,
                                  cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::Int<kMmaK>>>;

  static_assert((kHeadDim == 32 || kHeadDim % 64 == 0) && kHeadDim <= 256,
                "head dim: 32 or a multiple of 64 up to 256");
  // Columns per swizzle atom: 128 bytes (8 chunks), or the whole row where it is shorter (head dim 32
  // in 16 bits: 64-byte rows, 4 chunks).
  static constexpr int kBlockKSmem = kHeadDim < 8 * kChunkElems ? kHeadDim : 8 * kChunkElems;
  static constexpr int kAtomChunkBits = kBlockKSmem / kChunkElems == 8 ? 3 : 2;
  // 8 rows per atom, 16-byte chunks XOR-swizzled by row: conflict-free cp.async stores and ldmatrix
  // loads (ldmatrix moves 32-bit pairs, so float32 rows take the same non-transposed loads). With 4
  // chunks per row two rows share a 128-byte line, so the chunk index XORs with row / 2: the 8 rows
  // an ldmatrix reads still land in 8 distinct 16-byte bank groups.
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<kAtomChunkBits, kChunkShift, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kBlockKSmem>>, cute::Stride<cute::Int<kBlockKSmem>, cute::_1>>{}));
  // A (rows, kCols) tile of token rows, and the same memory viewed as (kCols, rows) for a transposed B
  // operand. Tiles of 8 x kBlockKSmem atoms go rows first, so the columns [c * 128, c * 128 + 128) of a
  // (rows, D) tile are the (rows, 128) tile at element c * rows * 128 (the D > 128 passes below).
  template <int kRows, int kCols = kHeadDim>
  using SmemLayoutRows =
      decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kCols>>{}));
  // For float32 the k index of the transposed view is permuted inside each 8-row block (k -> key
  // 2 (k % 4) + (k / 4) % 2): an m16n8k8 A operand taken straight from an accumulator (acc_to_a_layout)
  // holds the columns 2t, 2t+1 of its n-block where the MMA expects k = t, t+4, so B reads those keys
  // there. 16-bit accumulators already are m16n8k16 A operands.
  template <int kRows, int kCols>
  using TransposedRows = std::conditional_t<
      sizeof(Element) == 2,
      cute::Layout<cute::Shape<cute::Int<kCols>, cute::Int<kRows>>, cute::Stride<cute::Int<kRows>, cute::_1>>,
      cute::Layout<cute::Shape<cute::Int<kCols>, cute::Shape<cute::_4, cute::_2, cute::Int<kRows / 8>>>,
                   cute::Stride<cute::Int<kRows>, cute::Stride<cute::_2, cute::_1, cute::_8>>>>;
  template <int kRows, int kCols = kHeadDim>
  using SmemLayoutRowsT =
      decltype(cute::composition(SmemLayoutRows<kRows, kCols>{}, TransposedRows<kRows, kCols>{}));
  // Head-dim columns per pass of the products that produce them (O, dQ, dK, dV): float32
  // accumulators of 256 columns would not fit the register file next to the others, so head dim 256
  // runs kDPasses = 2 passes of 128 columns, recomputing S (and dP) per pass. A kernel's OutTraits are
  // its traits at head dim kHeadDimOut: the layouts of one pass's output columns.
  static constexpr int kHeadDimOut = kHeadDim > 128 ? 128 : kHeadDim;
  static constexpr int kDPasses = kHeadDim / kHeadDimOut;

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  // Transposed reads: ldmatrix.trans moves 16-bit elements only; float32 reads them one by one.
  using SmemCopyAtomT = std::conditional_t<sizeof(Element) == 2, cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>,
                                           cute::Copy_Atom<cute::UniversalCopy<uint32_t>, Element>>;

  // gmem <-> smem: 16-byte chunks, kChunks per row. Stores use all kNThreads threads; gathers
  // (load_rows*) kLoadThreads (a kernel with a producer warpgroup overrides both below).
  static constexpr int kChunks = kHeadDim * int(sizeof(Element)) / 16;
  static constexpr int kRowsPerPass = kNThreads / kChunks;
  static_assert(kNThreads % kChunks == 0, "chunks");
  static constexpr int kLoadThreads = kNThreads;
  static constexpr int kLoadRowsPerPass = kRowsPerPass;
  static constexpr int kLoadUnroll = 64;  // passes of load_rows_pair unrolled (all)
  static constexpr int kRowBytes = kHeadDim * int(sizeof(Element));
};

// Query-stationary kernels (forward, backward dQ): a CTA owns a Q tile (128 queries; 64 in the Hopper
// dQ kernel's one warpgroup) and walks KV tiles of kBlockN_ keys; kNWarps_ warps along M.
// Shapes_: the QTile / WarpTile / KVTile boxes (TileShapes by default; the Hopper forward has its own).
template <DType kDType_, int kHeadDim_, int kRank_, int kBlockN_ = JNA_FUSED_BLOCK_N,
          int kNWarps_ = 8, int kStages_ = 2, class Shapes_ = TileShapes<kRank_, kBlockN_, kNWarps_>>
struct FwdTraits : TraitsBase<kDType_, kHeadDim_, kRank_, kNWarps_> {
  using Base = TraitsBase<kDType_, kHeadDim_, kRank_, kNWarps_>;
  using Base::kNWarps;
  using Base::kRank;
#ifdef JNA_FUSED_MIN_BLOCKS
  static constexpr int kMinBlocks = JNA_FUSED_MIN_BLOCKS;
#else
  // Head dim 64 fits 128 registers without spills: two CTAs per SM hide the gather latency. The
  // 16-bit head-dim-32 forward takes three (80 registers, 16-40 bytes of spills): p4/p5 0.334 ->
  // 0.290 ms and 0.097 -> 0.077 (H100, session 36). (Float32 has no head dim 32: it pads to 64.)
  // Counted for 8-warp CTAs: a CTA of 4 warps asks for twice as many. That also covers the 4-warp
  // CTAs of 32-row warps (head dim 128, two atoms' accumulators per thread): two per SM, 255
  // registers each, as the one 8-warp CTA of 16-row warps.
  static constexpr int kMinBlocks =
      ((kHeadDim_ <= 32 && kDType_ != DType::kF32) ? 3 : (kHeadDim_ <= 64 ? 2 : 1)) * (8 / kNWarps_);
#endif
  using QTile = typename Shapes_::QTile;
  static constexpr int kBlockM = QTile::kSize;  // 128; 64 in the Hopper dQ kernel (128 with TWO_WARPGROUPS)
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;  // K/V smem stages

  using WarpTile = typename Shapes_::WarpTile;
  using KVTile = typename Shapes_::KVTile;
  static_assert(QTile::kSize == kBlockM && KVTile::kSize == kBlockN && WarpTile::kSize == kBlockM / kNWarps, "tile sizes");
  // Warp grid inside the Q tile.
  using WarpGrid = Box<QTile::extent(0) / WarpTile::extent(0), QTile::extent(1) / WarpTile::extent(1),
                       QTile::extent(2) / WarpTile::extent(2)>;
  static_assert(WarpGrid::kSize == kNWarps, "warp grid");

  using SmemLayoutQ = typename Base::template SmemLayoutRows<kBlockM>;
  using SmemLayoutKV = typename Base::template SmemLayoutRows<kBlockN>;
  using SmemLayoutVt = typename Base::template SmemLayoutRowsT<kBlockN>;  // V (or K) as the B of P.V (dS.K)
  using OutTraits = std::conditional_t<Base::kDPasses == 1, FwdTraits,
                                       FwdTraits<kDType_, Base::kHeadDimOut, kRank_, kBlockN_, kNWarps_, kStages_, Shapes_>>;

  // Half tiles (the portable forward: WithHalfTiles below): the K/V tile walk also publishes which
  // halves of a tile along axis 0 (its first and last kBlockNHalf keys: the row-major box split on
  // its first axis) each warp's windows meet (bits of TileFlags::active), and a unit that meets one
  // half only computes over that half. Off here.
  static constexpr bool kHalfTiles = false;
  static constexpr int kBlockNHalf = kBlockN / 2;
  using HalfKVTile =
      Box<(KVTile::extent(0) >= 2 ? KVTile::extent(0) / 2 : 1), KVTile::extent(1), KVTile::extent(2)>;
  // A half's K rows (and its V^T columns) in a stage: the full tile's layout at element offset h *
  // kHalfElems (the atoms of 8 rows go rows first, and the swizzle repeats every atom), read through
  // HalfRows / HalfRowsT: the first kBlockNHalf rows of a (kBlockN, D) tile, and the same transposed.
  static constexpr int kHalfElems = kBlockNHalf * Base::kBlockKSmem;
  using HalfRows = cute::Layout<cute::Shape<cute::Int<kBlockNHalf>, cute::Int<kHeadDim_>>,
                                cute::Stride<cute::_1, cute::Int<kBlockN>>>;
  using HalfRowsT = cute::Layout<cute::Shape<cute::Int<kHeadDim_>, cute::Int<kBlockNHalf>>,
                                 cute::Stride<cute::Int<kBlockN>, cute::_1>>;
  using SmemLayoutKVHalf = decltype(cute::composition(SmemLayoutKV{}, HalfRows{}));
  using SmemLayoutVtHalf = decltype(cute::composition(SmemLayoutKV{}, HalfRowsT{}));

  static constexpr int kSmemQ = kBlockM * Base::kRowBytes;
  static constexpr int kSmemKV = kBlockN * Base::kRowBytes;
  // Row windows: int2 (start, end) per axis and in-tile coordinate (a query's window on an axis
  // depends only on its position on that axis; mask.cuh: RowWindowTable).
  static constexpr int kWinEntries =
      QTile::extent(0) + (kRank > 1 ? QTile::extent(1) : 0) + (kRank > 2 ? QTile::extent(2) : 0);
  static constexpr int kSmemWin = kWinEntries * 8;
  static constexpr int kSmemSched = 640;  // CtaSchedule (checked in the kernel)
  static constexpr int kSmemBytes = kSmemQ + 2 * kStages * kSmemKV + kSmemWin + kSmemSched;
};

// The portable forward's traits: Traits (FwdTraits) with half tiles for the 16-bit one-pass kernels
// (the transposed V view of a half is written for them): a warp whose windows meet one half of a K/V
// tile computes S, the softmax and P.V over that half only (3-4% faster on 3-D, 1% on 2-D: H100,
// session 35). The other query-stationary kernels (dQ, gemm) keep FwdTraits' kHalfTiles = false.
template <class Traits>
struct WithHalfTiles : Traits {
  static constexpr bool kHalfTiles =
      sizeof(typename Traits::Element) == 2 && Traits::kDPasses == 1 && Traits::KVTile::extent(0) >= 2;
  static_assert(!kHalfTiles ||
                    (Traits::kBlockNHalf % 16 == 0 && Traits::kHalfElems % (8 * Traits::kBlockKSmem) == 0),
                "a half: whole MMA tiles of keys, starting on a swizzle period");
};
template <class Traits>
using PortableFwdTraitsOf = WithHalfTiles<Traits>;

// CTAs per SM the backward kernels ask ptxas to fit (__launch_bounds__). At 16-bit head dim 32 their
// accumulators are small and the default register budget left the SMs at 8 warps: the dK/dV kernel
// (128 threads) takes four CTAs (128 registers), the dQ kernel three of 8 warps (80; six of its 4-warp
// 64-query CTAs). Elsewhere one: the accumulators need the registers.
template <class Traits>
constexpr bool kSmallHeadDim16 = Traits::kHeadDim <= 32 && sizeof(typename Traits::Element) == 2;
template <class Traits>
constexpr int kDkdvMinBlocks = kSmallHeadDim16<Traits> ? 4 : 1;
template <class Traits>
constexpr int kDqMinBlocks = kSmallHeadDim16<Traits> ? 3 * 8 / Traits::kNWarps : 1;

// Key-stationary backward (dK, dV): a CTA owns a KV tile of kBlockN keys (kNWarps warps x 16 key rows
// per MMA row block; dK and dV accumulate in registers) and walks the Q tiles of its keys' inverse
// neighbourhood, kBlockM queries at a time. Portable default: 64 keys on 4 warps, Q tiles of 32
// (D = 128, so that dK + dV + S + dP stay within 255 registers) or 64 (D = 64). The Hopper backward
// (hopper/launch_bwd.cuh) takes 64 keys on 4 warps (one warpgroup, two CTAs per SM) and Q tiles of 64;
// its non-deterministic mode's warp-specialized kernel 128 keys on 8 warps (hopper/mainloop_bwd.cuh).
// Shapes_: the Q / KV boxes (BwdTileShapes by default; one of the backward's tile configurations,
// tile_shapes.cuh).
template <DType kDType_, int kHeadDim_, int kRank_, int kNWarps_ = 4, int kBlockN_ = 64,
          int kBlockM_ = kPortableBwdBlockM<kHeadDim_>, class Shapes_ = BwdTileShapes<kRank_, kBlockM_, kBlockN_>>
struct BwdKVTraits : TraitsBase<kDType_, kHeadDim_, kRank_, kNWarps_> {
  using Base = TraitsBase<kDType_, kHeadDim_, kRank_, kNWarps_>;
  using Base::kRank;
  static constexpr int kBlockN = kBlockN_;  // keys per CTA (rows of the MMA)
  static constexpr int kBlockM = kBlockM_;  // queries per Q tile (columns)
  using QTile = typename Shapes_::QTile;
  using KVTile = typename Shapes_::KVTile;
  static_assert(QTile::kSize == kBlockM && KVTile::kSize == kBlockN, "tile sizes");

  using SmemLayoutKV = typename Base::template SmemLayoutRows<kBlockN>;
  using SmemLayoutQ = typename Base::template SmemLayoutRows<kBlockM>;
  using OutTraits = std::conditional_t<Base::kDPasses == 1, BwdKVTraits,
                                       BwdKVTraits<kDType_, Base::kHeadDimOut, kRank_, kNWarps_, kBlockN_, kBlockM_, Shapes_>>;

  static constexpr int kSmemKV = kBlockN * Base::kRowBytes;
  static constexpr int kSmemQ = kBlockM * Base::kRowBytes;
  // Two stages of: Q, dO, lse and delta per query; once: the keys' query intervals (int2 per axis and
  // K/V tile coordinate, then per MMA unit and axis: at most one unit per warp).
  static constexpr int kSmemSmallStage = 2 * kBlockM * 4;
  static constexpr int kInvEntries = KVTile::extent(0) + KVTile::extent(1) + KVTile::extent(2);
  static constexpr int kSmemInv = (kInvEntries + 3 * kNWarps_) * 8;
  static constexpr int kSmemSched = 256;
  static constexpr int kSmemBars = 2 * 8;  // an mbarrier per Q/dO stage (TMA loads)
  static constexpr int kSmemBytes =
      2 * kSmemKV + 4 * kSmemQ + 2 * kSmemSmallStage + kSmemInv + kSmemSched + kSmemBars;
};

}  // namespace fused
}  // namespace jax_na
