// Which of a thread's columns of a score row lie inside the row's window, as one bit word.
//
// Per row of an MMA accumulator (SM80 m16n8 fragments, SM90 wgmma 64xN) a thread holds the columns
// col(c) = 8 * (c / 2) + c % 2 + lane_col, c < kCols = keys / 4, lane_col = 2 * (lane % 4). The KV
// tile is a row-major box of power-of-two extents, so its coordinate on an axis is a bit field of col
// at the axis' stride, and a window is an interval [lo, hi) per axis. Along one axis the thread's
// coordinates repeat in blocks of consecutive c and rise within a block, so the columns inside
// [lo, hi) are one interval per block, [below(lo), below(hi)), the same in every block. A row's word
// (a few integer instructions per axis) leaves one bit test per score instead of one per axis.
// Plain C++ (cuda/fused/test_column_mask.cc checks it against the definition; tests/test_host_cc.py
// runs it).
#pragma once

#include <cstdint>

#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

// An axis of extent E whose coordinate sits at stride St of the column index (both powers of two).
template <int E, int St>
struct ColumnAxis {
  // Consecutive columns c over which the axis' coordinates go through one period.
  static constexpr int kBlock = E * St / 4 > 2 ? E * St / 4 : 2;

  // How many columns of a block have a coordinate below t (any t: windows are tile-relative).
  JNA_HD static int32_t below(int32_t t, int lane_col) {
    if constexpr (St >= 8) {  // the coordinate is a bit field of c / 2: each one on St / 4 columns
      return geo::imin(geo::imax(t, 0), E) * (St / 4);
    } else if constexpr (St == 1 && E == 1) {
      return t > 0 ? 2 : 0;
    } else if constexpr (St == 1) {  // lane_col % E + {0, 1, 8, 9, 16, 17, ...}
      const int32_t x = geo::imin(geo::imax(t - (lane_col & (E - 1)), 0), E);
      return 2 * (x >> 3) + geo::imin(x & 7, 2);
    } else {  // St 2 or 4: (8 / St) * (c / 2) + lane_col / St (mod E), each on two columns
      constexpr int kStep = 8 / St;
      const int32_t off = lane_col / St;
      if constexpr (E >= kStep) {
        const int32_t x = geo::imin(geo::imax(t - off, 0), E);
        return 2 * ((x + kStep - 1) / kStep);
      } else {  // one coordinate for every column
        return (off & (E - 1)) < t ? 2 : 0;
      }
    }
  }
};

// Bits [0, n) of a word of kWidth <= 32 bits, n in [0, kWidth].
template <int kWidth>
JNA_HD uint32_t low_bits(int32_t n) {
  if constexpr (kWidth < 32)
    return (1u << n) - 1u;
  else
    return n >= 32 ? ~0u : (1u << n) - 1u;
}

// Bit c (c < kCols) set where the axis coordinate of column c lies in [lo, hi).
template <int E, int St, int kCols>
JNA_HD uint32_t axis_column_bits(int32_t lo, int32_t hi, int lane_col) {
  using A = ColumnAxis<E, St>;
  constexpr int kBlock = A::kBlock;
  static_assert(kCols <= 32 && kBlock <= kCols && kCols % kBlock == 0, "a block of columns per word");
  uint32_t repeat = 0;  // bit 0 of every block
  for (int i = 0; i < kCols; i += kBlock) repeat |= 1u << i;
  // An empty window (hi <= lo) gives below(lo) >= below(hi): no bit.
  const uint32_t block = low_bits<kBlock>(A::below(hi, lane_col)) & ~low_bits<kBlock>(A::below(lo, lane_col));
  return block * repeat;  // block < 2^kBlock: no carries between blocks
}

// A row's word over the axes of a box (Box: extent(a) and shift(a), tile_shapes.cuh) of kRank axes:
// interval(a) gives the row's [lo, hi) on axis a relative to the box origin (an int2, or anything
// with .x and .y). A callable rather than arrays: arrays of the intervals stayed in local memory.
template <class Box, int kRank, int kCols, class Interval>
JNA_HD uint32_t window_column_bits(const Interval& interval, int lane_col) {
  const auto i0 = interval(0);
  uint32_t m = axis_column_bits<Box::extent(0), 1 << Box::shift(0), kCols>(i0.x, i0.y, lane_col);
  if constexpr (kRank > 1) {
    const auto i1 = interval(1);
    m &= axis_column_bits<Box::extent(1), 1 << Box::shift(1), kCols>(i1.x, i1.y, lane_col);
  }
  if constexpr (kRank > 2) {
    const auto i2 = interval(2);
    m &= axis_column_bits<Box::extent(2), 1 << Box::shift(2), kCols>(i2.x, i2.y, lane_col);
  }
  return m;
}

}  // namespace fused
}  // namespace jax_na
