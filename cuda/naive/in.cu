// Naive IN (inverse neighborhood): out[b, key, hkv, e] = alpha * sum over the queries whose window
// holds `key` and over the query heads of kv head hkv of attn[row, w(query, key)] * vals[row, e].
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "naive/naive.h"

namespace jax_na {
namespace naive {
namespace {

constexpr int kBlock = 256;

// One thread per (b, key token, kv head, e); fixed summation order, no atomics.
template <typename T, typename AT>
__global__ void __launch_bounds__(kBlock) in_kernel(Problem pr, INArgs args) {
  const AT* __restrict__ attn = static_cast<const AT*>(args.attn);
  const T* __restrict__ vals = static_cast<const T*>(args.vals);
  T* __restrict__ out = static_cast<T*>(args.out);
  const int64_t E = args.E, ncols = args.ncols;
  const int64_t total = pr.B * pr.N * pr.Hkv * E;
  const int32_t G = pr.groups();
  const int32_t k1 = pr.axis[1].k, k2 = pr.axis[2].k;
  JNA_GRID_STRIDE_LOOP(idx, total) {
    const int64_t e = idx % E;
    int64_t rest = idx / E;
    const int32_t hk = static_cast<int32_t>(rest % pr.Hkv);
    rest /= pr.Hkv;
    const int64_t kt = rest % pr.N;
    const int64_t bi = rest / pr.N;

    int32_t xk[geo::kMaxRank];
    pr.token_coords(kt, xk);
    geo::AxisPos kp[geo::kMaxRank];
    geo::Range qr[geo::kMaxRank];
    for (int a = 0; a < geo::kMaxRank; ++a) {
      kp[a] = geo::axis_pos(pr.axis[a], xk[a]);
      qr[a] = geo::inverse_range(pr.axis[a], kp[a].p, kp[a].Lg);
    }

    float acc = 0.f;
    int32_t xq[geo::kMaxRank];
    for (int32_t p0 = qr[0].begin; p0 < qr[0].end; ++p0) {
      xq[0] = geo::token_of(pr.axis[0], kp[0].g, p0);
      const int64_t w0 = kp[0].p - geo::window_start(pr.axis[0], p0, kp[0].Lg);
      for (int32_t p1 = qr[1].begin; p1 < qr[1].end; ++p1) {
        xq[1] = geo::token_of(pr.axis[1], kp[1].g, p1);
        const int64_t w01 = w0 * k1 + (kp[1].p - geo::window_start(pr.axis[1], p1, kp[1].Lg));
        for (int32_t p2 = qr[2].begin; p2 < qr[2].end; ++p2) {
          xq[2] = geo::token_of(pr.axis[2], kp[2].g, p2);
          const int64_t w = w01 * k2 + (kp[2].p - geo::window_start(pr.axis[2], p2, kp[2].Lg));
          const int64_t qrow0 = (bi * pr.N + pr.token(xq)) * pr.H + static_cast<int64_t>(hk) * G;
          for (int32_t gi = 0; gi < G; ++gi) {
            const int64_t row = qrow0 + gi;
            acc += to_f32(attn[row * ncols + w]) * to_f32(vals[row * E + e]);
          }
        }
      }
    }
    out[idx] = from_f32<T>(args.alpha * acc);
  }
}

}  // namespace

cudaError_t launch_in(const Problem& pr, DType dtype, const INArgs& args, cudaStream_t stream) {
  const int64_t total = pr.B * pr.N * pr.Hkv * args.E;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (args.attn_f32) {
      in_kernel<T, float><<<grid_for(total, kBlock), kBlock, 0, stream>>>(pr, args);
    } else {
      in_kernel<T, T><<<grid_for(total, kBlock), kBlock, 0, stream>>>(pr, args);
    }
    return cudaGetLastError();
  });
}

}  // namespace naive
}  // namespace jax_na
