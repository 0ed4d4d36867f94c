// Host-side test of cuda/geometry/window.cuh (no GPU needed).
//
// Build on demand (not part of the default build):
//   g++ -std=c++17 -O2 -Wall -I cuda cuda/geometry/test_window.cc -o /tmp/test_window && /tmp/test_window
// or, in a CMake build with CUDA enabled: cmake --build <dir> --target jax_na_test_window
#include <algorithm>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "geometry/window.cuh"

using jax_na::geo::Axis;

static int g_failures = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      ++g_failures;                                       \
      if (g_failures <= 20) {                             \
        std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::printf(__VA_ARGS__);                         \
        std::printf("\n");                                \
      }                                                   \
    }                                                     \
  } while (0)

static Axis make_axis(int L, int k, int s, int d, int causal) {
  Axis a;
  a.L = L; a.k = k; a.s = s; a.d = d; a.causal = causal;
  return a;
}

// Keys (token indices, sorted) of query token i.
static std::vector<int> keys_of(const Axis& a, int i) {
  const auto ap = jax_na::geo::axis_pos(a, i);
  const int start = jax_na::geo::window_start(a, ap.p, ap.Lg);
  const int end = jax_na::geo::window_end(a, ap.p, ap.Lg, start);
  std::vector<int> out;
  for (int pos = start; pos < end; ++pos) out.push_back(jax_na::geo::token_of(a, ap.g, pos));
  return out;
}

static void check_example(const char* name, const Axis& a,
                          const std::vector<std::vector<int>>& expected) {
  CHECK(static_cast<int>(expected.size()) == a.L, "%s: bad example", name);
  for (int i = 0; i < a.L; ++i) {
    const auto got = keys_of(a, i);
    std::string g, e;
    for (int x : got) g += std::to_string(x) + ",";
    for (int x : expected[i]) e += std::to_string(x) + ",";
    CHECK(got == expected[i], "%s query %d: got {%s} expected {%s}", name, i, g.c_str(), e.c_str());
  }
}

// Brute force over every query of every group; checks window invariants and the inverse ranges.
static long check_axis(int L, int k, int s, int d, int causal) {
  const Axis a = make_axis(L, k, s, d, causal);
  long checks = 0;
  int total = 0;
  for (int g = 0; g < d; ++g) {
    const int Lg = jax_na::geo::group_length(a, g);
    int count = 0;
    for (int i = g; i < L; i += d) ++count;
    CHECK(Lg == count, "group_length L=%d d=%d g=%d: %d vs %d", L, d, g, Lg, count);
    total += Lg;
    std::vector<int> st(Lg), en(Lg);
    for (int p = 0; p < Lg; ++p) {
      st[p] = jax_na::geo::window_start(a, p, Lg);
      en[p] = jax_na::geo::window_end(a, p, Lg, st[p]);
      CHECK(0 <= st[p] && st[p] < en[p] && en[p] <= Lg, "window bounds L=%d k=%d s=%d d=%d c=%d p=%d",
            L, k, s, d, causal, p);
      CHECK(en[p] - st[p] <= k, "window too large");
      if (!causal) CHECK(en[p] - st[p] == k, "non-causal window must have k keys");
      if (causal) CHECK(st[p] <= p && en[p] == p + 1, "causal window must end at the query");
      if (s == 1) {  // rpb offsets stay inside [0, 2k-1)
        for (int j = st[p]; j < en[p]; ++j) CHECK(j - p + k - 1 >= 0 && j - p + k - 1 < 2 * k - 1, "rpb");
      }
      if (p > 0) CHECK(st[p] >= st[p - 1] && en[p] >= en[p - 1], "monotonicity");
    }
    for (int j = 0; j < Lg; ++j) {
      const auto r = jax_na::geo::inverse_range(a, j, Lg);
      std::vector<int> brute;
      for (int p = 0; p < Lg; ++p)
        if (st[p] <= j && j < en[p]) brute.push_back(p);
      std::vector<int> got;
      for (int p = r.begin; p < r.end; ++p) got.push_back(p);
      CHECK(got == brute, "inverse L=%d k=%d s=%d d=%d causal=%d g=%d j=%d: [%d,%d) vs %zu queries",
            L, k, s, d, causal, g, j, r.begin, r.end, brute.size());
      ++checks;
    }
    // Key ranges [j0, j1]: queries touching any key / holding every key (tile iteration and
    // mask-free tiles of the fused backward).
    for (int j0 = 0; j0 < Lg; ++j0)
      for (int j1 = j0; j1 < Lg && j1 < j0 + 9; ++j1) {
        const auto any = jax_na::geo::inverse_range_any(a, j0, j1, Lg);
        const auto all = jax_na::geo::inverse_range_all(a, j0, j1, Lg);
        // The per-key ranges searched within the range's hulls (any end bound loosened up to Lg).
        for (int j = j0; j <= j1; ++j) {
          const auto want = jax_na::geo::inverse_range(a, j, Lg);
          const auto got = jax_na::geo::inverse_range_within(a, j, Lg, any.begin, std::min(any.end + (j & 3), Lg),
                                                             all.begin);
          CHECK(got.begin == want.begin && got.end == want.end,
                "inverse_range_within L=%d k=%d s=%d d=%d c=%d [%d,%d] j=%d: [%d,%d) vs [%d,%d)", L, k, s, d, causal,
                j0, j1, j, got.begin, got.end, want.begin, want.end);
        }
        for (int p = 0; p < Lg; ++p) {
          bool some = false, every = true;
          for (int j = j0; j <= j1; ++j) {
            const bool in = st[p] <= j && j < en[p];
            some = some || in;
            every = every && in;
          }
          CHECK(some == (any.begin <= p && p < any.end), "inverse_range_any L=%d k=%d s=%d d=%d c=%d [%d,%d] p=%d",
                L, k, s, d, causal, j0, j1, p);
          CHECK(every == (all.begin <= p && p < all.end), "inverse_range_all L=%d k=%d s=%d d=%d c=%d [%d,%d] p=%d",
                L, k, s, d, causal, j0, j1, p);
        }
        ++checks;
      }
    // Key ranges reaching past the group (a unit of a K/V tile at the group's end): only the keys
    // below Lg count; (0, 0) when no query holds any of them.
    for (int j0 = std::max(0, Lg - 6); j0 < Lg + 3; ++j0)
      for (int j1 = j0; j1 < Lg + 9; ++j1) {
        const auto r = jax_na::geo::inverse_range_any_in_group(a, j0, j1, Lg);
        std::vector<int> brute;
        for (int p = 0; p < Lg; ++p) {
          bool some = false;
          for (int j = j0; j <= j1 && j < Lg; ++j) some = some || (st[p] <= j && j < en[p]);
          if (some) brute.push_back(p);
        }
        std::vector<int> got;
        for (int p = r.begin; p < r.end; ++p) got.push_back(p);
        CHECK(got == brute && (r.begin < r.end || (r.begin == 0 && r.end == 0)),
              "inverse_range_any_in_group L=%d k=%d s=%d d=%d c=%d [%d,%d]: [%d,%d)", L, k, s, d, causal, j0, j1,
              r.begin, r.end);
        ++checks;
      }
  }
  CHECK(total == L, "groups do not partition the axis");
  return checks;
}

// 3-D problem helpers: window_key / rpb_index / token coordinates against per-axis brute force.
static void check_problem() {
  jax_na::geo::Problem pr;
  pr.axis[0] = make_axis(9, 3, 1, 2, 0);
  pr.axis[1] = make_axis(6, 4, 2, 1, 1);
  pr.axis[2] = make_axis(5, 2, 1, 1, 0);
  pr.N = 9 * 6 * 5;
  pr.W = 3 * 4 * 2;
  for (int64_t t = 0; t < pr.N; ++t) {
    int32_t x[3];
    pr.token_coords(t, x);
    CHECK(pr.token(x) == t, "token round trip");
    const auto qw = jax_na::geo::query_window(pr, t);
    std::set<int64_t> expected;
    for (int k0 : keys_of(pr.axis[0], x[0]))
      for (int k1 : keys_of(pr.axis[1], x[1]))
        for (int k2 : keys_of(pr.axis[2], x[2])) {
          int32_t y[3] = {k0, k1, k2};
          expected.insert(pr.token(y));
        }
    std::set<int64_t> got;
    for (int64_t w = 0; w < pr.W; ++w) {
      int32_t wa[3];
      pr.window_coords(w, wa);
      CHECK(pr.window_index(wa) == w, "window index round trip");
      int64_t kt;
      if (jax_na::geo::window_key(pr, qw, w, &kt)) {
        CHECK(got.insert(kt).second, "duplicate key");
      }
    }
    CHECK(got == expected, "window_key set mismatch at token %lld", static_cast<long long>(t));
  }
}

int main() {
  // The worked examples of SEMANTICS.md.
  check_example("L=7 k=3", make_axis(7, 3, 1, 1, 0),
                {{0, 1, 2}, {0, 1, 2}, {1, 2, 3}, {2, 3, 4}, {3, 4, 5}, {4, 5, 6}, {4, 5, 6}});
  check_example("L=10 k=3 d=2", make_axis(10, 3, 1, 2, 0),
                {{0, 2, 4}, {1, 3, 5}, {0, 2, 4}, {1, 3, 5}, {2, 4, 6}, {3, 5, 7}, {4, 6, 8}, {5, 7, 9},
                 {4, 6, 8}, {5, 7, 9}});
  check_example("L=8 k=4 s=2 causal", make_axis(8, 4, 2, 1, 1),
                {{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {2, 3, 4}, {2, 3, 4, 5}, {4, 5, 6}, {4, 5, 6, 7}});
  // k = L is self attention.
  for (int L = 2; L < 12; ++L)
    for (int i = 0; i < L; ++i) CHECK(static_cast<int>(keys_of(make_axis(L, L, 1, 1, 0), i).size()) == L, "k=L");

  long combos = 0, checks = 0;
  for (int L = 1; L <= 40; ++L)
    for (int k = 1; k <= L; ++k)
      for (int d = 1; k * d <= L; ++d)
        for (int s = 1; s <= k; ++s)
          for (int causal = 0; causal < 2; ++causal) {
            checks += check_axis(L, k, s, d, causal);
            ++combos;
          }
  // A few long axes.
  const int big[][4] = {{1000, 7, 1, 3}, {1023, 13, 5, 7}, {4096, 64, 64, 1}, {777, 2, 2, 388}};
  for (const auto& c : big)
    for (int causal = 0; causal < 2; ++causal) {
      checks += check_axis(c[0], c[1], c[2], c[3], causal);
      ++combos;
    }
  check_problem();

  if (g_failures) {
    std::printf("test_window: %d failures\n", g_failures);
    return 1;
  }
  std::printf("test_window: OK (%ld axis configurations, %ld inverse ranges)\n", combos, checks);
  return 0;
}
