// Host test of tile_grid.h: the key-stationary grid's CTA order. For random problems (rank 1-3,
// stride, dilation, causal axes), tile boxes and resident CTA counts:
//   - every (group, tile) is decoded from exactly one CTA index (the strides are a mixed radix);
//   - resident = 0 gives raster order (last axis fastest);
//   - the order picked is raster, or spans at most 0.9 of raster's query positions and no order
//     spans fewer (resident_query_span);
//   - at stride 1 the span bounds the query positions whose windows meet the resident CTAs' keys,
//     counted one by one (geo::inverse_range_any per tile and axis);
// and the benchmark problems' picks on 132 SMs (p8 and p9: axis 0 fastest; the others raster).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "fused/tile_grid.h"

namespace {

using jax_na::fused::KVTileGrid;
using jax_na::fused::order_kv_tiles;
using jax_na::fused::resident_query_span;
namespace geo = jax_na::geo;

long g_checked = 0, g_failed = 0;

void check(bool ok, const char* what, int problem) {
  ++g_checked;
  if (!ok && ++g_failed <= 20) std::printf("FAIL problem %d: %s\n", problem, what);
}

int32_t group_len(const geo::Axis& ax) { return (ax.L + ax.d - 1) / ax.d; }

KVTileGrid make_grid(const geo::Problem& pr, const int32_t extent[3], int64_t resident) {
  KVTileGrid g;
  for (int a = 0; a < 3; ++a) g.tiles[a] = (group_len(pr.axis[a]) + extent[a] - 1) / extent[a];
  order_kv_tiles(pr, extent, resident, &g);
  return g;
}

// The query positions (group 0) whose windows meet a key of the first `resident` CTAs.
long count_resident_queries(const geo::Problem& pr, const KVTileGrid& g, const int32_t extent[3], int64_t resident) {
  int32_t Lg[3];
  for (int a = 0; a < 3; ++a) Lg[a] = geo::group_length(pr.axis[a], 0);
  std::vector<char> hit(static_cast<size_t>(Lg[0]) * Lg[1] * Lg[2], 0);
  const int32_t T = g.tiles[0] * g.tiles[1] * g.tiles[2];
  for (int32_t x = 0; x < T && x < resident; ++x) {
    geo::Range r[3];
    bool live = true;
    for (int a = 0; a < 3; ++a) {
      const int32_t k0 = g.tile(x, a) * extent[a];
      if (k0 >= Lg[a]) live = false;
      if (!live) break;
      r[a] = geo::inverse_range_any(pr.axis[a], k0, geo::imin(k0 + extent[a], Lg[a]) - 1, Lg[a]);
    }
    if (!live) continue;
    for (int32_t i = r[0].begin; i < r[0].end; ++i)
      for (int32_t j = r[1].begin; j < r[1].end; ++j)
        for (int32_t k = r[2].begin; k < r[2].end; ++k) hit[(static_cast<size_t>(i) * Lg[1] + j) * Lg[2] + k] = 1;
  }
  long n = 0;
  for (char h : hit) n += h;
  return n;
}

void check_problem(const geo::Problem& pr, const int32_t extent[3], int64_t resident, int id) {
  const KVTileGrid g = make_grid(pr, extent, resident);
  // Decoding: a bijection between CTA indices and (group, tile).
  const int32_t T = g.tiles[0] * g.tiles[1] * g.tiles[2];
  const int32_t groups = 2;
  std::vector<char> seen(static_cast<size_t>(T) * groups, 0);
  bool ok = true;
  for (int32_t x = 0; x < T * groups; ++x) {
    const int32_t t = (g.tile(x, 0) * g.tiles[1] + g.tile(x, 1)) * g.tiles[2] + g.tile(x, 2);
    const int32_t G = g.group(x);
    ok = ok && G < groups && !seen[static_cast<size_t>(G) * T + t];
    if (ok) seen[static_cast<size_t>(G) * T + t] = 1;
  }
  check(ok, "CTA indices decode to distinct (group, tile)", id);
  // The order against the model.
  const int raster[3] = {2, 1, 0};
  const double raster_span = resident_query_span(pr, g.tiles, extent, raster, resident);
  // The picked order, fastest first, from the strides (axes of one tile share a stride: any order).
  int picked[3] = {0, 1, 2};
  std::sort(picked, picked + 3, [&](int a, int b) { return g.stride[a] < g.stride[b]; });
  const bool is_raster = g.stride[2] == 1 && g.stride[1] == g.tiles[2] && g.stride[0] == g.tiles[1] * g.tiles[2];
  const double span = resident_query_span(pr, g.tiles, extent, picked, resident);
  if (resident == 0) {
    check(is_raster, "resident 0: raster order", id);
    return;
  }
  check(is_raster || span <= 0.9 * raster_span, "a non-raster order spans at most 0.9 of raster", id);
  int order[3] = {0, 1, 2};
  const double best = is_raster ? 0.9 * raster_span : span;
  do {
    check(resident_query_span(pr, g.tiles, extent, order, resident) >= best - 1e-9, "no order spans fewer", id);
  } while (std::next_permutation(order, order + 3));
  bool unit_stride = true;
  for (int a = 0; a < 3; ++a) unit_stride = unit_stride && pr.axis[a].s == 1;
  if (unit_stride) {
    const long n = count_resident_queries(pr, g, extent, resident);
    check(static_cast<double>(n) <= span + 1e-9, "the span bounds the resident CTAs' queries", id);
  }
}

bool is_raster_on(const geo::Problem& pr, const int32_t extent[3]) {
  const KVTileGrid g = make_grid(pr, extent, 132);
  return g.stride[2] == 1 && g.stride[1] == g.tiles[2];
}

geo::Problem problem(int rank, std::initializer_list<int> L, std::initializer_list<int> k, std::initializer_list<int> s,
                     int causal0 = 0) {
  geo::Problem pr;
  for (int a = 0; a < rank; ++a) {
    pr.axis[a].L = L.begin()[a];
    pr.axis[a].k = k.begin()[a];
    pr.axis[a].s = s.begin()[a];
  }
  pr.axis[0].causal = causal0;
  return pr;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int64_t residents[] = {0, 1, 7, 66, 132, 264, 100000};
  int problems = 0;
  for (int id = 0; id < 3000; ++id) {
    geo::Problem pr;
    const int rank = pick(1, 3);
    int32_t extent[3] = {1, 1, 1};
    for (int a = 0; a < rank; ++a) {
      geo::Axis& ax = pr.axis[a];
      ax.d = pick(1, 4) == 1 ? pick(2, 3) : 1;
      ax.L = pick(1, 40) * ax.d + pick(0, ax.d - 1);
      ax.k = pick(1, ax.L / ax.d);
      ax.s = pick(1, 5) == 1 ? pick(1, ax.k) : 1;
      ax.causal = pick(0, 3) == 0;
      extent[a] = 1 << pick(0, 3);
    }
    check_problem(pr, extent, residents[pick(0, 6)], id);
    ++problems;
  }
  // The benchmark problems on 132 SMs with the warp-specialized backward's key tiles.
  const int32_t c1[3] = {2, 8, 8}, c0[3] = {4, 4, 8}, t2[3] = {16, 8, 1}, t1[3] = {128, 1, 1};
  const geo::Problem p8 = problem(3, {30, 48, 80}, {18, 24, 24}, {1, 1, 1});
  const geo::Problem p9 = problem(3, {30, 48, 80}, {18, 24, 24}, {16, 8, 8});
  const KVTileGrid g8 = make_grid(p8, c1, 132), g9 = make_grid(p9, c1, 132);
  check(g8.stride[0] == 1 && g8.stride[1] == 15 && g8.stride[2] == 90, "p8: axis 0 fastest, then 1", 8);
  check(g9.stride[0] == 1 && g9.stride[1] == 15 && g9.stride[2] == 90, "p9: axis 0 fastest, then 1", 9);
  check(is_raster_on(problem(3, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}), c1), "p3: raster", 3);
  check(is_raster_on(problem(3, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, 1), c0), "p10: raster", 10);
  check(is_raster_on(problem(2, {128, 128}, {31, 31}, {1, 1}), t2), "p2: raster", 2);
  check(is_raster_on(problem(2, {256, 256}, {80, 80}, {1, 1}), t2), "p6: raster (a tie)", 6);
  check(is_raster_on(problem(2, {256, 256}, {80, 80}, {16, 16}), t2), "p7: raster", 7);
  check(is_raster_on(problem(1, {32768}, {2048}, {1}), t1), "p1: raster", 1);
  std::printf("%d problems, %ld checks, %ld failed\n", problems, g_checked, g_failed);
  if (g_failed) return 1;
  std::printf("test_tile_grid: OK\n");
  return 0;
}
