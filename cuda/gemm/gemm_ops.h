// GEMM-based unfused neighborhood attention on tensor cores: the host-side entry points.
//
// The three operations of the unfused ops (SEMANTICS.md, "unfused ops"), each an implicit GEMM over
// gathered token rows (CuTe SM80 MMA atoms, cp.async, ldmatrix; they run on every GPU from sm_80 up):
//   PN  weights[r, w] = alpha * a[r] . b[key(r, w)] (+ rpb)   query-stationary: a Q tile times the key
//                                                            tiles of its window box, the products
//                                                            scattered into the window entries
//   NN  out[r] = alpha * sum_w weights[r, w] b[key(r, w)]    query-stationary: the window entries
//                                                            gathered into a (queries x keys) operand
//   IN  out[k] = alpha * sum_{r: k in window(r)} weights[r, w(r, k)] a[r]   key-stationary: a key tile
//                                                            times the query tiles of its inverse
//                                                            neighbourhood (all query heads of a GQA group)
// The argument structs are the naive kernels' (naive/naive.h): one contract, two implementations.
// No CUDA device code and no CuTe here, so the host-compiled FFI handlers can include it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "geometry/window.cuh"
#include "naive/naive.h"

namespace jax_na {
namespace gemm {

// Whether the tensor-core kernels take a call: float16/bfloat16, or float32 (3xTF32: float32
// accuracy), head dim E of 64 or 128 (the Python lowering zero-pads smaller ones), rank 1..3, window columns only (no additional keys) and
// weights in the call's dtype (PN may write float32). PN: modes kScore and kRaw.
bool supports(DType dtype, int64_t E, int rank, int64_t ncols, const geo::Problem& pr);
bool supports_pn(DType dtype, int rank, const geo::Problem& pr, const naive::PNArgs& args);
bool supports_nn(DType dtype, int rank, const geo::Problem& pr, const naive::NNArgs& args);
bool supports_in(DType dtype, int rank, const geo::Problem& pr, const naive::INArgs& args);

// Asynchronous on `stream`, allocate nothing; cudaErrorInvalidValue for a call supports_* rejects or
// a grid that does not fit. `rank`: spatial axes (1..3).
cudaError_t launch_pn(const geo::Problem& pr, int rank, DType dtype, const naive::PNArgs& args, cudaStream_t stream);
cudaError_t launch_nn(const geo::Problem& pr, int rank, DType dtype, const naive::NNArgs& args, cudaStream_t stream);
cudaError_t launch_in(const geo::Problem& pr, int rank, DType dtype, const naive::INArgs& args, cudaStream_t stream);

}  // namespace gemm
}  // namespace jax_na

namespace jax_na {
namespace gemm {

// One instantiation each (defined in ops_<dtype>_hd<E>.cu through launch.cuh).
template <DType kDType, int kE, int kRank>
cudaError_t run_pn(const geo::Problem& pr, const naive::PNArgs& args, cudaStream_t stream);
template <DType kDType, int kE, int kRank>
cudaError_t run_nn(const geo::Problem& pr, const naive::NNArgs& args, cudaStream_t stream);
template <DType kDType, int kE, int kRank>
cudaError_t run_in(const geo::Problem& pr, const naive::INArgs& args, cudaStream_t stream);

}  // namespace gemm
}  // namespace jax_na
