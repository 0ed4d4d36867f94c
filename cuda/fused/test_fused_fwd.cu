// Standalone GPU test of the fused forward: correctness against a float64 CPU evaluation of
// SEMANTICS.md (built on geometry/window.cuh) and timing of the benchmark shapes.
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -I cuda -I <cutlass>/include \
//        -gencode=arch=compute_90a,code=sm_90a cuda/fused/test_fused_fwd.cu cuda/fused/fwd_*.cu cuda/fused/bwd_*.cu cuda/fused/dispatch.cu
// Exit code 0 only when every case passes.
// Experiments: -DJNA_TEST_SM90_ONLY links only hopper/fwd_{bf16,f16}_hd128.cu (every case then runs at
// head dim 128 on the Hopper forward: a variant builds in two units; -DJNA_TEST_BF16_ONLY: bfloat16
// only, one unit); with -DJNA_FWD_TRACE,
// `--trace` prints where the CTAs' time goes (hopper/trace.cuh). `--timing` skips the checks, `--big`
// adds the large benchmark problems (p6, p8, p9), `--tiles N` runs tile configuration N
// (tile_shapes.cuh) of each kernel set where the rank has one, else the default.
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

#include "fused/fused_fwd.h"
#include "fused/hopper/trace.cuh"
#include "fused/tile_shapes.cuh"
#include "geometry/window.cuh"

using namespace jax_na;

#if defined(JNA_FWD_TRACE)
static fused::FwdTrace g_trace;
fused::FwdTrace jax_na::fused::fwd_trace_target() { return g_trace; }
#endif

static int g_tiles = 0;  // --tiles

// The forward under test: the dispatcher, or (JNA_TEST_SM90_ONLY) the Hopper kernel at head dim 128.
static cudaError_t launch(const geo::Problem& pr, int rank, DType dt, const fused::FwdArgs& args_in) {
  fused::FwdArgs args = args_in;
#if !defined(JNA_TEST_STATIC_TILES)  // the tile counter of the persistent Hopper forward, zeroed per launch
  static int32_t* counter = nullptr;
  if (counter == nullptr && cudaMalloc(&counter, sizeof(int32_t)) != cudaSuccess) return cudaErrorMemoryAllocation;
  if (cudaError_t st = cudaMemsetAsync(counter, 0, sizeof(int32_t), 0); st != cudaSuccess) return st;
  args.tile_counter = counter;
#endif
  const int n90 = rank == 1 ? fused::HopperFwdTiles<1>::kCount
                            : (rank == 2 ? fused::HopperFwdTiles<2>::kCount : fused::HopperFwdTiles<3>::kCount);
  args.tiles_sm90 = g_tiles < n90 ? g_tiles : 0;
#if !defined(JNA_TEST_SM90_ONLY)
  const int n80 = fused::fwd_tile_configs(fused::FwdArgs::kPortable, dt, args.D, rank, nullptr, 0);
  args.tiles_sm80 = g_tiles < n80 ? g_tiles : 0;
#endif
#if defined(JNA_TEST_SM90_ONLY)
  if (args.D != 128 || dt == DType::kF32) return cudaErrorInvalidValue;
  if (dt == DType::kBF16) {
    if (rank == 1) return fused::run_fwd_sm90<DType::kBF16, 128, 1>(pr, args, 0);
    if (rank == 2) return fused::run_fwd_sm90<DType::kBF16, 128, 2>(pr, args, 0);
    return fused::run_fwd_sm90<DType::kBF16, 128, 3>(pr, args, 0);
  }
#if defined(JNA_TEST_BF16_ONLY)
  return cudaErrorInvalidValue;
#endif
  if (rank == 1) return fused::run_fwd_sm90<DType::kF16, 128, 1>(pr, args, 0);
  if (rank == 2) return fused::run_fwd_sm90<DType::kF16, 128, 2>(pr, args, 0);
  return fused::run_fwd_sm90<DType::kF16, 128, 3>(pr, args, 0);
#else
  return fused::launch_fwd(pr, rank, dt, args, 0);
#endif
}

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
};

static geo::Problem make_problem(const Case& cs) {
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

static uint16_t to_bits(float x, DType dt) {
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
static float from_bits(uint16_t b, DType dt) {
  if (dt == DType::kF16) {
    __half h;
    std::memcpy(&h, &b, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &b, 2);
  return __bfloat162float(h);
}

// Random 16-bit tensor (host bits + the rounded float values).
struct HostT {
  std::vector<uint16_t> bits;
  std::vector<float> val;
};
static HostT random_tensor(size_t n, DType dt, std::mt19937& rng, float amp) {
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

static void* upload(const std::vector<uint16_t>& h) {
  void* d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(h.size(), 1) * 2));
  if (!h.empty()) CK(cudaMemcpy(d, h.data(), h.size() * 2, cudaMemcpyHostToDevice));
  return d;
}

static bool run_case(const Case& cs, std::mt19937& rng) {
  const geo::Problem pr = make_problem(cs);
  const int64_t D = cs.D;
  const float scale = cs.scale > 0.f ? cs.scale : 1.f / std::sqrt(static_cast<float>(D));
  const size_t nq = pr.B * pr.N * pr.H * D, nk = pr.B * pr.N * pr.Hkv * D, na = pr.B * pr.Na * pr.Hkv * D;
  HostT q = random_tensor(nq, cs.dt, rng, 2.f), k = random_tensor(nk, cs.dt, rng, 2.f),
        v = random_tensor(nk, cs.dt, rng, 1.f), ak = random_tensor(na, cs.dt, rng, 2.f),
        av = random_tensor(na, cs.dt, rng, 1.f);
  void *dq = upload(q.bits), *dk = upload(k.bits), *dv = upload(v.bits), *dak = upload(ak.bits),
       *dav = upload(av.bits);
  void* dout;
  float* dlse;
  const size_t rows = pr.B * pr.N * pr.H;
  CK(cudaMalloc(&dout, nq * 2));
  CK(cudaMalloc(&dlse, rows * 4));
  CK(cudaMemset(dout, 0xFF, nq * 2));  // poison: NaN
  CK(cudaMemset(dlse, 0xFF, rows * 4));
  fused::FwdArgs args;
  args.q = dq; args.k = dk; args.v = dv; args.add_k = dak; args.add_v = dav;
  args.out = dout; args.lse = dlse; args.D = cs.D; args.scale = scale;
  CK(launch(pr, cs.rank, cs.dt, args));
  CK(cudaDeviceSynchronize());
  std::vector<uint16_t> out_bits(nq);
  std::vector<float> lse(rows);
  CK(cudaMemcpy(out_bits.data(), dout, nq * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), dlse, rows * 4, cudaMemcpyDeviceToHost));

  // float64 reference.
  double err2 = 0, ref2 = 0, lse_err = 0;
  bool finite = true;
  std::vector<double> sc(pr.W + pr.Na);
  std::vector<int64_t> key(pr.W + pr.Na);
  const int grp = pr.H / pr.Hkv;
  for (int64_t b = 0; b < pr.B; ++b)
    for (int64_t t = 0; t < pr.N; ++t) {
      const geo::QueryWindow qw = geo::query_window(pr, t);
      for (int h = 0; h < pr.H; ++h) {
        const int hk = h / grp;
        const float* qr = &q.val[geo::offset(b, t, h, 0, pr.N, pr.H, D)];
        double mx = -INFINITY;
        int64_t n = 0;
        for (int64_t w = 0; w < pr.W; ++w) {
          int64_t kt;
          if (!geo::window_key(pr, qw, w, &kt)) continue;
          const float* kr = &k.val[geo::offset(b, kt, hk, 0, pr.N, pr.Hkv, D)];
          double s = 0;
          for (int e = 0; e < D; ++e) s += double(qr[e]) * kr[e];
          sc[n] = s * scale;
          key[n++] = geo::offset(b, kt, hk, 0, pr.N, pr.Hkv, D);
          mx = std::max(mx, sc[n - 1]);
        }
        const int64_t nwin = n;
        for (int64_t j = 0; j < pr.Na; ++j) {
          const float* kr = &ak.val[geo::offset(b, j, hk, 0, pr.Na, pr.Hkv, D)];
          double s = 0;
          for (int e = 0; e < D; ++e) s += double(qr[e]) * kr[e];
          sc[n] = s * scale;
          key[n++] = geo::offset(b, j, hk, 0, pr.Na, pr.Hkv, D);
          mx = std::max(mx, sc[n - 1]);
        }
        double sum = 0;
        for (int64_t i = 0; i < n; ++i) sum += std::exp(sc[i] - mx);
        const double ref_lse = mx + std::log(sum);
        const size_t row = (b * pr.N + t) * pr.H + h;
        if (!std::isfinite(lse[row])) finite = false;
        lse_err = std::max(lse_err, std::fabs(lse[row] - ref_lse));
        for (int64_t i = 0; i < n; ++i) sc[i] = std::exp(sc[i] - mx) / sum;  // probabilities
        for (int e = 0; e < D; ++e) {
          double o = 0;
          for (int64_t i = 0; i < n; ++i) {
            const float* vr = (i < nwin ? v.val.data() : av.val.data()) + key[i];
            o += sc[i] * vr[e];
          }
          const float got = from_bits(out_bits[row * D + e], cs.dt);
          if (!std::isfinite(got)) finite = false;
          err2 += (got - o) * (got - o);
          ref2 += o * o;
        }
      }
    }
  const double rel = std::sqrt(err2 / std::max(ref2, 1e-300));
  const double tol = cs.dt == DType::kF16 ? 2e-3 : 1e-2;
  const bool ok = finite && rel <= tol && lse_err <= 2e-2;
  std::printf("%-44s %s rel=%.2e lse_err=%.2e finite=%d  %s\n", cs.name.c_str(),
              cs.dt == DType::kF16 ? "f16 " : "bf16", rel, lse_err, int(finite), ok ? "PASS" : "FAIL");
  for (void* p : {dq, dk, dv, dak, dav, dout}) CK(cudaFree(p));
  CK(cudaFree(dlse));
  return ok;
}

#if defined(JNA_FWD_TRACE)
// Mean cycles from entry to each phase, mean cycles per K/V tile in the loop, and the gaps between
// consecutive CTAs on one SM (globaltimer).
static void print_trace(std::vector<fused::CtaTrace>& t) {
  t.erase(std::remove_if(t.begin(), t.end(), [](const fused::CtaTrace& r) { return r.t_end == 0; }), t.end());
  if (t.empty()) return;
  static const char* names[] = {"entry", "scheduled", "q_issued", "q_ready", "first_kv", "loop_done", "epilogue", "prod_done"};
  double mean[fused::kTracePoints] = {}, per_tile = 0, tiles = 0;
  for (const auto& r : t) {
    for (int i = 0; i < fused::kTracePoints; ++i) mean[i] += double(r.clk[i] - r.clk[0]) / t.size();
    per_tile += double(r.clk[fused::kTraceLoopDone] - r.clk[fused::kTraceFirstKV]) / std::max(r.n_tiles, 1) / t.size();
    tiles += double(r.n_tiles) / t.size();
  }
  std::printf("  TRACE %zu CTAs, %.1f tiles/CTA, %.0f cycles/tile in the loop; cycles from entry:", t.size(), tiles, per_tile);
  for (int i = 1; i < fused::kTracePoints; ++i) std::printf(" %s %.0f", names[i], mean[i]);
  std::sort(t.begin(), t.end(), [](const fused::CtaTrace& a, const fused::CtaTrace& b) {
    return a.smid != b.smid ? a.smid < b.smid : a.t_begin < b.t_begin;
  });
  double gap = 0, busy = 0;
  int ngap = 0;
  uint64_t t0 = ~0ull, t1 = 0;
  for (size_t i = 0; i < t.size(); ++i) {
    busy += double(t[i].t_end - t[i].t_begin);
    t0 = std::min(t0, t[i].t_begin);
    t1 = std::max(t1, t[i].t_end);
    if (i > 0 && t[i].smid == t[i - 1].smid && t[i].t_begin >= t[i - 1].t_end) {
      gap += double(t[i].t_begin - t[i - 1].t_end);
      ++ngap;
    }
  }
  std::printf("\n  TRACE mean CTA %.2f us, mean gap between CTAs on an SM %.2f us, span %.1f us, SM busy %.1f%%\n",
              busy / t.size() * 1e-3, ngap ? gap / ngap * 1e-3 : 0.0, (t1 - t0) * 1e-3,
              100.0 * busy / (double(t1 - t0) * 132));
}
#endif

static bool trace = false;

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
static void* device_random(size_t n, DType dt, uint32_t seed, float amp) {
  void* d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(n, 1) * 2));
  if (dt == DType::kF16)
    fill_random<<<1024, 256>>>(static_cast<__half*>(d), int64_t(n), seed, amp);
  else
    fill_random<<<1024, 256>>>(static_cast<__nv_bfloat16*>(d), int64_t(n), seed, amp);
  CK(cudaGetLastError());
  return d;
}

static void time_case(const Case& cs, std::mt19937& rng) {
  const geo::Problem pr = make_problem(cs);
  const int64_t D = cs.D;
  const size_t nq = pr.B * pr.N * pr.H * D, nk = pr.B * pr.N * pr.Hkv * D;
  void *dq = device_random(nq, cs.dt, rng(), 2.f), *dk = device_random(nk, cs.dt, rng(), 2.f),
       *dv = device_random(nk, cs.dt, rng(), 1.f);
  void* dout;
  float* dlse;
  CK(cudaMalloc(&dout, nq * 2));
  CK(cudaMalloc(&dlse, pr.B * pr.N * pr.H * 4));
  fused::FwdArgs args;
  args.q = dq; args.k = dk; args.v = dv; args.add_k = dq; args.add_v = dq;
  args.out = dout; args.lse = dlse; args.D = cs.D; args.scale = 1.f / std::sqrt(float(D));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) CK(launch(pr, cs.rank, cs.dt, args));
  CK(cudaDeviceSynchronize());
  std::vector<float> ms;
  for (int i = 0; i < 25; ++i) {
    CK(cudaEventRecord(e0));
    CK(launch(pr, cs.rank, cs.dt, args));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    float t;
    CK(cudaEventElapsedTime(&t, e0, e1));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2];
  const double flops = 4.0 * pr.B * pr.H * pr.N * pr.W * D;
  std::printf("TIME %-28s %s median %.3f ms  (min %.3f)  %.1f eff TFLOP/s\n", cs.name.c_str(),
              cs.dt == DType::kF16 ? "f16 " : "bf16", med, ms.front(), flops / (med * 1e-3) / 1e12);
#if defined(JNA_FWD_TRACE)
  if (trace) {  // one more launch, recording every CTA
    const int64_t n = static_cast<int64_t>((pr.N + 127) / 128 + 64) * pr.H * pr.B * 4;
    CK(cudaMalloc(&g_trace.buf, n * sizeof(fused::CtaTrace)));
    CK(cudaMemset(g_trace.buf, 0, n * sizeof(fused::CtaTrace)));
    g_trace.capacity = n;
    CK(launch(pr, cs.rank, cs.dt, args));
    CK(cudaDeviceSynchronize());
    std::vector<fused::CtaTrace> t(n);
    CK(cudaMemcpy(t.data(), g_trace.buf, n * sizeof(fused::CtaTrace), cudaMemcpyDeviceToHost));
    CK(cudaFree(g_trace.buf));
    g_trace = {};
    print_trace(t);
  }
#endif
  for (void* p : {dq, dk, dv, dout}) CK(cudaFree(p));
  CK(cudaFree(dlse));
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines survive a timeout kill
  std::mt19937 rng(1234);
  bool timing_only = false, big = false;
  for (int i = 1; i < argc; ++i) {
    timing_only = timing_only || std::strcmp(argv[i], "--timing") == 0;
    big = big || std::strcmp(argv[i], "--big") == 0;
    trace = trace || std::strcmp(argv[i], "--trace") == 0;
    if (std::strcmp(argv[i], "--tiles") == 0 && i + 1 < argc) g_tiles = std::atoi(argv[++i]);
  }
  // name, rank, B, L, k, s, d, causal, H, Hkv, D, dtype, Na
  std::vector<Case> cases = {
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
  bool all = true;
#if defined(JNA_TEST_SM90_ONLY)
  for (Case& c : cases) c.D = 128;
#endif
#if defined(JNA_TEST_BF16_ONLY)
  for (Case& c : cases) c.dt = DType::kBF16;
#endif
  if (!timing_only)
    for (const Case& c : cases) all = run_case(c, rng) && all;
  std::vector<Case> perf = {
      {"p2-2d 128x128 k31", 2, 1, {128, 128, 1}, {31, 31, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"p3-3d 16x32x32 k7x13x13", 3, 1, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"p2-2d 128x128 k31", 2, 1, {128, 128, 1}, {31, 31, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kF16, 0},
      {"p3-3d 16x32x32 k7x13x13", 3, 1, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kF16, 0},
      {"p1-1d 32768 k2048", 1, 1, {32768, 1, 1}, {2048, 1, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"p10 3d causal T", 3, 1, {16, 32, 32}, {7, 13, 13}, {1, 1, 1}, {1, 1, 1}, {1, 0, 0}, 16, 16, 128, DType::kBF16, 0},
      {"p11-1d d64 k1023 causal", 1, 4, {16384, 1, 1}, {1023, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 0, 0}, 16, 16, 64, DType::kBF16, 0},
      {"p7-flux-strided 256x256 k80 s16", 2, 1, {256, 256, 1}, {80, 80, 1}, {16, 16, 1}, {1, 1, 1}, {0, 0, 0}, 24, 24, 128, DType::kBF16, 0},
  };
  if (big) {
    perf.push_back({"p6-flux 256x256 k80", 2, 1, {256, 256, 1}, {80, 80, 1}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 24, 24, 128, DType::kBF16, 0});
    perf.push_back({"p8-video 30x48x80 k18x24x24", 3, 1, {30, 48, 80}, {18, 24, 24}, {1, 1, 1}, {1, 1, 1}, {0, 0, 0}, 24, 24, 128, DType::kBF16, 0});
    perf.push_back({"p9-video-strided s16x8x8", 3, 1, {30, 48, 80}, {18, 24, 24}, {16, 8, 8}, {1, 1, 1}, {0, 0, 0}, 24, 24, 128, DType::kBF16, 0});
  }
  for (const Case& c : perf) {
#if defined(JNA_TEST_SM90_ONLY)
    if (c.D != 128) continue;
#endif
#if defined(JNA_TEST_BF16_ONLY)
    if (c.dt != DType::kBF16) continue;
#endif
    time_case(c, rng);
  }
  std::printf(all ? "ALL PASS\n" : "SOME FAILED\n");
  return all ? 0 : 1;
}
