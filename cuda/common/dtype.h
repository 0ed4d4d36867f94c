// Element types of the jax_na kernels (host-side, no CUDA headers).
#pragma once

namespace jax_na {

// Element type of q/k/v/outputs/gradients. Softmax, lse and accumulation are always float32.
enum class DType { kF32, kF16, kBF16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "float32";
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
  }
  return "?";
}

}  // namespace jax_na
