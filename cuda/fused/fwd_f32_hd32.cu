// Fused forward instantiations: float32 (3xTF32), head dim 32, ranks 1-3 (one file per (dtype, head dim) keeps
// each translation unit small and the build parallel).
#include "fused/launch_fwd.cuh"

namespace jax_na {
namespace fused {
JNA_FUSED_FWD_INSTANTIATE(DType::kF32, 32)
}  // namespace fused
}  // namespace jax_na
