// Host test of column_mask.cuh: every row word against the definition (column col(c) of the thread
// is inside the window iff its coordinate on every axis is), for every power-of-two KV tile box of
// 32, 64 and 128 keys, every lane and windows starting and ending anywhere near the tile.
#include <cstdio>
#include <cstdlib>

#include "fused/column_mask.cuh"

namespace {

// The Box of tile_shapes.cuh (row-major, extents E0 x E1 x E2), without its CUDA includes.
template <int E0, int E1, int E2>
struct TestBox {
  static constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }
  static constexpr int extent(int a) { return a == 0 ? E0 : (a == 1 ? E1 : E2); }
  static constexpr int shift(int a) { return a == 0 ? ilog2(E1 * E2) : (a == 1 ? ilog2(E2) : 0); }
  static constexpr int coord(int i, int a) { return (i >> shift(a)) & (extent(a) - 1); }
};

long g_checked = 0, g_failed = 0;

template <class Box, int kRank>
void check_box() {
  constexpr int kKeys = Box::extent(0) * Box::extent(1) * Box::extent(2);
  constexpr int kCols = kKeys / 4;
  // Per axis: lo and hi from -3 to extent + 3 (empty and reversed windows included); the other
  // axes take a few windows each so that every combination of axes is exercised.
  for (int lane = 0; lane < 4; ++lane) {
    const int lane_col = 2 * lane;
    for (int a = 0; a < kRank; ++a) {
      const int e = Box::extent(a);
      for (int lo = -3; lo <= e + 3; ++lo) {
        for (int hi = lo - 2; hi <= e + 3; ++hi) {
          for (int other = 0; other < 3; ++other) {
            int32_t l[3], h[3];
            for (int b = 0; b < 3; ++b) {
              const int eb = Box::extent(b);
              // other windows: everything, the middle, the first coordinate only
              l[b] = other == 0 ? -5 : (other == 1 ? eb / 4 : 0);
              h[b] = other == 0 ? eb + 5 : (other == 1 ? (3 * eb + 3) / 4 : 1);
            }
            l[a] = lo;
            h[a] = hi;
            struct Interval {
              int x, y;
            };
            const uint32_t m = jax_na::fused::window_column_bits<Box, kRank, kCols>(
                [&](int b) { return Interval{l[b], h[b]}; }, lane_col);
            for (int c = 0; c < 32; ++c) {
              bool want = false;
              if (c < kCols) {
                const int col = 8 * (c / 2) + c % 2 + lane_col;
                want = true;
                for (int b = 0; b < kRank; ++b) {
                  const int x = Box::coord(col, b);
                  want = want && l[b] <= x && x < h[b];
                }
              }
              const bool got = (m >> c) & 1u;
              ++g_checked;
              if (got != want && g_failed++ < 20)
                std::printf("FAIL box %dx%dx%d rank %d lane_col %d axis %d [%d, %d) column %d: got %d want %d\n",
                            Box::extent(0), Box::extent(1), Box::extent(2), kRank, lane_col, a, lo, hi, c, got,
                            want);
            }
          }
        }
      }
    }
  }
}

template <int E0, int E1, int E2>
void check_all_ranks() {
  if constexpr (E1 == 1 && E2 == 1) check_box<TestBox<E0, 1, 1>, 1>();
  if constexpr (E2 == 1) check_box<TestBox<E0, E1, 1>, 2>();
  check_box<TestBox<E0, E1, E2>, 3>();
}

// Every box E0 x E1 x E2 of kKeys keys (powers of two).
template <int kKeys, int E0 = 1, int E1 = 1>
void check_boxes() {
  if constexpr (E0 <= kKeys) {
    if constexpr (E0 * E1 <= kKeys) {
      check_all_ranks<E0, E1, kKeys / (E0 * E1)>();
      check_boxes<kKeys, E0, E1 * 2>();
    } else {
      check_boxes<kKeys, E0 * 2, 1>();
    }
  }
}

}  // namespace

int main() {
  check_boxes<16>();  // half tiles of 32-key K/V tiles (the portable forward built with JNA_FUSED_BLOCK_N=32)
  check_boxes<32>();
  check_boxes<64>();
  check_boxes<128>();
  std::printf("test_column_mask: %ld column bits checked, %ld wrong\n", g_checked, g_failed);
  if (g_failed) return 1;
  std::printf("test_column_mask: OK\n");
  return 0;
}
