// Naive neighborhood-attention kernels: host-side launch API.
//
// Everything is expressed on a 3-axis geo::Problem (rank 1 and 2 have singleton axes), so the rank is
// never a template parameter. Element pointers are untyped; `dtype` selects the instantiation.
// "Rows" are the query rows [B, N, H] (row = (b * N + t) * H + h); an attention-weight matrix is
// [rows, ncols] row-major with ncols = W (window) or W + Na (window, then additional keys).
// Every launcher is asynchronous on `stream`, allocates nothing, and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "geometry/window.cuh"

namespace jax_na {
namespace naive {

using geo::Problem;

// What PN writes for window/additional column c of row r (dot = a[r] . b[key(c)]):
enum class PNMode : int {
  kScore = 0,  // alpha * dot (+ rpb for window columns); masked: -inf
  kProb = 1,   // exp(alpha * dot - lse[r]); masked: 0
  kDS = 2,     // p[r, c] * (dot - delta[r]); masked: 0
  kRaw = 3,    // dot; masked: 0
};

struct PNArgs {
  PNMode mode = PNMode::kScore;
  const void* a = nullptr;      // [B, N, H, E] (dtype)
  const void* b = nullptr;      // [B, N, Hkv, E] (dtype)
  const void* add_b = nullptr;  // [B, Na, Hkv, E] (dtype); read when ncols > W
  int64_t E = 0;
  int64_t ncols = 0;            // W or W + Na
  float alpha = 1.f;
  const void* rpb = nullptr;    // [H, 2k0-1, 2k1-1, 2k2-1] (dtype) or null; kScore only, stride 1
  const float* lse = nullptr;   // [rows] (kProb)
  const float* delta = nullptr; // [rows] (kDS)
  const float* p = nullptr;     // [rows, ncols] (kDS)
  void* out = nullptr;          // [rows, ncols]
  bool out_f32 = true;          // out is float32 (else dtype)
};
// One thread per (row, column).
cudaError_t launch_pn(const Problem& pr, DType dtype, const PNArgs& args, cudaStream_t stream);

// In place: scores [rows, ncols] -> probabilities exp(s - lse); writes lse [rows]. One thread per row.
cudaError_t launch_softmax(const Problem& pr, float* scores, int64_t ncols, float* lse,
                           cudaStream_t stream);

struct NNArgs {
  const void* attn = nullptr;      // [rows, ncols]
  bool attn_f32 = true;            // attn is float32 (else dtype)
  int64_t ncols = 0;               // W or W + Na
  const void* vals = nullptr;      // [B, N, Hkv, E] (dtype)
  const void* add_vals = nullptr;  // [B, Na, Hkv, E] (dtype); read when ncols > W
  int64_t E = 0;
  float alpha = 1.f;
  void* out = nullptr;             // [B, N, H, E] (dtype) = alpha * sum_c attn[r, c] * vals[key(c)]
};
// One thread per (row, e); masked window entries are skipped.
cudaError_t launch_nn(const Problem& pr, DType dtype, const NNArgs& args, cudaStream_t stream);

struct INArgs {
  const void* attn = nullptr;  // [rows, ncols] (window columns used)
  bool attn_f32 = true;
  int64_t ncols = 0;
  const void* vals = nullptr;  // [B, N, H, E] (dtype), query side
  int64_t E = 0;
  float alpha = 1.f;
  void* out = nullptr;         // [B, N, Hkv, E] (dtype)
};
// Inverse neighborhood: one thread per (b, key token, kv head, e), summing over the queries whose
// window holds the key and over the query heads of the kv head, in a fixed order (deterministic).
cudaError_t launch_in(const Problem& pr, DType dtype, const INArgs& args, cudaStream_t stream);

struct AddReduceArgs {
  const float* attn = nullptr;  // [rows, W + Na] float32 (additional columns used)
  const void* vals = nullptr;   // [B, N, H, E] (dtype)
  int64_t E = 0;
  float alpha = 1.f;
  void* out = nullptr;          // [B, Na, Hkv, E] (dtype) = alpha * sum over all queries/heads of group
};
// One block per output element, fixed-order block reduction (deterministic).
cudaError_t launch_add_reduce(const Problem& pr, DType dtype, const AddReduceArgs& args,
                              cudaStream_t stream);

// d_rpb [H, 2k0-1, 2k1-1, 2k2-1] (dtype) = sum over batch and query tokens of d_attn [rows, W] (dtype)
// at each relative offset. One block per output element (deterministic). Stride 1.
cudaError_t launch_rpb_grad(const Problem& pr, DType dtype, const void* d_attn, void* d_rpb,
                            cudaStream_t stream);

// delta[r] = sum_e d_out[r, e] * out[r, e] - d_lse[r] (d_lse may be null). One thread per row.
cudaError_t launch_delta(const Problem& pr, DType dtype, const void* d_out, const void* out,
                         int64_t Ev, const float* d_lse, float* delta, cudaStream_t stream);

}  // namespace naive
}  // namespace jax_na
