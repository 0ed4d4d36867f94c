// GEMM-based unfused kernels (PN, NN, IN), float32 (3xTF32), head dim 128, ranks 1-3.
#include "gemm/launch.cuh"

namespace jax_na {
namespace gemm {
JNA_GEMM_INSTANTIATE(DType::kF32, 128)
}  // namespace gemm
}  // namespace jax_na
