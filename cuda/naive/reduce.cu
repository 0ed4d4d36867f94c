// Naive reductions over all queries: gradients of the additional keys/values and of the relative
// positional bias. One block per output element with a fixed-order block reduction (deterministic).
#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "naive/naive.h"

namespace jax_na {
namespace naive {
namespace {

constexpr int kBlock = 256;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// out[b, a, hkv, e] = alpha * sum_{t, h in group(hkv)} attn[row(b,t,h), W + a] * vals[row, e].
template <typename T>
__global__ void __launch_bounds__(kBlock) add_reduce_kernel(Problem pr, AddReduceArgs args) {
  __shared__ float smem[kBlock];
  const T* __restrict__ vals = static_cast<const T*>(args.vals);
  T* __restrict__ out = static_cast<T*>(args.out);
  const int64_t E = args.E, ncols = pr.W + pr.Na;
  const int64_t total = pr.B * pr.Na * pr.Hkv * E;
  const int32_t G = pr.groups();
  const int64_t inner = pr.N * G;
  JNA_BLOCK_STRIDE_LOOP(o, total) {
    const int64_t e = o % E;
    int64_t rest = o / E;
    const int32_t hk = static_cast<int32_t>(rest % pr.Hkv);
    rest /= pr.Hkv;
    const int64_t ai = rest % pr.Na;
    const int64_t bi = rest / pr.Na;
    float acc = 0.f;
    for (int64_t m = threadIdx.x; m < inner; m += kBlock) {
      const int64_t t = m / G;
      const int64_t row = (bi * pr.N + t) * pr.H + static_cast<int64_t>(hk) * G + (m % G);
      acc += args.attn[row * ncols + pr.W + ai] * to_f32(vals[row * E + e]);
    }
    acc = block_sum<kBlock>(acc, smem);
    if (threadIdx.x == 0) out[o] = from_f32<T>(args.alpha * acc);
  }
}

// d_rpb[h, r] = sum_{b, t} d_attn[row(b,t,h), w(t, r)] over the queries whose window holds the key at
// relative offset r (per axis: key position = query position + r_a - (k_a - 1)).
template <typename T>
__global__ void __launch_bounds__(kBlock) rpb_grad_kernel(Problem pr, const T* __restrict__ d_attn,
                                                          T* __restrict__ d_rpb) {
  __shared__ float smem[kBlock];
  const int64_t R = pr.rpb_size();
  const int64_t total = pr.H * R;
  const int64_t inner = pr.B * pr.N;
  JNA_BLOCK_STRIDE_LOOP(o, total) {
    const int32_t h = static_cast<int32_t>(o / R);
    int64_t r = o % R;
    int32_t rel[geo::kMaxRank];
    for (int a = geo::kMaxRank - 1; a >= 0; --a) {
      const int32_t span = 2 * pr.axis[a].k - 1;
      rel[a] = static_cast<int32_t>(r % span) - (pr.axis[a].k - 1);
      r /= span;
    }
    float acc = 0.f;
    for (int64_t m = threadIdx.x; m < inner; m += kBlock) {
      const int64_t t = m % pr.N;
      const geo::QueryWindow qw = geo::query_window(pr, t);
      int32_t wa[geo::kMaxRank];
      bool valid = true;
      for (int a = 0; a < geo::kMaxRank; ++a) {
        const int32_t pos = qw.p[a] + rel[a];
        valid = valid && pos >= qw.start[a] && pos < qw.end[a];
        wa[a] = pos - qw.start[a];
      }
      if (valid) acc += to_f32(d_attn[(m * pr.H + h) * pr.W + pr.window_index(wa)]);
    }
    acc = block_sum<kBlock>(acc, smem);
    if (threadIdx.x == 0) d_rpb[o] = from_f32<T>(acc);
  }
}

}  // namespace

cudaError_t launch_add_reduce(const Problem& pr, DType dtype, const AddReduceArgs& args,
                              cudaStream_t stream) {
  const int64_t total = pr.B * pr.Na * pr.Hkv * args.E;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    add_reduce_kernel<T><<<grid_for(total, 1, kMaxBlocks), kBlock, 0, stream>>>(pr, args);
    return cudaGetLastError();
  });
}

cudaError_t launch_rpb_grad(const Problem& pr, DType dtype, const void* d_attn, void* d_rpb,
                            cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(pr.H) * pr.rpb_size();
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    rpb_grad_kernel<T><<<grid_for(total, 1, kMaxBlocks), kBlock, 0, stream>>>(
        pr, static_cast<const T*>(d_attn), static_cast<T*>(d_rpb));
    return cudaGetLastError();
  });
}

}  // namespace naive
}  // namespace jax_na
