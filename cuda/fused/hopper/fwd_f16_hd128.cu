// Hopper fused forward instantiations: f16, head dim 128, ranks 1-3.
#include "fused/hopper/launch_fwd.cuh"

namespace jax_na {
namespace fused {
JNA_FUSED_FWD_SM90_INSTANTIATE(DType::kF16, 128)
}  // namespace fused
}  // namespace jax_na
