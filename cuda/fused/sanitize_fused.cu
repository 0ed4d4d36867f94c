// Standalone driver of the fused kernels for compute-sanitizer (memcheck, racecheck, synccheck):
// runs the forward and the backward on small random problems covering every rank, GQA, dilation,
// stride, causal axes, additional keys and both head dims, and checks every result is finite.
// Correctness against the float64 reference is the pytest GPU suite's job; this binary exists because
// the sanitizer cannot run inside an XLA process.
//   nvcc -std=c++17 -O2 --expt-relaxed-constexpr -I cuda -I <cutlass>/include \
//        -gencode=arch=compute_90a,code=sm_90a cuda/fused/sanitize_fused.cu cuda/fused/{fwd,bwd}_*.cu \
//        cuda/fused/dispatch.cu -o sanitize_fused && compute-sanitizer --tool memcheck ./sanitize_fused
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

#include "fused/fused_bwd.h"
#include "fused/fused_fwd.h"
#include "fused/test_harness.h"  // CK, Case
#include "geometry/window.cuh"

using namespace jax_na;

static void* dev_random(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::vector<__nv_bfloat16> h(n);
  for (auto& x : h) x = __float2bfloat16(nd(rng));
  void* p = nullptr;
  CK(cudaMalloc(&p, n * 2 + 16));
  CK(cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice));
  return p;
}

static void* dev_zero(size_t bytes) {
  void* p = nullptr;
  CK(cudaMalloc(&p, bytes + 16));
  CK(cudaMemset(p, 0xff, bytes + 16));  // NaN bytes: unwritten results are caught below
  return p;
}

static bool all_finite_bf16(const void* d, size_t n) {
  std::vector<__nv_bfloat16> h(n);
  CK(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost));
  for (auto x : h)
    if (!std::isfinite(__bfloat162float(x))) return false;
  return true;
}

int main() {
  // name, rank, B, L, k, s, d, causal, H, Hkv, D, dtype, Na
  const test::Case cases[] = {
      {"1d", 1, 2, {70, 1, 1}, {9, 1, 1}, {2, 1, 1}, {3, 1, 1}, {0, 0, 0}, 4, 2, 64, DType::kBF16, 5},
      {"1d", 1, 1, {130, 1, 1}, {64, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 0, 0}, 2, 1, 128, DType::kBF16, 0},
      {"2d", 2, 1, {19, 23, 1}, {5, 4, 1}, {2, 1, 1}, {2, 3, 1}, {1, 0, 0}, 4, 2, 64, DType::kBF16, 3},
      {"2d", 2, 1, {17, 20, 1}, {7, 9, 1}, {1, 3, 1}, {1, 1, 1}, {0, 1, 0}, 2, 2, 128, DType::kBF16, 0},
      {"3d", 3, 1, {6, 9, 10}, {3, 4, 5}, {1, 2, 1}, {2, 1, 2}, {0, 0, 1}, 2, 1, 128, DType::kBF16, 4},
      {"3d", 3, 1, {5, 7, 8}, {2, 3, 4}, {1, 1, 2}, {1, 2, 1}, {1, 0, 0}, 2, 2, 64, DType::kBF16, 0},
      // head dim 32: the portable kernels only (64-byte rows)
      {"2d", 2, 2, {15, 18, 1}, {7, 7, 1}, {1, 2, 1}, {1, 2, 1}, {0, 0, 0}, 4, 2, 32, DType::kBF16, 2},
      {"3d", 3, 1, {5, 9, 8}, {3, 5, 3}, {1, 1, 1}, {1, 1, 2}, {1, 0, 0}, 2, 1, 32, DType::kBF16, 0},
  };
  std::mt19937 rng(7);
  int bad = 0;
  for (const test::Case& c : cases) {
    const geo::Problem pr = test::make_problem(c);
    const size_t nq = size_t(pr.B) * pr.N * c.H * c.D, nk = size_t(pr.B) * pr.N * c.Hkv * c.D;
    const size_t na = size_t(pr.B) * c.Na * c.Hkv * c.D, rows = size_t(pr.B) * pr.N * c.H;
    void *q = dev_random(nq, rng), *k = dev_random(nk, rng), *v = dev_random(nk, rng);
    void *ak = dev_random(na + 8, rng), *av = dev_random(na + 8, rng), *dout = dev_random(nq, rng);
    void* out = dev_zero(nq * 2);
    float* lse = static_cast<float*>(dev_zero(rows * 4));
    float* dlse = static_cast<float*>(dev_zero(rows * 4));
    CK(cudaMemset(dlse, 0, rows * 4));
    fused::FwdArgs fa;
    fa.q = q;
    fa.k = k;
    fa.v = v;
    fa.add_k = ak;
    fa.add_v = av;
    fa.out = out;
    fa.lse = lse;
    fa.D = c.D;
    fa.scale = 1.f / std::sqrt(float(c.D));
    // The persistent Hopper forward's tile counter (zeroed per launch), as the FFI handler passes it;
    // run with JAX_NA_PERSISTENT_CTAS=2 so that each CTA walks many tiles of these small problems.
    fa.tile_counter = static_cast<int32_t*>(dev_zero(sizeof(int32_t)));
    // Both forward kernels where the Hopper one can run (its output, then the portable one's, feeds
    // the backward).
    bool fwd_ok = true;
    for (int32_t arch : {fused::FwdArgs::kHopper, fused::FwdArgs::kPortable}) {
      if (arch == fused::FwdArgs::kHopper && !(fused::sm90_available() && fused::hopper_supported(DType::kBF16, c.D)))
        continue;
      fa.arch = arch;
      CK(cudaMemset(out, 0xff, nq * 2));  // NaN bf16: an element the kernel forgets stays NaN
      CK(cudaMemset(fa.tile_counter, 0, sizeof(int32_t)));
      CK(fused::launch_fwd(pr, c.rank, DType::kBF16, fa, 0));
      CK(cudaDeviceSynchronize());
      fwd_ok = fwd_ok && all_finite_bf16(out, nq);
    }
    void *dq = dev_zero(nq * 2), *dk = dev_zero(nk * 2), *dv = dev_zero(nk * 2);
    void *dak = dev_zero(na * 2), *dav = dev_zero(na * 2);
    // Room for the non-deterministic mode (dQ accumulators, then delta).
    float* ws = static_cast<float*>(dev_zero(fused::bwd_workspace_floats(pr, c.D, false) * 4));
    fused::BwdArgs ba;
    ba.q = q;
    ba.k = k;
    ba.v = v;
    ba.add_k = ak;
    ba.add_v = av;
    ba.out = out;
    ba.lse = lse;
    ba.d_out = dout;
    ba.d_lse = dlse;
    ba.dq = dq;
    ba.dk = dk;
    ba.dv = dv;
    ba.d_add_k = dak;
    ba.d_add_v = dav;
    ba.D = c.D;
    ba.scale = fa.scale;
    // Both backward kernel sets where the Hopper one can run (deterministic, and the
    // non-deterministic warp-specialized kernel adding dQ), results poisoned before each.
    bool bwd_ok = true;
    for (int32_t mode : {0, 1, 2}) {
      const int32_t arch = mode == 2 ? fused::FwdArgs::kPortable : fused::FwdArgs::kHopper;
      if (arch == fused::FwdArgs::kHopper && !(fused::sm90_available() && fused::hopper_supported(DType::kBF16, c.D)))
        continue;
      ba.arch = arch;
      ba.dq_accum = mode == 1 ? ws : nullptr;
      ba.workspace = mode == 1 ? ws + fused::bwd_dq_accum_floats(pr, c.D) : ws;
      for (auto [ptr, n] : {std::pair<void*, size_t>{dq, nq}, {dk, nk}, {dv, nk}, {dak, na}, {dav, na}})
        if (n) CK(cudaMemset(ptr, 0xff, n * 2));
      CK(fused::launch_bwd(pr, c.rank, DType::kBF16, ba, 0));
      CK(cudaDeviceSynchronize());
      bwd_ok = bwd_ok && all_finite_bf16(dq, nq) && all_finite_bf16(dk, nk) && all_finite_bf16(dv, nk) &&
               all_finite_bf16(dak, na) && all_finite_bf16(dav, na);
    }
    const bool ok = fwd_ok && bwd_ok;
    std::printf("rank %d L=%dx%dx%d D=%d H=%d/%d Na=%d: %s\n", c.rank, c.L[0], c.L[1], c.L[2], c.D, c.H, c.Hkv,
                int(c.Na), ok ? "ok" : "NOT FINITE / UNWRITTEN");
    bad += !ok;
    for (void* p : {q, k, v, ak, av, dout, out, static_cast<void*>(lse), static_cast<void*>(dlse), dq, dk, dv, dak,
                    dav, static_cast<void*>(ws), static_cast<void*>(fa.tile_counter)})
      CK(cudaFree(p));
  }
  std::printf("sanitize_fused: %d bad cases\n", bad);
  return bad ? 1 : 0;
}
