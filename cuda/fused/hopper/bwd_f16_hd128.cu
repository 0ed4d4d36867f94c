// Hopper fused backward instantiations: f16, head dim 128, ranks 1-3.
#include "fused/hopper/launch_bwd.cuh"

namespace jax_na {
namespace fused {
JNA_FUSED_BWD_SM90_INSTANTIATE(DType::kF16, 128)
}  // namespace fused
}  // namespace jax_na
