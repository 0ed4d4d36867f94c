// GEMM-based unfused kernels (PN, NN, IN), f16, head dim 128, ranks 1-3.
#include "gemm/launch.cuh"

namespace jax_na {
namespace gemm {
JNA_GEMM_INSTANTIATE(DType::kF16, 128)
}  // namespace gemm
}  // namespace jax_na
