// What the standalone GPU tests of the fused kernels (test_fused_fwd.cu, test_fused_bwd.cu) share:
// problem cases, 16-bit tensors on the host and the device, the float64 forward of SEMANTICS.md per
// query row (built on geometry/window.cuh), and event timing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "geometry/window.cuh"

namespace jax_na {
namespace test {

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

struct Case {
  std::string name;
  int rank;
  int64_t B;
  int L[3], k[3], s[3], d[3], c[3];
  int H, Hkv, D;
  DType dt;
  int64_t Na;
  float scale = 0.f;  // 0: D^-0.5
  float softmax_scale() const { return scale > 0.f ? scale : 1.f / std::sqrt(static_cast<float>(D)); }
  const char* dtype_name() const { return dt == DType::kF16 ? "f16 " : "bf16"; }
};

inline geo::Problem make_problem(const Case& cs) {
  geo::Problem pr;
  pr.B = cs.B;
  pr.H = cs.H;
  pr.Hkv = cs.Hkv;
  pr.N = 1;
  pr.W = 1;
  for (int a = 0; a < cs.rank; ++a) {
    pr.axis[a].L = cs.L[a];
    pr.axis[a].k = cs.k[a];
    pr.axis[a].s = cs.s[a];
    pr.axis[a].d = cs.d[a];
    pr.axis[a].causal = cs.c[a];
    pr.N *= cs.L[a];
    pr.W *= cs.k[a];
  }
  pr.Na = cs.Na;
  return pr;
}

inline uint16_t to_bits(float x, DType dt) {
  uint16_t r;
  if (dt == DType::kF16) {
    __half h = __float2half_rn(x);
    std::memcpy(&r, &h, 2);
  } else {
    __nv_bfloat16 h = __float2bfloat16_rn(x);
    std::memcpy(&r, &h, 2);
  }
  return r;
}
inline float from_bits(uint16_t b, DType dt) {
  if (dt == DType::kF16) {
    __half h;
    std::memcpy(&h, &b, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &b, 2);
  return __bfloat162float(h);
}

// A 16-bit tensor on the host: its bits and their float values.
struct HostT {
  std::vector<uint16_t> bits;
  std::vector<float> val;
};
inline HostT random_tensor(size_t n, DType dt, std::mt19937& rng, float amp) {
  std::uniform_real_distribution<float> u(-amp, amp);
  HostT t;
  t.bits.resize(n);
  t.val.resize(n);
  for (size_t i = 0; i < n; ++i) {
    t.bits[i] = to_bits(u(rng), dt);
    t.val[i] = from_bits(t.bits[i], dt);
  }
  return t;
}

inline void* upload(const std::vector<uint16_t>& h) {
  void* d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * 2));
  if (!h.empty()) CK(cudaMemcpy(d, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  return d;
}
template <class T>
std::vector<T> download(const void* d, size_t n) {
  std::vector<T> h(n);
  if (n > 0) CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// The inputs of a case on the host, rounded to its dtype: q [B, N, H, D], k and v [B, N, Hkv, D],
// the additional keys/values [B, Na, Hkv, D].
struct HostInputs {
  HostT q, k, v, ak, av;
};
inline HostInputs random_inputs(const geo::Problem& pr, const Case& cs, std::mt19937& rng) {
  const size_t D = cs.D, nq = pr.B * pr.N * pr.H * D, nk = pr.B * pr.N * pr.Hkv * D,
               na = pr.B * pr.Na * pr.Hkv * D;
  HostInputs in;
  in.q = random_tensor(nq, cs.dt, rng, 2.f);
  in.k = random_tensor(nk, cs.dt, rng, 2.f);
  in.v = random_tensor(nk, cs.dt, rng, 1.f);
  in.ak = random_tensor(na, cs.dt, rng, 2.f);
  in.av = random_tensor(na, cs.dt, rng, 1.f);
  return in;
}

// The float64 forward of one query row (batch b, token t, head h): its keys (window keys, then the
// additional keys), their probabilities, lse and the output row.
struct RowForward {
  std::vector<const float*> key, value;  // rows of k/v (or the additional ones)
  std::vector<int64_t> key_off;          // element offsets of those rows in k/v (or ak/av)
  std::vector<bool> is_add;
  std::vector<double> p;
  double lse = 0;
  std::vector<double> out;
};
inline void row_forward(const geo::Problem& pr, const HostInputs& in, int64_t D, float scale, int64_t b, int64_t t,
                        int h, RowForward& r) {
  const int hk = h / static_cast<int>(pr.H / pr.Hkv);
  const float* qr = &in.q.val[geo::offset(b, t, h, 0, pr.N, pr.H, D)];
  r.key.clear(), r.value.clear(), r.key_off.clear(), r.is_add.clear(), r.p.clear();
  auto add = [&](const HostT& k, const HostT& v, int64_t off, bool is_add) {
    const float* kr = &k.val[off];
    double s = 0;
    for (int64_t e = 0; e < D; ++e) s += double(qr[e]) * kr[e];
    r.key.push_back(kr);
    r.value.push_back(&v.val[off]);
    r.key_off.push_back(off);
    r.is_add.push_back(is_add);
    r.p.push_back(s * scale);
  };
  const geo::QueryWindow qw = geo::query_window(pr, t);
  for (int64_t w = 0; w < pr.W; ++w) {
    int64_t kt;
    if (geo::window_key(pr, qw, w, &kt)) add(in.k, in.v, geo::offset(b, kt, hk, 0, pr.N, pr.Hkv, D), false);
  }
  for (int64_t j = 0; j < pr.Na; ++j) add(in.ak, in.av, geo::offset(b, j, hk, 0, pr.Na, pr.Hkv, D), true);
  double mx = -INFINITY, sum = 0;
  for (double s : r.p) mx = std::max(mx, s);
  for (double s : r.p) sum += std::exp(s - mx);
  r.lse = mx + std::log(sum);
  for (double& s : r.p) s = std::exp(s - r.lse);  // probabilities
  r.out.assign(D, 0.0);
  for (size_t i = 0; i < r.p.size(); ++i)
    for (int64_t e = 0; e < D; ++e) r.out[e] += r.p[i] * r.value[i][e];
}

// f(row, forward) for every query row (row = (b N + t) H + h, the row of q/out/lse), in order.
template <class F>
void for_each_row_forward(const geo::Problem& pr, const HostInputs& in, int64_t D, float scale, const F& f) {
  RowForward r;
  for (int64_t b = 0; b < pr.B; ++b)
    for (int64_t t = 0; t < pr.N; ++t)
      for (int h = 0; h < pr.H; ++h) {
        row_forward(pr, in, D, scale, b, t, h, r);
        f(static_cast<size_t>((b * pr.N + t) * pr.H + h), static_cast<const RowForward&>(r));
      }
}

// Relative error (L2 norm of the difference over the L2 norm of the reference) and finiteness of
// a result against its float64 reference.
struct ErrorNorm {
  double err2 = 0, ref2 = 0, err_max = 0, ref_max = 0;
  bool finite = true;
  void add(double got, double want) {
    if (!std::isfinite(got)) finite = false;
    err2 += (got - want) * (got - want);
    ref2 += want * want;
    err_max = std::max(err_max, std::fabs(got - want));
    ref_max = std::max(ref_max, std::fabs(want));
  }
  double rel() const { return std::sqrt(err2 / std::max(ref2, 1e-300)); }
  // The largest error over the largest reference value: a few wrong rows show here.
  double rel_max() const { return err_max / std::max(ref_max, 1e-300); }
};

// The correctness cases: every rank, stride, dilation, causal axes, GQA, additional keys, both
// 16-bit dtypes and head dims 64 and 128 (name, rank, B, L, k, s, d, causal, H, Hkv, D, dtype, Na).
inline std::vector<Case> check_cases() {
  return {
      {"1d L=300 k=37 GQA 2:1", 1, 2, {300, 1, 1}, {37, 1, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 2, 1, 64, DType::kBF16, 0},
      {"1d L=1000 k=200 causal", 1, 1, {1000, 1, 1}, {200, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 0, 0}, 2, 2, 128, DType::kF16, 0},
      {"1d L=517 k=64 s=8 d=3", 1, 1, {517, 1, 1}, {64, 1, 1}, {8, 1, 1}, {3, 1, 1}, {0, 0, 0}, 1, 1, 128, DType::kBF16, 0},
      {"1d L=7 k=7 (self) Na=5", 1, 3, {7, 1, 1}, {7, 1, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 2, 1, 64, DType::kF16, 5},
      {"2d 37x29 k=7x9 s=1x2 d=2x3 GQA", 2, 1, {37, 29, 1}, {7, 9, 1}, {1, 2, 1}, {2, 3, 1}, {0, 0, 0}, 4, 2, 128, DType::kBF16, 0},
      {"2d 20x20 k=20x20 (self)", 2, 1, {20, 20, 1}, {20, 20, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 2, 2, 64, DType::kF16, 0},
      {"2d 23x31 k=4x6 causal y d=3x2 Na=70", 2, 2, {23, 31, 1}, {4, 6, 1}, {1, 1, 1}, {3, 2, 1}, {0, 1, 0}, 2, 1, 64, DType::kBF16, 70},
      {"2d 33x40 k=13x11 s=13x5 causal xy", 2, 1, {33, 40, 1}, {13, 11, 1}, {13, 5, 1}, {1, 1, 1}, {1, 1, 0}, 1, 1, 128, DType::kF16, 0},
      {"3d 9x12x14 k=3x5x7 s=2x1x3 d=1x2x1 c=100", 3, 1, {9, 12, 14}, {3, 5, 7}, {2, 1, 3}, {1, 2, 1}, {1, 0, 0}, 2, 2, 128, DType::kBF16, 0},
      {"3d 16x16x16 k=7x7x7 Na=17 GQA 4:1", 3, 1, {16, 16, 16}, {7, 7, 7}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 4, 1, 64, DType::kF16, 17},
      {"3d 6x10x18 k=6x5x4 d=1x2x4 c=011", 3, 2, {6, 10, 18}, {6, 5, 4}, {1, 2, 1}, {1, 2, 4}, {0, 1, 1}, 1, 1, 128, DType::kF16, 3},
      {"3d 5x9x11 k=2x3x11 s=2x3x11", 3, 1, {5, 9, 11}, {2, 3, 11}, {2, 3, 11}, {1, 1, 1}, {0, 0, 0}, 2, 1, 64, DType::kBF16, 0},
      // Scale 1: scaled scores spread over tens of log2 units, so the softmax's reference maximum
      // moves in the middle of the walk (the O rescale with alpha < 1, softmax.cuh).
      {"2d 40x48 k=13x7 scale=1 Na=5", 2, 1, {40, 48, 1}, {13, 7, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 2, 2, 128, DType::kF16, 5, 1.f},
      {"3d 6x20x24 k=3x9x7 scale=1", 3, 1, {6, 20, 24}, {3, 9, 7}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 2, 1, 64, DType::kBF16, 0, 1.f},
  };
}

// The timed problems (BENCHMARKS.md; with big, also p6, p8, p9).
inline std::vector<Case> perf_cases(bool big) {
  std::vector<Case> perf = {
      {"p2-2d 128x128 k31", 2, 1, {128, 128, 1}, {31, 31, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"p3-3d 16x32x32 k7x13x13", 3, 1, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"p2-2d 128x128 k31", 2, 1, {128, 128, 1}, {31, 31, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kF16, 0},
      {"p3-3d 16x32x32 k7x13x13", 3, 1, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kF16, 0},
      {"p1-1d 32768 k2048", 1, 1, {32768, 1, 1}, {2048, 1, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"p10 3d causal T", 3, 1, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, {1, 1, 1}, {1, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"p11-1d d64 k1023 causal", 1, 4, {16384, 1, 1}, {1023, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 0, 0}, 16, 16, 64, DType::kBF16, 0},
      {"p7-flux-strided 256x256 k80 s16", 2, 1, {256, 256, 1}, {80, 80, 1}, {16, 16, 1}, {1, 1, 1}, {0, 0, 0}, 24, 24, 128, DType::kBF16, 0},
      {"p4-nat-small 56x56 k7", 2, 64, {56, 56, 1}, {7, 7, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 4, 4, 32, DType::kBF16, 0},
      {"p5-dinat-dilated 28x28 k7 d4", 2, 32, {28, 28, 1}, {7, 7, 1}, {1, 1, 1}, {4, 4, 1}, {0, 0, 0}, 8, 8, 32, DType::kBF16, 0},
      // Head dim 32 beyond 7x7 (the head-dim-32 tile choices: 64- against 128-query tiles).
      {"nat 56x56 k13 d32", 2, 16, {56, 56, 1}, {13, 13, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 4, 4, 32, DType::kBF16, 0},
      {"p2 128x128 k31 d32", 2, 1, {128, 128, 1}, {31, 31, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 32, DType::kBF16, 0},
      {"p3 16x32x32 k7x13x13 d32", 3, 1, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 32, DType::kBF16, 0},
      {"1d 16384 k255 d32", 1, 4, {16384, 1, 1}, {255, 1, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 32, DType::kBF16, 0},
      // Windows longer along the last axis (the 2-D tile choice: 8x16 against 16x8 Q tiles).
      {"2d 64x256 k7x31", 2, 4, {64, 256, 1}, {7, 31, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      // Small windows at head dim 128 (the forward chooser's 2-D picks there: --tiles 0 against 1).
      {"small 2d 128x128 k3", 2, 4, {128, 128, 1}, {3, 3, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"small 2d 128x128 k7", 2, 4, {128, 128, 1}, {7, 7, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"small 2d 128x128 k13", 2, 4, {128, 128, 1}, {13, 13, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      // Every key in every window: the kernels' mask-free dense rate (against dense attention).
      {"dense 1d 16384 k16384", 1, 1, {16384, 1, 1}, {16384, 1, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      // Head dim 64 (the portable forward's warp rows there).
      {"p1 32768 k2048 d64", 1, 1, {32768, 1, 1}, {2048, 1, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 64, DType::kBF16, 0},
      {"p2 128x128 k31 d64", 2, 1, {128, 128, 1}, {31, 31, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 64, DType::kBF16, 0},
      {"p3 16x32x32 k7x13x13 d64", 3, 1, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 64, DType::kBF16, 0},
      // Small 3-D windows (the Hopper forward's 8x2x8 over 1x8x16 tiles).
      {"3d small 8x64x64 k3x7x7", 3, 2, {8, 64, 64}, {3, 7, 7}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"3d small 16x56x56 k5x7x7", 3, 1, {16, 56, 56}, {5, 7, 7}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
  };
  if (big) {
    perf.push_back({"p6-flux 256x256 k80", 2, 1, {256, 256, 1}, {80, 80, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 24, 24, 128, DType::kBF16, 0});
    perf.push_back({"p8-video 30x48x80 k18x24x24", 3, 1, {30, 48, 80}, {18, 24, 24}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 24, 24, 128, DType::kBF16, 0});
    perf.push_back({"p9-video-strided s16x8x8", 3, 1, {30, 48, 80}, {18, 24, 24}, {16, 8, 8}, {1, 1, 1}, {0, 0, 0}, 24, 24, 128, DType::kBF16, 0});
  }
  return perf;
}

// The experiment builds (one kernel unit: -DJNA_TEST_SM90_ONLY, the Hopper kernels; -DJNA_TEST_PORTABLE_ONLY,
// the portable ones; both at head dim kTestHeadDim, -DJNA_TEST_HEAD_DIM=32/64/128, 128 by default;
// -DJNA_TEST_BF16_ONLY, bfloat16 only) run every check case in what they have, and only the timed
// problems they have.
#if !defined(JNA_TEST_HEAD_DIM)
#define JNA_TEST_HEAD_DIM 128
#endif
constexpr int kTestHeadDim = JNA_TEST_HEAD_DIM;
#if defined(JNA_TEST_SM90_ONLY) || defined(JNA_TEST_PORTABLE_ONLY)
#define JNA_TEST_ONE_HEAD_DIM 1
#endif
inline std::vector<Case> experiment_cases(std::vector<Case> cases) {
  for (Case& c : cases) {
#if defined(JNA_TEST_ONE_HEAD_DIM)
    c.D = kTestHeadDim;
#endif
#if defined(JNA_TEST_BF16_ONLY)
    c.dt = DType::kBF16;
#endif
    (void)c;
  }
  return cases;
}
inline std::vector<Case> experiment_perf(const std::vector<Case>& perf) {
  std::vector<Case> out;
  for (const Case& c : perf) {
#if defined(JNA_TEST_ONE_HEAD_DIM)
    if (c.D != kTestHeadDim) continue;
#endif
#if defined(JNA_TEST_BF16_ONLY)
    if (c.dt != DType::kBF16) continue;
#endif
    out.push_back(c);
  }
  return out;
}

// Command line: --timing (no checks), --big (p6, p8, p9 too), --trace, --tiles N (tile configuration
// N of each kernel set where the rank has one, else the default), --atomic (backward: dQ added by
// the dK/dV kernel), --only TEXT (the timed problems whose name holds TEXT; e.g. for ncu).
struct Options {
  bool timing_only = false, checks_only = false, big = false, trace = false, atomic = false;
  int tiles = 0;
  const char* only = nullptr;
};
inline Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    o.timing_only = o.timing_only || std::strcmp(argv[i], "--timing") == 0;
    o.checks_only = o.checks_only || std::strcmp(argv[i], "--checks") == 0;
    o.big = o.big || std::strcmp(argv[i], "--big") == 0;
    o.trace = o.trace || std::strcmp(argv[i], "--trace") == 0;
    o.atomic = o.atomic || std::strcmp(argv[i], "--atomic") == 0;
    if (std::strcmp(argv[i], "--tiles") == 0 && i + 1 < argc) o.tiles = std::max(0, std::atoi(argv[++i]));
    if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc) o.only = argv[++i];
  }
  return o;
}

// The program: every check case (unless --timing), then every timed problem; prints the verdict
// and returns the exit code (0: every check passed).
template <class RunCase, class TimeCase>
int run_program(const Options& opt, const RunCase& run_case, const TimeCase& time_case) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines survive a timeout kill
  std::mt19937 rng(1234);
  bool all = true;
  if (!opt.timing_only)
    for (const Case& c : experiment_cases(check_cases())) all = run_case(c, rng) && all;
  if (!opt.checks_only)
    for (const Case& c : experiment_perf(perf_cases(opt.big)))
      if (opt.only == nullptr || c.name.find(opt.only) != std::string::npos) time_case(c, rng);
  std::printf(all ? "ALL PASS\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}

// Uniform values in [-amp, amp) from a hash of the index (the timed problems are too large for a
// host generator).
template <class T>
__global__ void fill_random(T* x, int64_t n, uint32_t seed, float amp) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed ^ static_cast<uint32_t>(i >> 32) * 40503u;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = T(amp * (2.f * (h >> 8) * (1.f / 16777216.f) - 1.f));
  }
}
inline void* device_random(size_t n, DType dt, uint32_t seed, float amp) {
  void* d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(n, 1) * 2));
  if (dt == DType::kF16)
    fill_random<<<1024, 256>>>(static_cast<__half*>(d), int64_t(n), seed, amp);
  else
    fill_random<<<1024, 256>>>(static_cast<__nv_bfloat16*>(d), int64_t(n), seed, amp);
  CK(cudaGetLastError());
  return d;
}

// Median and minimum of `reps` event-timed runs of launch() (ms), after 3 warm-up runs.
template <class Launch>
std::pair<double, double> time_ms(const Launch& launch, int reps = 25) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) CK(launch());
  CK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(e0));
    CK(launch());
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float t;
    CK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front()};
}

}  // namespace test
}  // namespace jax_na
