// Standalone GPU test of the fused forward: correctness against a float64 CPU evaluation of
// SEMANTICS.md (test_harness.h, built on geometry/window.cuh) and timing of the benchmark shapes
// (variants: tools/sm90_experiment.sh fwd).
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -I cuda -I <cutlass>/include \
//        -gencode=arch=compute_90a,code=sm_90a cuda/fused/test_fused_fwd.cu cuda/fused/fwd_*.cu cuda/fused/bwd_*.cu cuda/fused/dispatch.cu
// Exit code 0 only when every case passes.
// Experiments: -DJNA_TEST_SM90_ONLY links only hopper/fwd_{bf16,f16}_hd128.cu (every case then runs at
// head dim 128 on the Hopper forward: a variant builds in two units; -DJNA_TEST_BF16_ONLY: bfloat16
// only, one unit); -DJNA_TEST_PORTABLE_ONLY -DJNA_TEST_BF16_ONLY: the portable forward
// (fwd_bf16_hd<D>.cu) at head dim D = -DJNA_TEST_HEAD_DIM (default 128) the same way; with -DJNA_FWD_TRACE, `--trace` prints where
// the CTAs' time goes (trace.cuh). `--timing` skips the checks, `--checks` the timings,
// `--big` adds the large benchmark problems (p6, p8, p9), `--tiles N` runs tile configuration N
// (tile_shapes.cuh) of each kernel set where the rank has one, else the default.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "fused/fused_fwd.h"
#include "fused/trace.cuh"
#include "fused/test_harness.h"
#include "fused/tile_shapes.cuh"

using namespace jax_na;
using namespace jax_na::test;

#if defined(JNA_FWD_TRACE)
static fused::FwdTrace g_trace;
fused::FwdTrace jax_na::fused::fwd_trace_target() { return g_trace; }
#endif

static int g_tiles = 0;  // --tiles

// The forward under test: the dispatcher, or (JNA_TEST_SM90_ONLY / JNA_TEST_PORTABLE_ONLY) one
// kernel set at head dim 128.
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
#if defined(JNA_TEST_PORTABLE_ONLY)
  constexpr int kD = kTestHeadDim;
  const int n80 = rank == 1 ? fused::PortableFwdTilesFor<DType::kBF16, kD, 1>::kCount
                            : (rank == 2 ? fused::PortableFwdTilesFor<DType::kBF16, kD, 2>::kCount
                                         : fused::PortableFwdTilesFor<DType::kBF16, kD, 3>::kCount);
  args.tiles_sm80 = g_tiles < n80 ? g_tiles : 0;
  if (args.D != kD || dt != DType::kBF16) return cudaErrorInvalidValue;
  if (rank == 1) return fused::run_fwd<DType::kBF16, kD, 1>(pr, args, 0);
  if (rank == 2) return fused::run_fwd<DType::kBF16, kD, 2>(pr, args, 0);
  return fused::run_fwd<DType::kBF16, kD, 3>(pr, args, 0);
#elif defined(JNA_TEST_SM90_ONLY)
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
  const int n80 = fused::fwd_tile_configs(fused::FwdArgs::kPortable, dt, args.D, rank, nullptr, 0);
  args.tiles_sm80 = g_tiles < n80 ? g_tiles : 0;
  return fused::launch_fwd(pr, rank, dt, args, 0);
#endif
}

static bool run_case(const Case& cs, std::mt19937& rng) {
  const geo::Problem pr = make_problem(cs);
  const int64_t D = cs.D;
  const float scale = cs.softmax_scale();
  const size_t nq = pr.B * pr.N * pr.H * D;
  const HostInputs in = random_inputs(pr, cs, rng);
  void *dq = upload(in.q.bits), *dk = upload(in.k.bits), *dv = upload(in.v.bits), *dak = upload(in.ak.bits),
       *dav = upload(in.av.bits);
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
  const std::vector<uint16_t> out_bits = download<uint16_t>(dout, nq);
  const std::vector<float> lse = download<float>(dlse, rows);

  // float64 reference.
  ErrorNorm out_err;
  double lse_err = 0;
  for_each_row_forward(pr, in, D, scale, [&](size_t row, const RowForward& r) {
    if (!std::isfinite(lse[row])) out_err.finite = false;
    lse_err = std::max(lse_err, std::fabs(lse[row] - r.lse));
    for (int64_t e = 0; e < D; ++e) out_err.add(from_bits(out_bits[row * D + e], cs.dt), r.out[e]);
  });
  const double tol = cs.dt == DType::kF16 ? 2e-3 : 1e-2;
  const bool ok = out_err.finite && out_err.rel() <= tol && lse_err <= 2e-2;
  std::printf("%-44s %s rel=%.2e lse_err=%.2e finite=%d  %s\n", cs.name.c_str(), cs.dtype_name(), out_err.rel(),
              lse_err, int(out_err.finite), ok ? "PASS" : "FAIL");
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
  for (int i = 1; i < fused::kTracePoints; ++i)
    if (t[0].clk[i] != 0) std::printf(" %s %.0f", names[i], mean[i]);  // points the kernel records
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

#if defined(JNA_FWD_TRACE)
static bool trace = false;  // --trace
#endif

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
  const auto [med, best] = time_ms([&] { return launch(pr, cs.rank, cs.dt, args); });
  const double flops = 4.0 * pr.B * pr.H * pr.N * pr.W * D;
  std::printf("TIME %-28s %s median %.3f ms  (min %.3f)  %.1f eff TFLOP/s\n", cs.name.c_str(), cs.dtype_name(), med,
              best, flops / (med * 1e-3) / 1e12);
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
  const Options opt = parse_options(argc, argv);
#if defined(JNA_FWD_TRACE)
  trace = opt.trace;
#endif
  g_tiles = opt.tiles;
  return run_program(opt, run_case, time_case);
}
