// Tile shapes of the fused kernels: boxes of queries/keys, the default shapes per rank, and the
// compiled tile configurations per kernel set and direction (the user's q_tile_shape / kv_tile_shape
// and backward_q_tile_shape / backward_kv_tile_shape pick one; configuration 0 is the default).
// Plain C++ (no CuTe), so the host-side table below can be built from the same types the kernels
// are instantiated with.
//
// Every configuration here must be listed in jax_na/_checks.py (FUSED_FWD_TILES, FUSED_BWD_TILES),
// which validates a call's shapes before anything is traced and picks the configuration of a call
// that gives none (the default, or 8x16 Q tiles for 2-D windows longer along the last axis);
// tests/test_tiles.py and tests/test_bwd_tiles.py check the lists agree.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"

// Default KV tile of the portable forward (overridable at compile time for experiments: 32 or 64).
#ifndef JNA_FUSED_BLOCK_N
#define JNA_FUSED_BLOCK_N 64
#endif

namespace jax_na {
namespace fused {

// A 3-axis box of extents E0 x E1 x E2 (row-major, powers of two: coordinates are bit fields of the
// linear index).
template <int E0, int E1, int E2>
struct Box {
  static constexpr int kSize = E0 * E1 * E2;
  static constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }
  __host__ __device__ static constexpr int extent(int a) { return a == 0 ? E0 : (a == 1 ? E1 : E2); }
  __host__ __device__ static constexpr int shift(int a) {
    return a == 0 ? ilog2(E1 * E2) : (a == 1 ? ilog2(E2) : 0);
  }
  // Coordinate on axis a of linear (row-major) index i.
  __host__ __device__ static constexpr int coord(int i, int a) { return (i >> shift(a)) & (extent(a) - 1); }
  static_assert((E0 & (E0 - 1)) == 0 && (E1 & (E1 - 1)) == 0 && (E2 & (E2 - 1)) == 0,
                "tile extents must be powers of two");
};

// A query-stationary kernel's boxes: the CTA's Q tile, one warp's sub-box of it, and the KV tile.
template <class QTile_, class WarpTile_, class KVTile_>
struct Tiles {
  using QTile = QTile_;
  using WarpTile = WarpTile_;
  using KVTile = KVTile_;
};

// Default tile shapes per rank, KV tile size and warp count (axes past the rank have extent 1).
// Q tile: 128 queries; warp tile: the 128 / kNWarps queries of one warp; KV tile: kBlockN keys.
template <int kRank, int kBlockN, int kNWarps>
struct TileShapes;
template <int kBlockN, int kNWarps>
struct TileShapes<1, kBlockN, kNWarps> : Tiles<Box<128, 1, 1>, Box<128 / kNWarps, 1, 1>, Box<kBlockN, 1, 1>> {};
template <int kBlockN, int kNWarps>
struct TileShapes<2, kBlockN, kNWarps> : Tiles<Box<16, 8, 1>, Box<16 / kNWarps, 8, 1>, Box<kBlockN / 8, 8, 1>> {};
template <int kBlockN, int kNWarps>
struct TileShapes<3, kBlockN, kNWarps> : Tiles<Box<2, 8, 8>, Box<8 / kNWarps, 4, 4>, Box<kBlockN / 16, 4, 4>> {};

// A list of tile configurations: kCount of them, At<i> the i-th.
template <class... Ts>
struct TileConfigs {
  static constexpr int kCount = sizeof...(Ts);
  template <int i, class... Rest>
  struct Pick;
  template <int i, class T0, class... Rest>
  struct Pick<i, T0, Rest...> : Pick<i - 1, Rest...> {};
  template <class T0, class... Rest>
  struct Pick<0, T0, Rest...> {
    using type = T0;
  };
  template <int i>
  using At = typename Pick<i, Ts...>::type;
  using List = TileConfigs;  // the plain list (a configuration set derives from it)
};

// Two TileConfigs lists, one after the other.
template <class A, class B>
struct ConcatConfigs;
template <class... As, class... Bs>
struct ConcatConfigs<TileConfigs<As...>, TileConfigs<Bs...>> {
  using type = TileConfigs<As..., Bs...>;
};

// A portable warp's box of kRows queries in rank kRank: 16 rows (one m16 MMA atom: 16, 2x8, 1x4x4)
// or 32 (two atoms, axis 0 doubled: 32, 4x8, 2x4x4). Of the 32-query boxes that tile every
// configuration below, these meet the fewest K/V tiles on p2, p3, p8 and 7x31 on 64x256
// (jax_na.tile_model; on p10, 1x4x8 meets 1.5% fewer than 2x4x4).
template <int kRank, int kRows>
using WarpBox = std::conditional_t<kRank == 1, Box<kRows, 1, 1>,
                                   std::conditional_t<kRank == 2, Box<kRows / 8, 8, 1>, Box<kRows / 16, 4, 4>>>;

// Rows per warp of the portable forward. 16-bit head dim 128 takes two m16 atoms per warp, as
// FlashAttention-2 does: each K/V fragment a warp reads from smem (ldmatrix) serves 32 rows, so a
// 128-query CTA of 4 warps (two per SM, 255 registers) reads each K/V tile 4 times instead of 8.
// H100, bf16, D = 128, default tiles, ms, 16 / 32 rows (cuda/fused/NOTES.md, session 40): p1 2.38 /
// 2.05, p2 1.04 / 0.92, p3 1.68 / 1.54, p6 26.6 / 21.5, p7 22.7 / 17.8, p9 72.6 / 57.1, p10 1.46 /
// 1.44 (coarser warp boxes skip fewer of its causal tiles); p8 (2x8x8 over 4x4x4) 105.2 / 86.8.
// Head dim 64 keeps 16: two atoms' accumulators need 234-240 registers there, so 4-warp CTAs fit
// two per SM (8 warps against 16), which lost (p2 0.514 / 0.56 ms, p3 0.83 / 0.92, p11 1.256 /
// 1.293; at 168 or 128 registers, spills made it slower still). Head dim 32 (64-query CTAs of
// 16-row warps won there), float32 (3xTF32 fragments: three times the registers) and head dim 256
// (32-key tiles) keep 16 too.
template <DType kDType, int kHeadDim>
constexpr int kPortableFwdWarpRows = (kDType != DType::kF32 && kHeadDim > 64 && kHeadDim <= 128) ? 32 : 16;

// Portable forward (128-query tiles: 8 warps of 16 rows or 4 of 32). Rows of 16-bit elements at head
// dims up to 128 take 64-key tiles and have alternatives; float32 and head dim 256 (kBlockN 32: twice
// the bytes per key) have the default only. Measured with `python -m jax_na.profile --sweep-tiles`
// (H200, bf16, D=128, 16-row warps, cuda/fused/NOTES.md session 20):
// - 2-D: 16x8 over 8x8 by default; 8x16 over 8x8 for windows longer along the last axis (7x31 on
//   64x256: 0.571 vs 0.617 ms; p2's square window: 1.173 vs 1.111).
// - 3-D: 4x4x8 over 2x8x4 by default (the Hopper kernel's Q tile too: fewer tiles per warp where
//   the first axis' window is short; p3 1.896 vs 1.966 ms, p10 1.638 vs 1.738, p8 equal), 2x8x8
//   over 4x4x4.
template <int kRank, int kBlockN, int kWarpRows = 16>
struct PortableFwdTiles : TileConfigs<Tiles<typename TileShapes<kRank, kBlockN, 8>::QTile, WarpBox<kRank, kWarpRows>,
                                            typename TileShapes<kRank, kBlockN, 8>::KVTile>> {};
// 2-D 8x16 keeps 16-row warps: the windows it is for (short on the first axis) meet more K/V tiles
// with 32-row warps' 4x8 boxes than the 2x8 ones gain back (7x31 on 64x256, H100, D = 128, ms: 8x16
// on 16-row warps 1.797, on 32-row ones 2.096, 16x8 on 32-row ones 2.144).
template <int kWarpRows>
struct PortableFwdTiles<2, 64, kWarpRows> : TileConfigs<Tiles<Box<16, 8, 1>, WarpBox<2, kWarpRows>, Box<8, 8, 1>>,
                                                        Tiles<Box<8, 16, 1>, WarpBox<2, 16>, Box<8, 8, 1>>> {};
template <int kWarpRows>
struct PortableFwdTiles<3, 64, kWarpRows> : TileConfigs<Tiles<Box<4, 4, 8>, WarpBox<3, kWarpRows>, Box<2, 8, 4>>,
                                                        Tiles<Box<2, 8, 8>, WarpBox<3, kWarpRows>, Box<4, 4, 4>>> {};

// 64-query tiles on 4 warps (the warps' boxes of the 128-query tiles, over 64 keys): the 16-bit
// head-dim-32 forward appends them in 1-D and 2-D for small windows, where a 128-query CTA walks K/V
// tiles that most of its warps skip (they wait at the step's barrier: 44% of p4's stall samples)
// and 64-query CTAs walk fewer such tiles. H100, bf16, D = 32, ms, 128 / 64 queries: p4 0.292 /
// 0.262, p5 0.080 / 0.055, 13x13 on 56x56 0.127 / 0.114, p2's window 0.383 / 0.369, 1-D k255 0.362 /
// 0.342; in 3-D 4x4x4 over 4x4x4 lost (p3's window 0.630 / 0.659), so 3-D has none.
template <int kRank>
struct SmallQTiles : TileConfigs<> {};
template <>
struct SmallQTiles<1> : TileConfigs<Tiles<Box<64, 1, 1>, WarpBox<1, 16>, Box<64, 1, 1>>> {};
template <>
struct SmallQTiles<2> : TileConfigs<Tiles<Box<8, 8, 1>, WarpBox<2, 16>, Box<8, 8, 1>>> {};

// The portable forward's configurations for (dtype, head dim, rank): float32 rows and head dim 256
// take twice the bytes per key, so 32-key tiles keep their smem at ~130 KB; 16-bit head dim 32 adds
// the 64-query tiles last in 1-D and 2-D.
template <DType kDType, int kHeadDim, int kRank,
          class Base = PortableFwdTiles<kRank, (kDType == DType::kF32 || kHeadDim > 128) ? 32 : JNA_FUSED_BLOCK_N,
                                        kPortableFwdWarpRows<kDType, kHeadDim>>>
using PortableFwdTilesFor =
    std::conditional_t<kDType != DType::kF32 && kHeadDim <= 32 && Base::template At<0>::KVTile::kSize == 64,
                       typename ConcatConfigs<typename Base::List, typename SmallQTiles<kRank>::List>::type, Base>;

// Hopper forward (two consumer warpgroups splitting the Q tile along axis 0; see
// hopper/kernel_traits.cuh). Defaults, measured (H200, bf16, cuda/fused/NOTES.md sessions 19, 26):
// - 128-key K/V tiles in every rank. They halve the per-tile work outside the GEMMs (barriers, flags,
//   row reductions, the O rescale), which outweighs the keys their coarser boxes add: 2-D p2 0.688 ->
//   0.597 ms, p6 14.95 -> 12.64, p7 12.34 -> 9.96 against 64-key tiles; 3-D (4x4x8 queries over 2x8x8
//   keys against 2x8x4, three stages each) p3 1.093 -> 0.927, p8 63.6 -> 51.4, p9 38.4 -> 30.1, p10
//   1.02 -> 0.84. (With two stages, before the row windows shrank to a table per axis, 3-D 128-key
//   tiles had measured slower.)
// - 3-D: 4x4x8 queries: a warpgroup's 2x4x8 window box rounds to fewer tiles than 2x8x8's 1x8x8
//   where the first axis' window is short (p3 0.927 vs 1.100 ms, p10 0.84 vs 0.97).
// Alternatives: 2-D 8x16 over 8x16 (windows long on the last axis: 7x31 on 64x256 0.348 vs 0.462 ms;
// p2 0.598 vs 0.609); 3-D 2x8x8 over 2x8x8 (windows long on every axis: p8 50.8 vs 51.4 ms, p9 29.1
// vs 30.1) and 4x4x8 over the 64-key 2x8x4 (finer boxes for small windows); then three 128-key
// boxes of one or two key planes, which the chooser's pair count (tools/tile_work.py) takes where
// the first axis' window is short (H100, session 50, standalone): p3 8x4x4 over 1x8x16 (0.54 of the
// pairs useful against 0.46: a warpgroup's 4x4x4 box meets its planes of keys one by one; 0.704 vs
// 0.781 ms), p10 4x4x8 over 2x16x4 (0.51 against 0.46; 0.622 vs 0.679 ms), small windows 8x2x8
// over 1x8x16 (3x7x7 over 8x64x64 and 5x7x7 over 16x56x56: 0.23 / 0.27 against 0.14 / 0.17; 1.14
// vs 1.69 and 1.06 vs 1.37 ms). (4x4x8 over 1x4x32, 5% fewer pairs on p8, measured 44.2 vs 44.4 ms:
// not kept.)
template <int kRank>
struct HopperFwdTiles;
template <>
struct HopperFwdTiles<1> : TileConfigs<TileShapes<1, 128, 8>> {};
template <>
struct HopperFwdTiles<2>
    : TileConfigs<TileShapes<2, 128, 8>, Tiles<Box<8, 16, 1>, Box<2, 8, 1>, Box<8, 16, 1>>> {};
template <>
struct HopperFwdTiles<3>
    : TileConfigs<Tiles<Box<4, 4, 8>, Box<1, 4, 4>, Box<2, 8, 8>>, Tiles<Box<2, 8, 8>, Box<1, 4, 4>, Box<2, 8, 8>>,
                  Tiles<Box<4, 4, 8>, Box<1, 4, 4>, Box<2, 8, 4>>, Tiles<Box<8, 4, 4>, Box<1, 4, 4>, Box<1, 8, 16>>,
                  Tiles<Box<4, 4, 8>, Box<1, 4, 4>, Box<2, 16, 4>>, Tiles<Box<8, 2, 8>, Box<1, 2, 8>, Box<1, 8, 16>>> {};

// Backward tilings: the KV tile a CTA of the key-stationary dK/dV kernel owns (kBlockN keys), the Q
// tile of its inverse neighbourhood it takes per step (kBlockM queries), and the Tiles of the
// query-stationary dQ kernel (portable: 128 queries on 8 warps; Hopper: 64 on one warpgroup; over KV
// tiles of kDqBlockN keys), which go with them: a configuration is one choice for the whole backward.
template <class QTile_, class KVTile_, class DqTiles_>
struct BwdTiles {
  using QTile = QTile_;
  using KVTile = KVTile_;
  using DqTiles = DqTiles_;
};

// Keys per dQ-kernel KV tile: portable 32 (dQ, S and dP accumulators of 128 queries in registers),
// Hopper 64 (wgmma N = 64 for S and dP). Queries per dQ CTA: portable 128 (8 warps; 64 on 4 warps at
// head dim 32, see kPortableDqBlockMFor), Hopper 64 (one warpgroup; two CTAs per SM, see
// kHopperBwdBlockN below).
constexpr int kPortableDqBlockN = 32;
constexpr int kHopperDqBlockN = 64;
constexpr int kPortableDqBlockM = 128;
// At head dim 32 a dQ CTA's products are short beside its steps' barriers and loads, and with small
// windows most of its warps skip most of its K/V tiles: 64-query CTAs (six per SM at 16 bits) walk
// fewer of those. H100, bf16, backward alone (delta, dQ, dK/dV), ms, 128 / 64 queries: p4 0.90 /
// 0.83, p5 0.184 / 0.156, 13x13 on 56x56 0.362 / 0.335, p2's window 1.07 / 1.04, p3's 2.14 / 2.08,
// 1-D k255 1.24 / 1.22.
template <int kHeadDim>
constexpr int kPortableDqBlockMFor = kHeadDim <= 32 ? 64 : kPortableDqBlockM;

// The dQ kernel's default tiles of kDqBlockM queries (warps of 16): the forward's shapes at 128
// queries, except in 3-D, where 4x4x8 queries over 2 x (kDqBlockN / 8) x 4 keys (warps of 1x4x4)
// visit fewer key tiles per warp than 2x8x8 over (kDqBlockN / 16) x 4 x 4 for windows short on the
// first axis (H200, bf16, D = 128, fwd+bwd: p3 10.41 -> 10.27 ms portable, 6.52 -> 6.36 Hopper; p10
// -1% / -2%; p8 equal; cuda/fused/NOTES.md). 64 queries halve the first axis.
template <int kRank, int kDqBlockN, int kDqBlockM = kPortableDqBlockM>
struct DqTileShapes;
template <int kDqBlockN, int kDqBlockM>
struct DqTileShapes<1, kDqBlockN, kDqBlockM> : Tiles<Box<kDqBlockM, 1, 1>, Box<16, 1, 1>, Box<kDqBlockN, 1, 1>> {};
template <int kDqBlockN, int kDqBlockM>
struct DqTileShapes<2, kDqBlockN, kDqBlockM>
    : Tiles<Box<kDqBlockM / 8, 8, 1>, Box<2, 8, 1>, Box<kDqBlockN / 8, 8, 1>> {};
template <int kDqBlockN, int kDqBlockM>
struct DqTileShapes<3, kDqBlockN, kDqBlockM> : Tiles<Box<kDqBlockM / 32, 4, 8>, Box<1, 4, 4>, Box<2, kDqBlockN / 8, 4>> {};

// Default backward boxes per rank: compact (an axis of extent e with window k meets about e + k - 1
// queries); 3-D keys take the longer extent on the last axis.
template <int kRank, int kBlockM, int kBlockN, int kDqBlockN = kPortableDqBlockN, int kDqBlockM = kPortableDqBlockM>
struct BwdTileShapes;
template <int kBlockM, int kBlockN, int kDqBlockN, int kDqBlockM>
struct BwdTileShapes<1, kBlockM, kBlockN, kDqBlockN, kDqBlockM>
    : BwdTiles<Box<kBlockM, 1, 1>, Box<kBlockN, 1, 1>, DqTileShapes<1, kDqBlockN, kDqBlockM>> {};
template <int kBlockM, int kBlockN, int kDqBlockN, int kDqBlockM>
struct BwdTileShapes<2, kBlockM, kBlockN, kDqBlockN, kDqBlockM>
    : BwdTiles<Box<kBlockM / 8, 8, 1>, Box<kBlockN / 8, 8, 1>, DqTileShapes<2, kDqBlockN, kDqBlockM>> {};
template <int kBlockM, int kBlockN, int kDqBlockN, int kDqBlockM>
struct BwdTileShapes<3, kBlockM, kBlockN, kDqBlockN, kDqBlockM>
    : BwdTiles<Box<kBlockM / 16, 4, 4>, Box<4, 4, kBlockN / 16>, DqTileShapes<3, kDqBlockN, kDqBlockM>> {};

// The backward's tile configurations (the user's backward_q_tile_shape / backward_kv_tile_shape pick
// one). Alternatives to the compact default for windows much shorter on the first axis than on the
// others (e.g. 3x13x13 video windows, 7x31 in 2-D): the inverse neighbourhood of a KV box of
// extents e has about prod(e_a + k_a - 1) queries, so flatter boxes (2-D: 16 keys along the last
// axis; 3-D: one or two key planes of 8x8) meet fewer of them there; their dQ kernel takes Q tiles
// longer on the last axes too (2-D (kDqBlockM / 16) x 16 over (kDqBlockN / 16) x 16; 3-D
// (kDqBlockM / 64) x 8 x 8 over 1x4x8 keys portable, 4x4x4 Hopper: 3x13x13 over 16x32x32 portable
// 4.91 -> 4.80 ms; flatter Hopper keys lost 3%). 1-D has the default only. kBlockM / kBlockN: the
// kernel set's queries per step and keys per CTA of the dK/dV kernel; kDqBlockN / kDqBlockM: keys per
// step and queries per CTA of the dQ kernel.
template <int kRank, int kBlockM, int kBlockN, int kDqBlockN = kPortableDqBlockN, int kDqBlockM = kPortableDqBlockM>
struct BwdTileConfigs : TileConfigs<BwdTileShapes<kRank, kBlockM, kBlockN, kDqBlockN, kDqBlockM>> {};
template <int kBlockM, int kBlockN, int kDqBlockN, int kDqBlockM>
struct BwdTileConfigs<2, kBlockM, kBlockN, kDqBlockN, kDqBlockM>
    : TileConfigs<BwdTileShapes<2, kBlockM, kBlockN, kDqBlockN, kDqBlockM>,
                  BwdTiles<Box<kBlockM / 16, 16, 1>, Box<kBlockN / 16, 16, 1>,
                           Tiles<Box<kDqBlockM / 16, 16, 1>, Box<2, 8, 1>, Box<kDqBlockN / 16, 16, 1>>>> {};
template <int kBlockM, int kBlockN, int kDqBlockN, int kDqBlockM>
struct BwdTileConfigs<3, kBlockM, kBlockN, kDqBlockN, kDqBlockM>
    : TileConfigs<BwdTileShapes<3, kBlockM, kBlockN, kDqBlockN, kDqBlockM>,
                  BwdTiles<Box<kBlockM / 32, 4, 8>, Box<kBlockN / 64, 8, 8>,
                           Tiles<Box<kDqBlockM / 64, 8, 8>, Box<1, 4, 4>,
                                 std::conditional_t<kDqBlockN == 32, Box<1, 4, 8>, Box<kDqBlockN / 16, 4, 4>>>>> {};

// Portable dK/dV: 64 keys on 4 warps, Q tiles of 32 queries (head dims over 64: dK + dV + S + dP
// within 255 registers) or 64.
template <int kHeadDim>
constexpr int kPortableBwdBlockM = kHeadDim > 64 ? 32 : 64;
// float32 keeps the default configuration only: its 3xTF32 backward units were the build's longest
// (174-259 s each on CI's two cores), and float32 is the accuracy path, not the fast one.
template <DType kDType, int kHeadDim, int kRank,
          class All = BwdTileConfigs<kRank, kPortableBwdBlockM<kHeadDim>, 64, kPortableDqBlockN,
                                     kPortableDqBlockMFor<kHeadDim>>>
using PortableBwdTiles =
    std::conditional_t<kDType == DType::kF32, TileConfigs<typename All::template At<0>>, typename All::List>;
// Hopper: both kernels on one warpgroup per CTA, two CTAs per SM (dK/dV: 64 keys, Q tiles of 64;
// dQ: 64 queries over 64-key tiles): each CTA meets only its own barrier, so one warpgroup's
// exponentials and loads run beside the other CTA's products, and one CTA's prologue beside the
// other's loop. Against two warpgroups sharing a CTA (128 keys / 128 queries), H100, bf16, D = 128,
// backward alone: p2 -9.6%, p3 -5.0%, p1 -3.3%, p10 -6.7%, p7 +1.4% (cuda/fused/NOTES.md session
// 32). -DJNA_BWD_EXPERIMENT_TWO_WARPGROUPS (experiment knob) builds the two-warpgroup CTAs.
#if defined(JNA_BWD_EXPERIMENT_TWO_WARPGROUPS)
constexpr int kHopperBwdBlockN = 128;
constexpr int kHopperDqBlockM = 128;
#else
constexpr int kHopperBwdBlockN = 64;
constexpr int kHopperDqBlockM = 64;
#endif
template <int kRank>
using HopperBwdTiles = BwdTileConfigs<kRank, 64, kHopperBwdBlockN, kHopperDqBlockN, kHopperDqBlockM>;
// The Hopper backward's non-deterministic mode (hopper/mainloop_bwd.cuh: one warp-specialized kernel
// adds dK, dV and dQ): CTAs of 128 keys on two consumer warpgroups, Q tiles of 64; configurations 0
// and 1 are HopperBwdTiles' with twice its keys (1-D 128; 2-D 16x8, 8x16; 3-D 4x4x8, 2x8x8), and 3-D
// adds 1x8x8 queries over 2x8x8 keys: on axes 1 and 2 a line of 8 queries covers the inverse
// neighbourhood of 8 keys in fewer tiles than two lines of 4 where the window is 13 long (p3: 6400
// steps against configuration 1's 7200, the same 8 runs of consecutive tokens per Q tile;
// tools/tile_work.py). Their dQ tiles are unused (no dQ kernel runs in this mode).
template <int kRank, class Base = typename BwdTileConfigs<kRank, 64, 128, kHopperDqBlockN, kHopperDqBlockM>::List>
struct HopperBwdWsTilesOf {
  using type = Base;
};
template <class Base>
struct HopperBwdWsTilesOf<3, Base> {
  using type = typename ConcatConfigs<
      Base, TileConfigs<BwdTiles<Box<1, 8, 8>, Box<2, 8, 8>, typename Base::template At<1>::DqTiles>>>::type;
};
template <int kRank>
using HopperBwdWsTiles = typename HopperBwdWsTilesOf<kRank>::type;

// Host-side description of one configuration (extents per axis; axes past the rank are 1; warp: a
// query-stationary configuration's warp box, zeros for the backward's).
struct TileConfigDesc {
  int32_t q[3];
  int32_t kv[3];
  int32_t warp[3];
};

template <class Shapes, class = void>
struct HasWarpTile : std::false_type {};
template <class Shapes>
struct HasWarpTile<Shapes, std::void_t<typename Shapes::WarpTile>> : std::true_type {};

template <class Shapes>
constexpr TileConfigDesc describe_tiles() {
  using Q = typename Shapes::QTile;
  using KV = typename Shapes::KVTile;
  TileConfigDesc d{{Q::extent(0), Q::extent(1), Q::extent(2)}, {KV::extent(0), KV::extent(1), KV::extent(2)}, {0, 0, 0}};
  if constexpr (HasWarpTile<Shapes>::value) {
    using W = typename Shapes::WarpTile;
    d.warp[0] = W::extent(0), d.warp[1] = W::extent(1), d.warp[2] = W::extent(2);
  }
  return d;
}

// Calls f(std::integral_constant<int, i>{}) for the runtime configuration index i < Configs::kCount
// (cudaErrorInvalidValue for any other index).
template <class Configs, int i = 0, class F>
cudaError_t with_tile_config(int index, F&& f) {
  if constexpr (i < Configs::kCount) {
    if (index == i) return f(std::integral_constant<int, i>{});
    return with_tile_config<Configs, i + 1>(index, f);
  } else {
    return cudaErrorInvalidValue;
  }
}

}  // namespace fused
}  // namespace jax_na
