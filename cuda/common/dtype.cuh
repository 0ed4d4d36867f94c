// Device-side element type helpers: float32 conversions and dispatch from DType to a C++ type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <utility>

#include "common/dtype.h"

namespace jax_na {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct FromF32;
template <>
struct FromF32<float> {
  __device__ __forceinline__ static float apply(float x) { return x; }
};
template <>
struct FromF32<__half> {
  __device__ __forceinline__ static __half apply(float x) { return __float2half_rn(x); }
};
template <>
struct FromF32<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 apply(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
__device__ __forceinline__ T from_f32(float x) {
  return FromF32<T>::apply(x);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the C++ element type of t.
template <typename F>
auto dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kF16: return f(TypeTag<__half>{});
    case DType::kBF16: return f(TypeTag<__nv_bfloat16>{});
    case DType::kF32: break;
  }
  return f(TypeTag<float>{});
}

}  // namespace jax_na
