// Naive PN (scores / probabilities / dS over the window and the additional keys), row softmax and
// the softmax-backward row term delta.
#include <cmath>

#include "common/dtype.cuh"
#include "common/launch.cuh"
#include "naive/naive.h"

namespace jax_na {
namespace naive {
namespace {

constexpr int kBlock = 256;

// One thread per (row, column); column c < W is window entry c, c >= W additional key c - W.
template <typename T, typename OutT>
__global__ void __launch_bounds__(kBlock) pn_kernel(Problem pr, PNArgs args) {
  const T* __restrict__ a = static_cast<const T*>(args.a);
  const T* __restrict__ b = static_cast<const T*>(args.b);
  const T* __restrict__ add_b = static_cast<const T*>(args.add_b);
  const T* __restrict__ rpb = static_cast<const T*>(args.rpb);
  OutT* __restrict__ out = static_cast<OutT*>(args.out);
  const int64_t ncols = args.ncols, E = args.E;
  const int64_t total = pr.rows() * ncols;
  const int32_t G = pr.groups();
  JNA_GRID_STRIDE_LOOP(idx, total) {
    const int64_t col = idx % ncols;
    const int64_t row = idx / ncols;
    const int32_t h = static_cast<int32_t>(row % pr.H);
    const int64_t bt = row / pr.H;
    const int64_t t = bt % pr.N;
    const int64_t bi = bt / pr.N;
    const int32_t hk = h / G;

    const T* key = nullptr;
    geo::QueryWindow qw;
    bool valid = true;
    if (col < pr.W) {
      qw = geo::query_window(pr, t);
      int64_t kt = 0;
      valid = geo::window_key(pr, qw, col, &kt);
      if (valid) key = b + geo::offset(bi, kt, hk, 0, pr.N, pr.Hkv, E);
    } else {
      key = add_b + geo::offset(bi, col - pr.W, hk, 0, pr.Na, pr.Hkv, E);
    }

    float r;
    if (!valid) {
      r = args.mode == PNMode::kScore ? -INFINITY : 0.f;
    } else {
      const T* q = a + row * E;
      float dot = 0.f;
      for (int64_t e = 0; e < E; ++e) dot += to_f32(q[e]) * to_f32(key[e]);
      switch (args.mode) {
        case PNMode::kScore:
          r = args.alpha * dot;
          if (rpb != nullptr && col < pr.W) r += to_f32(rpb[h * pr.rpb_size() + geo::rpb_index(pr, qw, col)]);
          break;
        case PNMode::kProb:
          r = expf(args.alpha * dot - args.lse[row]);
          break;
        case PNMode::kDS:
          r = args.p[idx] * (dot - args.delta[row]);
          break;
        default:
          r = dot;
          break;
      }
    }
    out[idx] = from_f32<OutT>(r);
  }
}

// One thread per row: scores -> exp(s - lse) in place, lse = log(sum exp(s)).
__global__ void __launch_bounds__(kBlock) softmax_kernel(int64_t rows, float* scores, int64_t ncols,
                                                         float* lse) {
  JNA_GRID_STRIDE_LOOP(row, rows) {
    float* s = scores + row * ncols;
    float m = -INFINITY;
    for (int64_t c = 0; c < ncols; ++c) m = fmaxf(m, s[c]);
    float l;
    if (m == -INFINITY) {  // cannot happen for valid geometry (every query sees a key)
      l = -INFINITY;
      for (int64_t c = 0; c < ncols; ++c) s[c] = 0.f;
    } else {
      float sum = 0.f;
      for (int64_t c = 0; c < ncols; ++c) sum += expf(s[c] - m);
      l = m + logf(sum);
      for (int64_t c = 0; c < ncols; ++c) s[c] = expf(s[c] - l);
    }
    lse[row] = l;
  }
}

// One thread per row: delta = rowsum(dO * O) - d_lse.
template <typename T>
__global__ void __launch_bounds__(kBlock) delta_kernel(int64_t rows, const T* __restrict__ d_out,
                                                       const T* __restrict__ out, int64_t Ev,
                                                       const float* __restrict__ d_lse,
                                                       float* __restrict__ delta) {
  JNA_GRID_STRIDE_LOOP(row, rows) {
    const T* dO = d_out + row * Ev;
    const T* O = out + row * Ev;
    float acc = 0.f;
    for (int64_t e = 0; e < Ev; ++e) acc += to_f32(dO[e]) * to_f32(O[e]);
    delta[row] = acc - (d_lse != nullptr ? d_lse[row] : 0.f);
  }
}

}  // namespace

cudaError_t launch_pn(const Problem& pr, DType dtype, const PNArgs& args, cudaStream_t stream) {
  const int64_t total = pr.rows() * args.ncols;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (args.out_f32) {
      pn_kernel<T, float><<<grid_for(total, kBlock), kBlock, 0, stream>>>(pr, args);
    } else {
      pn_kernel<T, T><<<grid_for(total, kBlock), kBlock, 0, stream>>>(pr, args);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_softmax(const Problem& pr, float* scores, int64_t ncols, float* lse,
                           cudaStream_t stream) {
  const int64_t rows = pr.rows();
  if (rows == 0) return cudaSuccess;
  softmax_kernel<<<grid_for(rows, kBlock), kBlock, 0, stream>>>(rows, scores, ncols, lse);
  return cudaGetLastError();
}

cudaError_t launch_delta(const Problem& pr, DType dtype, const void* d_out, const void* out,
                         int64_t Ev, const float* d_lse, float* delta, cudaStream_t stream) {
  const int64_t rows = pr.rows();
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    delta_kernel<T><<<grid_for(rows, kBlock), kBlock, 0, stream>>>(
        rows, static_cast<const T*>(d_out), static_cast<const T*>(out), Ev, d_lse, delta);
    return cudaGetLastError();
  });
}

}  // namespace naive
}  // namespace jax_na
