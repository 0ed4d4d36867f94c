// K/V window tiles and the Q tile of the forward, and the Q/dO tiles of the key-stationary backward,
// by the tensor memory accelerator (TMA): one thread loads a whole
// box of token rows with a tensor map over [B, *S, heads, D], into the same swizzled smem tile the
// cp.async gathers fill (8-row x 128-byte atoms, 128-byte swizzle), and the copy completes on an
// mbarrier with its byte count.
//
// Tensor map dimensions, innermost first (a box of extents E0 x E1 x E2; a 128-byte column block of
// the head dim per load, C = 64 16-bit or 32 float columns):
//   rank 1: {D, heads, L0, B}           box {C, 1, E0, 1}
//   rank 2: {D, heads, L1, L0, B}       box {C, 1, E1, E0, 1}
//   rank 3: {D, heads, L2, L1, L0 * B}  box {C, 1, E2, E1, E0}   (TMA has at most 5 dimensions)
// Boxes past an axis end read zeros, as the gathers do. In rank 3 the merged axis would read the
// next batch item's rows instead: K/V tiles (and the backward's Q/dO tiles, whose columns past the
// data must be zeros) that cross L0 there take the cp.async path; forward Q rows past L0 are never
// stored (their results are dropped row by row), so any finite or non-finite values
// there are harmless. Only without dilation (a dilation group is then the whole axis); other
// problems take the cp.async path.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cute/arch/copy_sm90_tma.hpp>

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "fused/params.cuh"
#include "fused/tile_scheduler.cuh"
#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

// L2 hints: every K/V tile is read by the neighbouring query tiles too (and a backward Q/dO tile by
// the neighbouring key tiles); a forward Q tile by its CTA only.
constexpr uint64_t kTmaEvictLast = 0x14F0000000000000ull;
constexpr uint64_t kTmaEvictFirst = 0x12F0000000000000ull;

// f(coordinates...) of the box at column `col`, group positions org (no dilation: the token
// positions) of head h, batch item b, in the map's dimension order (4 in rank 1, else 5).
template <int kRank, class F>
__device__ __forceinline__ void with_box_coords(int32_t col, int32_t h, const int32_t org[3], int32_t b,
                                                const geo::Problem& pr, const F& f) {
  if constexpr (kRank == 1)
    f(col, h, org[0], b);
  else if constexpr (kRank == 2)
    f(col, h, org[1], org[0], b);
  else
    f(col, h, org[2], org[1], b * pr.axis[0].L + org[0]);
}

// Device, one thread: the box of column block c (64 columns) at group positions org of head h,
// batch item b into dst, completing on mbar.
template <int kRank, class Element>
__device__ __forceinline__ void tma_load_box(const void* map, uint64_t* mbar, uint64_t hint, Element* dst, int32_t c,
                                             int32_t h, const int32_t org[3], int32_t b, const geo::Problem& pr) {
  with_box_coords<kRank>(c * 64, h, org, b, pr, [&](auto... x) {
    if constexpr (sizeof...(x) == 4)
      cute::SM90_TMA_LOAD_4D::copy(map, mbar, hint, dst, x...);
    else
      cute::SM90_TMA_LOAD_5D::copy(map, mbar, hint, dst, x...);
  });
}

// Device: whether a Box-shaped box at org can come by TMA: in rank 3 it must not cross the end of
// axis 0, which the map merges with the batch.
template <int kRank, class Box>
__device__ __forceinline__ bool box_fits_tma(const geo::Problem& pr, const int32_t org[3]) {
  return kRank < 3 || org[0] + Box::extent(0) <= pr.axis[0].L;
}

// Host: encodes a tensor map over a [B, *S, heads, D] tensor of Element (the kernel's 16-bit type,
// or float) for Box-shaped boxes of one 128-byte column block; false when the problem cannot take it
// (dilation, alignment, coordinates past 32 bits, no driver entry point).
template <class Traits, class Box, class Element = typename Traits::Element>
bool encode_token_map(const geo::Problem& pr, const void* ptr, int64_t heads, CUtensorMap* map) {
  constexpr int kRank = Traits::kRank;
  constexpr int kD = Traits::kHeadDim;
  for (int a = 0; a < kRank; ++a)
    if (pr.axis[a].d != 1) return false;
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  // The driver's encoder through the runtime (jax_na does not link libcuda itself).
  using EncodeFn = decltype(&::cuTensorMapEncodeTiled);
  static EncodeFn encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<EncodeFn>(fn);
  }();
  if (encode == nullptr) return false;

  constexpr int kElemBytes = static_cast<int>(sizeof(Element));
  cuuint64_t dims[5], strides[4];  // strides in bytes of dims 1.. (dim 0 is contiguous)
  cuuint32_t box[5], elem_strides[5] = {1, 1, 1, 1, 1};
  int n = 0;
  dims[n] = kD;
  box[n++] = 128 / kElemBytes;
  dims[n] = static_cast<cuuint64_t>(heads);
  box[n++] = 1;
  cuuint64_t stride = static_cast<cuuint64_t>(kD) * kElemBytes;
  strides[0] = stride;
  stride *= static_cast<cuuint64_t>(heads);
  for (int a = kRank - 1; a >= 0; --a) {  // spatial axes, last (fastest) first
    cuuint64_t len = static_cast<cuuint64_t>(pr.axis[a].L);
    if (kRank == 3 && a == 0) len *= static_cast<cuuint64_t>(pr.B);  // merged with the batch
    dims[n] = len;
    box[n] = Box::extent(a);
    strides[n++ - 1] = stride;
    stride *= static_cast<cuuint64_t>(pr.axis[a].L);
  }
  if (kRank < 3) {
    dims[n] = static_cast<cuuint64_t>(pr.B);
    box[n] = 1;
    strides[n++ - 1] = stride;
  } else if (static_cast<int64_t>(pr.axis[0].L) * pr.B > INT32_MAX) {
    return false;  // coordinates are 32-bit
  }
  const CUtensorMapDataType type = std::is_same_v<Element, float> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT32
                                   : std::is_same_v<Element, cutlass::bfloat16_t> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                                                                  : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, n, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Host: the maps of k and v for KVTile boxes; false when the problem cannot take them.
template <class Traits>
bool encode_kv_tensor_maps(const geo::Problem& pr, const void* k, const void* v, KVTensorMaps* maps) {
  using KVTile = typename Traits::KVTile;
  return encode_token_map<Traits, KVTile>(pr, k, pr.Hkv, &maps->k) &&
         encode_token_map<Traits, KVTile>(pr, v, pr.Hkv, &maps->v);
}

// The Q tile by TMA: the smem rows of a CTA's queries are in accumulator order (q_row_coord: warp w
// holds rows 16w..16w+15 forming its WarpTile sub-box). Where that order is the Q tile's row-major
// order (1-D; 2-D with one warp column) one QTile box fills it; otherwise each warp's WarpTile box
// lands at its 16 rows (kNWarps boxes).
template <class Traits>
constexpr bool q_rows_are_row_major() {
  for (int r = 0; r < Traits::kBlockM; ++r)
    for (int a = 0; a < 3; ++a)
      if (q_row_coord<Traits>(r, a) != Traits::QTile::coord(r, a)) return false;
  return true;
}
template <class Traits>
using QTmaBox = std::conditional_t<q_rows_are_row_major<Traits>(), typename Traits::QTile, typename Traits::WarpTile>;

// Host: the map of q for QTmaBox boxes.
template <class Traits>
bool encode_q_tensor_map(const geo::Problem& pr, const void* q, CUtensorMap* map) {
  return encode_token_map<Traits, QTmaBox<Traits>>(pr, q, pr.H, map);
}

// Device, one thread: the CTA's Q tile into sQ, completing on mbar (expected bytes: q_tile_tma_bytes).
template <class Traits, class Element>
__device__ __forceinline__ void load_q_tma(const CUtensorMap& map, const geo::Problem& pr, const CtaSchedule& cs,
                                           Element* sQ, uint64_t* mbar) {
  using QBox = QTmaBox<Traits>;
  using WarpGrid = typename Traits::WarpGrid;
  constexpr int kBoxes = Traits::kBlockM / QBox::kSize;
  static_assert(kBoxes == 1 || (kBoxes == Traits::kNWarps && QBox::kSize == 16),
                "per-warp Q boxes need warp w to hold rows 16w..16w+15");
  constexpr int kCols = Traits::kHeadDim / 64;
  const int32_t h = cs.h, b = static_cast<int32_t>(cs.b);
#pragma unroll
  for (int i = 0; i < kBoxes; ++i) {
    int32_t o[3];
#pragma unroll
    for (int a = 0; a < 3; ++a) o[a] = cs.q0[a] + (kBoxes == 1 ? 0 : WarpGrid::coord(i, a) * QBox::extent(a));
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      // Column block c of the (kBlockM, D) tile is the (kBlockM, 64) tile at element c * kBlockM * 64;
      // box i's rows start at row i * QBox::kSize of it (a multiple of 8: the swizzle lines up).
      tma_load_box<Traits::kRank>(&map, mbar, kTmaEvictFirst, sQ + c * Traits::kBlockM * 64 + i * QBox::kSize * 64,
                                  c, h, o, b, pr);
    }
  }
}

template <class Traits>
constexpr uint32_t q_tile_tma_bytes() {
  return static_cast<uint32_t>(Traits::kBlockM) * Traits::kHeadDim * sizeof(typename Traits::Element);
}

// Device: whether window tile `org` of CTA cs can come by TMA (the maps exist).
template <class Traits>
__device__ __forceinline__ bool kv_tile_fits_tma(const geo::Problem& pr, const int32_t org[3]) {
  return box_fits_tma<Traits::kRank, typename Traits::KVTile>(pr, org);
}

// Device, one thread: the K and V boxes of window tile `org` into sK/sV, completing on mbar (whose
// expected bytes the caller has set: kv_tile_tma_bytes).
template <class Traits, class Element>
__device__ __forceinline__ void load_kv_tma(const KVTensorMaps& maps, const geo::Problem& pr, const CtaSchedule& cs,
                                            const int32_t org[3], Element* sK, Element* sV, uint64_t* mbar) {
  constexpr int kCols = Traits::kHeadDim / 64;
  constexpr int kColElems = Traits::kBlockN * 64;  // one column block of the smem tile
  const int32_t h = cs.hkv, b = static_cast<int32_t>(cs.b);
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    tma_load_box<Traits::kRank>(&maps.k, mbar, kTmaEvictLast, sK + c * kColElems, c, h, org, b, pr);
    tma_load_box<Traits::kRank>(&maps.v, mbar, kTmaEvictLast, sV + c * kColElems, c, h, org, b, pr);
  }
}

template <class Traits>
constexpr uint32_t kv_tile_tma_bytes() {
  return 2u * Traits::kBlockN * Traits::kHeadDim * sizeof(typename Traits::Element);
}

// Host: the maps of q and d_out for a key-stationary backward's QTile boxes (its Q tiles' rows are
// the box's row-major order); false when the problem cannot take them.
template <class Traits>
bool encode_q_tile_maps(const geo::Problem& pr, const void* q, const void* d_out, QTensorMaps* maps) {
  using QTile = typename Traits::QTile;
  return encode_token_map<Traits, QTile>(pr, q, pr.H, &maps->q) &&
         encode_token_map<Traits, QTile>(pr, d_out, pr.H, &maps->d_out);
}

// Device, one thread: the Q and dO tiles at group positions org of query head h into sQ/sdO,
// completing on mbar (expected bytes: 2 * q_tile_tma_bytes).
template <class Traits, class Element>
__device__ __forceinline__ void load_q_do_tma(const QTensorMaps& maps, const geo::Problem& pr, int32_t h, int32_t b,
                                              const int32_t org[3], Element* sQ, Element* sdO, uint64_t* mbar) {
  constexpr int kColElems = Traits::kBlockM * 64;  // one column block of the smem tile
#pragma unroll
  for (int c = 0; c < Traits::kHeadDim / 64; ++c) {
    tma_load_box<Traits::kRank>(&maps.q, mbar, kTmaEvictLast, sQ + c * kColElems, c, h, org, b, pr);
    tma_load_box<Traits::kRank>(&maps.d_out, mbar, kTmaEvictLast, sdO + c * kColElems, c, h, org, b, pr);
  }
}

}  // namespace fused
}  // namespace jax_na
