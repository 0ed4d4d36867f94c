// Fused backward instantiations: f16, head dim 256, ranks 1-3 (one file per (dtype, head dim) keeps
// each translation unit small and the build parallel).
#include "fused/launch_bwd.cuh"

namespace jax_na {
namespace fused {
JNA_FUSED_BWD_INSTANTIATE(DType::kF16, 256)
}  // namespace fused
}  // namespace jax_na
