// Standalone GPU test of the fused backward: dq, dk, dv and the additional keys' / values'
// gradients against a float64 CPU evaluation of SEMANTICS.md (the forward per row from
// test_harness.h, then dP = dO V^T, dS = P (dP - delta), delta = rowsum(dO O) - d_lse), with poisoned
// outputs; then event timing of the benchmark shapes (the backward alone: its delta, dQ and dK/dV
// kernels). Built by tools/sm90_experiment.sh (bwd) as one kernel unit plus this file:
// -DJNA_TEST_SM90_ONLY -DJNA_TEST_BF16_ONLY: the Hopper backward (hopper/bwd_bf16_hd128.cu);
// -DJNA_TEST_PORTABLE_ONLY -DJNA_TEST_BF16_ONLY: the portable one (bwd_bf16_hd128.cu, built for sm_90a);
// -DJNA_TEST_HEAD_DIM=D (with either): that head dim's unit instead of 128's.
// Without either, it links every unit and calls the dispatcher (launch_bwd).
// Options (test_harness.h): --timing, --checks (no timings), --big, --tiles N (backward configuration
// N), --atomic (the Hopper dK/dV kernel adds dQ: non-deterministic mode). Exit code 0 only when every case passes.
// The experiment knobs NO_DQ_KERNEL, NO_DKDV_KERNEL, ONE_UNIT and NO_EXP (-DJNA_BWD_EXPERIMENT_*,
// cuda/fused/NOTES.md sessions 30-32) make the checks fail on purpose: those variants are for their timings.
#include <cstdio>
#include <random>
#include <vector>

#include "fused/fused_bwd.h"
#include "fused/test_harness.h"
#include "fused/tile_shapes.cuh"

using namespace jax_na;
using namespace jax_na::test;

static int g_tiles = 0;      // --tiles
static bool g_atomic = false;  // --atomic

// The backward under test (see the header). args.dq_accum set: non-deterministic mode.
static cudaError_t launch(const geo::Problem& pr, int rank, DType dt, const fused::BwdArgs& args_in) {
  fused::BwdArgs args = args_in;
  // Configuration g_tiles where the rank has it (the 16-bit head-dim-128 lists), else the default.
  // (--atomic: the non-deterministic kernel's own list, HopperBwdWsTiles)
  const int n90 = args.dq_accum != nullptr
                      ? (rank == 1 ? fused::HopperBwdWsTiles<1>::kCount
                                   : (rank == 2 ? fused::HopperBwdWsTiles<2>::kCount : fused::HopperBwdWsTiles<3>::kCount))
                      : (rank == 1 ? fused::HopperBwdTiles<1>::kCount
                                   : (rank == 2 ? fused::HopperBwdTiles<2>::kCount : fused::HopperBwdTiles<3>::kCount));
  constexpr int kD = kTestHeadDim;  // 128 unless an experiment build says otherwise
  const int n80 = rank == 1 ? fused::PortableBwdTiles<DType::kBF16, kD, 1>::kCount
                            : (rank == 2 ? fused::PortableBwdTiles<DType::kBF16, kD, 2>::kCount
                                         : fused::PortableBwdTiles<DType::kBF16, kD, 3>::kCount);
  args.tiles_sm90 = g_tiles < n90 ? g_tiles : 0;
  args.tiles_sm80 = g_tiles < n80 && dt != DType::kF32 ? g_tiles : 0;  // float32: the default only
#if defined(JNA_TEST_SM90_ONLY) || defined(JNA_TEST_PORTABLE_ONLY)
  if (args.D != kD || dt != DType::kBF16) return cudaErrorInvalidValue;
#if defined(JNA_TEST_SM90_ONLY)
  if (rank == 1) return fused::run_bwd_sm90<DType::kBF16, kD, 1>(pr, args, 0);
  if (rank == 2) return fused::run_bwd_sm90<DType::kBF16, kD, 2>(pr, args, 0);
  return fused::run_bwd_sm90<DType::kBF16, kD, 3>(pr, args, 0);
#else
  if (rank == 1) return fused::run_bwd<DType::kBF16, kD, 1>(pr, args, 0);
  if (rank == 2) return fused::run_bwd<DType::kBF16, kD, 2>(pr, args, 0);
  return fused::run_bwd<DType::kBF16, kD, 3>(pr, args, 0);
#endif
#else
  return fused::launch_bwd(pr, rank, dt, args, 0);
#endif
}

// Device buffers of one backward call.
struct BwdBuffers {
  fused::BwdArgs args;
  std::vector<void*> owned;
  void* alloc(size_t bytes, int fill = -1) {
    void* p = nullptr;
    CK(cudaMalloc(&p, std::max<size_t>(bytes, 16)));
    if (fill >= 0) CK(cudaMemset(p, fill, std::max<size_t>(bytes, 16)));
    owned.push_back(p);
    return p;
  }
  // Outputs poisoned (NaN bytes) and the workspace (delta, and dQ's float32 sums with --atomic).
  void outputs(const geo::Problem& pr, int64_t D) {
    const size_t nq = pr.B * pr.N * pr.H * D, nk = pr.B * pr.N * pr.Hkv * D, na = pr.B * pr.Na * pr.Hkv * D;
    args.dq = alloc(nq * 2, 0xFF);
    args.dk = alloc(nk * 2, 0xFF);
    args.dv = alloc(nk * 2, 0xFF);
    args.d_add_k = alloc(na * 2, 0xFF);
    args.d_add_v = alloc(na * 2, 0xFF);
    // As the FFI handler: dQ's float32 sums first (16-byte aligned for the kernels' float4 and
    // float2 accesses), then delta.
    float* ws = static_cast<float*>(alloc(fused::bwd_workspace_floats(pr, D, !g_atomic) * 4, 0xFF));
    args.dq_accum = g_atomic ? ws : nullptr;
    // (delta's offset as the two modes' sizes differ: also right against an older fused_bwd.h, whose
    // dq_accum had D floats per row, for sm90_experiment.sh's "head" variant)
    args.workspace = g_atomic ? ws + (fused::bwd_workspace_floats(pr, D, false) - fused::bwd_workspace_floats(pr, D, true)) : ws;
  }
  ~BwdBuffers() {
    for (void* p : owned) cudaFree(p);
  }
};

// The forward's outputs (rounded as the kernels' are) and the float64 reference gradients of a case.
struct Reference {
  std::vector<uint16_t> out_bits;
  std::vector<float> lse;
  std::vector<double> dq, dk, dv, dak, dav;
};
static Reference reference_backward(const geo::Problem& pr, const Case& cs, const HostInputs& in, const HostT& d_out,
                                    const std::vector<float>& d_lse) {
  const int64_t D = cs.D;
  const float scale = cs.softmax_scale();
  const size_t rows = pr.B * pr.N * pr.H, nq = rows * D, nk = pr.B * pr.N * pr.Hkv * D,
               na = pr.B * pr.Na * pr.Hkv * D;
  Reference g;
  g.out_bits.resize(nq);
  g.lse.resize(rows);
  g.dq.assign(nq, 0.0), g.dk.assign(nk, 0.0), g.dv.assign(nk, 0.0), g.dak.assign(na, 0.0), g.dav.assign(na, 0.0);
  for_each_row_forward(pr, in, D, scale, [&](size_t row, const RowForward& r) {
    g.lse[row] = static_cast<float>(r.lse);
    const float* q = &in.q.val[row * D];
    const float* dO = &d_out.val[row * D];
    // rowsum(dO O) - d_lse, with O as the kernels get it (rounded): the check measures their error.
    double delta = -d_lse[row];
    for (int64_t e = 0; e < D; ++e) {
      g.out_bits[row * D + e] = to_bits(static_cast<float>(r.out[e]), cs.dt);
      delta += double(dO[e]) * from_bits(g.out_bits[row * D + e], cs.dt);
    }
    for (size_t i = 0; i < r.p.size(); ++i) {
      double dp = 0;
      for (int64_t e = 0; e < D; ++e) dp += double(dO[e]) * r.value[i][e];
      const double ds = r.p[i] * (dp - delta);
      double* dk = (r.is_add[i] ? g.dak.data() : g.dk.data()) + r.key_off[i];
      double* dv = (r.is_add[i] ? g.dav.data() : g.dv.data()) + r.key_off[i];
      for (int64_t e = 0; e < D; ++e) {
        g.dq[row * D + e] += scale * ds * r.key[i][e];
        dk[e] += scale * ds * q[e];
        dv[e] += r.p[i] * dO[e];
      }
    }
  });
  return g;
}

static bool run_case(const Case& cs, std::mt19937& rng) {
  const geo::Problem pr = make_problem(cs);
  const size_t rows = pr.B * pr.N * pr.H, nq = rows * cs.D;
  const HostInputs in = random_inputs(pr, cs, rng);
  const HostT d_out = random_tensor(nq, cs.dt, rng, 1.f);
  std::vector<float> d_lse(rows);
  std::uniform_real_distribution<float> u(-0.5f, 0.5f);
  for (float& x : d_lse) x = u(rng);
  const Reference ref = reference_backward(pr, cs, in, d_out, d_lse);

  BwdBuffers buf;
  fused::BwdArgs& args = buf.args;
  std::vector<void*> inputs = {upload(in.q.bits), upload(in.k.bits), upload(in.v.bits), upload(in.ak.bits),
                               upload(in.av.bits), upload(ref.out_bits), upload(d_out.bits)};
  buf.owned.insert(buf.owned.end(), inputs.begin(), inputs.end());
  args.q = inputs[0], args.k = inputs[1], args.v = inputs[2], args.add_k = inputs[3], args.add_v = inputs[4];
  args.out = inputs[5], args.d_out = inputs[6];
  float* dlse_dev = static_cast<float*>(buf.alloc(rows * 4));
  float* lse_dev = static_cast<float*>(buf.alloc(rows * 4));
  CK(cudaMemcpy(dlse_dev, d_lse.data(), rows * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(lse_dev, ref.lse.data(), rows * 4, cudaMemcpyHostToDevice));
  args.lse = lse_dev;
  args.d_lse = dlse_dev;
  args.D = cs.D;
  args.scale = cs.softmax_scale();
  buf.outputs(pr, cs.D);
  CK(launch(pr, cs.rank, cs.dt, args));
  CK(cudaDeviceSynchronize());

  struct Grad {
    const char* name;
    void* dev;
    const std::vector<double>* want;
  };
  const Grad grads[] = {{"dq", args.dq, &ref.dq}, {"dk", args.dk, &ref.dk}, {"dv", args.dv, &ref.dv},
                        {"dak", args.d_add_k, &ref.dak}, {"dav", args.d_add_v, &ref.dav}};
  // Relative L2 error, and the largest error over the largest reference value (a few wrong rows).
  const double tol = cs.dt == DType::kF16 ? 2e-3 : 1e-2, tol_max = cs.dt == DType::kF16 ? 1e-2 : 5e-2;
  bool ok = true;
  std::printf("%-44s %s", cs.name.c_str(), cs.dtype_name());
  for (const Grad& g : grads) {
    if (g.want->empty()) continue;
    const std::vector<uint16_t> got = download<uint16_t>(g.dev, g.want->size());
    ErrorNorm err;
    for (size_t i = 0; i < got.size(); ++i) err.add(from_bits(got[i], cs.dt), (*g.want)[i]);
    const bool good = err.finite && err.rel() <= tol && err.rel_max() <= tol_max;
    ok = ok && good;
    std::printf(" %s=%.1e/%.1e%s", g.name, err.rel(), err.rel_max(), good ? "" : (err.finite ? "!" : "(nan)!"));
  }
  std::printf("  %s\n", ok ? "PASS" : "FAIL");
  return ok;
}

// lse for the timed problems' random inputs: about what a forward gives them (log of the keys, plus
// the spread of the scores), so that the exponentials stay in range.
__global__ void fill_lse(float* lse, int64_t n, float value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    lse[i] = value;
}

static void time_case(const Case& cs, std::mt19937& rng) {
  const geo::Problem pr = make_problem(cs);
  const int64_t D = cs.D;
  const size_t rows = pr.B * pr.N * pr.H, nq = rows * D, nk = pr.B * pr.N * pr.Hkv * D;
  BwdBuffers buf;
  fused::BwdArgs& args = buf.args;
  for (void* p : {device_random(nq, cs.dt, rng(), 2.f), device_random(nk, cs.dt, rng(), 2.f),
                  device_random(nk, cs.dt, rng(), 1.f), device_random(nq, cs.dt, rng(), 0.3f),
                  device_random(nq, cs.dt, rng(), 1.f)})
    buf.owned.push_back(p);
  args.q = buf.owned[0], args.k = buf.owned[1], args.v = buf.owned[2], args.out = buf.owned[3];
  args.d_out = buf.owned[4];
  args.add_k = args.k, args.add_v = args.v;  // Na = 0
  float* lse = static_cast<float*>(buf.alloc(rows * 4));
  fill_lse<<<1024, 256>>>(lse, int64_t(rows), std::log(float(pr.W)) + 1.f);
  CK(cudaGetLastError());
  args.lse = lse;
  args.d_lse = static_cast<float*>(buf.alloc(rows * 4, 0));
  args.D = cs.D;
  args.scale = cs.softmax_scale();
  buf.outputs(pr, D);
  const auto [med, best] = time_ms([&] { return launch(pr, cs.rank, cs.dt, args); });
  const double flops = 10.0 * pr.B * pr.H * pr.N * pr.W * D;  // 2.5 forwards (the benchmarks' metric)
  std::printf("TIME %-28s %s median %.3f ms  (min %.3f)  %.1f eff TFLOP/s (backward)\n", cs.name.c_str(),
              cs.dtype_name(), med, best, flops / (med * 1e-3) / 1e12);
}

int main(int argc, char** argv) {
  const Options opt = parse_options(argc, argv);
  g_tiles = opt.tiles;
  g_atomic = opt.atomic;
  return run_program(opt, run_case, time_case);
}
