// Naive NN: out = alpha * (attn over the window . V + attn over the additional columns . add_V).
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "naive/naive.h"

namespace jax_na {
namespace naive {
namespace {

constexpr int kBlock = 256;

// One thread per (row, e). Walks only the valid window entries (masked causal entries are skipped).
template <typename T, typename AT>
__global__ void __launch_bounds__(kBlock) nn_kernel(Problem pr, NNArgs args) {
  const AT* __restrict__ attn = static_cast<const AT*>(args.attn);
  const T* __restrict__ vals = static_cast<const T*>(args.vals);
  const T* __restrict__ add_vals = static_cast<const T*>(args.add_vals);
  T* __restrict__ out = static_cast<T*>(args.out);
  const int64_t E = args.E, ncols = args.ncols;
  const int64_t total = pr.rows() * E;
  const int32_t G = pr.groups();
  const int32_t k1 = pr.axis[1].k, k2 = pr.axis[2].k;
  JNA_GRID_STRIDE_LOOP(idx, total) {
    const int64_t e = idx % E;
    const int64_t row = idx / E;
    const int32_t h = static_cast<int32_t>(row % pr.H);
    const int64_t bt = row / pr.H;
    const int64_t t = bt % pr.N;
    const int64_t bi = bt / pr.N;
    const int32_t hk = h / G;
    const AT* arow = attn + row * ncols;
    const geo::QueryWindow qw = geo::query_window(pr, t);

    float acc = 0.f;
    int32_t x[geo::kMaxRank];
    for (int32_t p0 = qw.start[0]; p0 < qw.end[0]; ++p0) {
      x[0] = geo::token_of(pr.axis[0], qw.g[0], p0);
      const int64_t w0 = p0 - qw.start[0];
      for (int32_t p1 = qw.start[1]; p1 < qw.end[1]; ++p1) {
        x[1] = geo::token_of(pr.axis[1], qw.g[1], p1);
        const int64_t w01 = w0 * k1 + (p1 - qw.start[1]);
        for (int32_t p2 = qw.start[2]; p2 < qw.end[2]; ++p2) {
          x[2] = geo::token_of(pr.axis[2], qw.g[2], p2);
          const int64_t w = w01 * k2 + (p2 - qw.start[2]);
          acc += to_f32(arow[w]) * to_f32(vals[geo::offset(bi, pr.token(x), hk, e, pr.N, pr.Hkv, E)]);
        }
      }
    }
    for (int64_t c = pr.W; c < ncols; ++c)
      acc += to_f32(arow[c]) * to_f32(add_vals[geo::offset(bi, c - pr.W, hk, e, pr.Na, pr.Hkv, E)]);
    out[idx] = from_f32<T>(args.alpha * acc);
  }
}

}  // namespace

cudaError_t launch_nn(const Problem& pr, DType dtype, const NNArgs& args, cudaStream_t stream) {
  const int64_t total = pr.rows() * args.E;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (args.attn_f32) {
      nn_kernel<T, float><<<grid_for(total, kBlock), kBlock, 0, stream>>>(pr, args);
    } else {
      nn_kernel<T, T><<<grid_for(total, kBlock), kBlock, 0, stream>>>(pr, args);
    }
    return cudaGetLastError();
  });
}

}  // namespace naive
}  // namespace jax_na
