// Shared decoding and validation for the jax_na FFI handlers: shapes, dtypes, window attributes.
// Every check returns an ffi::Error naming the target and the offending operand; handlers never crash
// on bad input.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "geometry/window.cuh"
#include "xla/ffi/api/ffi.h"

namespace jax_na {
namespace ffi_util {

namespace ffi = xla::ffi;
using Dims = std::vector<int64_t>;
using I64Span = ffi::Span<const int64_t>;

inline std::string dims_str(const int64_t* d, size_t n) {
  std::string s = "[";
  for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}
inline std::string dims_str(ffi::AnyBuffer::Dimensions d) { return dims_str(d.begin(), d.size()); }
inline std::string dims_str(const Dims& d) { return dims_str(d.data(), d.size()); }

inline ffi::Error invalid(const char* target, const std::string& msg) {
  return ffi::Error::InvalidArgument(std::string(target) + ": " + msg);
}

inline ffi::Error cuda_check(const char* target, const char* what, cudaError_t status) {
  if (status == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(target) + ": launching " + what + " failed: " +
                              cudaGetErrorName(status) + " (" + cudaGetErrorString(status) + ")");
}

inline const char* ffi_dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S32: return "int32";
    default: return "an unsupported type";
  }
}

// Element type of the call (from its first operand): F32, F16 or BF16.
inline ffi::Error element_type(const char* target, const char* name, const ffi::AnyBuffer& buf,
                               DType* out) {
  switch (buf.element_type()) {
    case ffi::DataType::F32: *out = DType::kF32; return ffi::Error::Success();
    case ffi::DataType::F16: *out = DType::kF16; return ffi::Error::Success();
    case ffi::DataType::BF16: *out = DType::kBF16; return ffi::Error::Success();
    default: break;
  }
  return invalid(target, std::string(name) + " has element type " + ffi_dtype_name(buf.element_type()) +
                             "; the CUDA kernels support float32, float16 and bfloat16");
}

inline ffi::DataType to_ffi(DType t) {
  switch (t) {
    case DType::kF16: return ffi::DataType::F16;
    case DType::kBF16: return ffi::DataType::BF16;
    case DType::kF32: break;
  }
  return ffi::DataType::F32;
}

inline ffi::Error check_dtype(const char* target, const char* name, const ffi::AnyBuffer& buf,
                              ffi::DataType expected) {
  if (buf.element_type() == expected) return ffi::Error::Success();
  return invalid(target, std::string(name) + " has element type " + ffi_dtype_name(buf.element_type()) +
                             " but " + ffi_dtype_name(expected) + " was expected");
}

inline ffi::Error check_dims(const char* target, const char* name, const ffi::AnyBuffer& buf,
                             const Dims& expected) {
  const auto d = buf.dimensions();
  bool ok = d.size() == expected.size();
  for (size_t i = 0; ok && i < expected.size(); ++i) ok = d[i] == expected[i];
  if (ok) return ffi::Error::Success();
  return invalid(target, std::string(name) + " has shape " + dims_str(d) + " but " + dims_str(expected) +
                             " was expected");
}

inline ffi::Error check(const char* target, const char* name, const ffi::AnyBuffer& buf,
                        ffi::DataType dtype, const Dims& expected) {
  if (auto e = check_dtype(target, name, buf, dtype); e.failure()) return e;
  return check_dims(target, name, buf, expected);
}

// Same element type and shape as `like` (a gradient of an operand).
inline ffi::Error check_like(const char* target, const char* name, const ffi::AnyBuffer& buf,
                             const ffi::AnyBuffer& like) {
  const auto d = like.dimensions();
  return check(target, name, buf, like.element_type(), Dims(d.begin(), d.end()));
}

// A float32 workspace with at least `needed` elements.
inline ffi::Error check_workspace(const char* target, const ffi::AnyBuffer& buf, int64_t needed) {
  if (auto e = check_dtype(target, "workspace", buf, ffi::DataType::F32); e.failure()) return e;
  if (static_cast<int64_t>(buf.element_count()) >= needed) return ffi::Error::Success();
  return invalid(target, "workspace has " + std::to_string(buf.element_count()) + " elements but " +
                             std::to_string(needed) + " are needed");
}

// [B, *S, heads, last] as a shape.
inline Dims token_shape(int64_t B, const Dims& S, int64_t heads, int64_t last) {
  Dims d{B};
  d.insert(d.end(), S.begin(), S.end());
  d.push_back(heads);
  d.push_back(last);
  return d;
}
inline Dims row_shape(int64_t B, const Dims& S, int64_t heads) {
  Dims d{B};
  d.insert(d.end(), S.begin(), S.end());
  d.push_back(heads);
  return d;
}

// The layout of a [B, *S, heads, last] operand (rank 4..6).
struct TokenTensor {
  int64_t B = 0;
  Dims S;
  int64_t heads = 0;
  int64_t last = 0;
};

inline ffi::Error decode_tokens(const char* target, const char* name, const ffi::AnyBuffer& buf,
                                TokenTensor* out) {
  const auto d = buf.dimensions();
  if (d.size() < 4 || d.size() > 6)
    return invalid(target, std::string(name) + " has shape " + dims_str(d) +
                               "; expected [B, *spatial, heads, dim] with 1 to 3 spatial axes");
  out->B = d[0];
  out->S.assign(d.begin() + 1, d.end() - 2);
  out->heads = d[d.size() - 2];
  out->last = d[d.size() - 1];
  return ffi::Error::Success();
}

// Window attributes, one entry per spatial axis.
struct WindowAttrs {
  I64Span kernel_size, stride, dilation, is_causal;
};

// Builds the 3-axis problem and validates the window attributes against the spatial shape.
inline ffi::Error make_problem(const char* target, int64_t B, const Dims& S, int64_t H, int64_t Hkv,
                               const WindowAttrs& w, geo::Problem* pr) {
  const size_t r = S.size();
  constexpr int64_t kI32 = std::numeric_limits<int32_t>::max();
  if (r < 1 || r > 3) return invalid(target, "expected 1 to 3 spatial axes, got " + std::to_string(r));
  const I64Span* attrs[] = {&w.kernel_size, &w.stride, &w.dilation, &w.is_causal};
  const char* names[] = {"kernel_size", "stride", "dilation", "is_causal"};
  for (int i = 0; i < 4; ++i)
    if (attrs[i]->size() != r)
      return invalid(target, std::string(names[i]) + " has " + std::to_string(attrs[i]->size()) +
                                 " entries but the inputs have " + std::to_string(r) + " spatial axes");
  if (B < 0) return invalid(target, "negative batch size");
  if (H < 1 || H > kI32 || Hkv < 1 || Hkv > kI32 || H % Hkv != 0)
    return invalid(target, "query heads (" + std::to_string(H) + ") must be a positive multiple of kv heads (" +
                               std::to_string(Hkv) + ")");
  geo::Problem p;
  p.B = B;
  p.H = static_cast<int32_t>(H);
  p.Hkv = static_cast<int32_t>(Hkv);
  p.N = 1;
  p.W = 1;
  for (size_t a = 0; a < r; ++a) {
    const int64_t L = S[a], k = w.kernel_size[a], s = w.stride[a], d = w.dilation[a], c = w.is_causal[a];
    const std::string ax = " on axis " + std::to_string(a);
    if (L < 1 || L > kI32) return invalid(target, "spatial length " + std::to_string(L) + ax + " is out of range");
    if (k < 1 || k > L) return invalid(target, "kernel_size " + std::to_string(k) + ax + " must be in [1, " + std::to_string(L) + "]");
    if (d < 1 || d > L) return invalid(target, "dilation " + std::to_string(d) + ax + " must be >= 1");
    if (k * d > L)
      return invalid(target, "kernel_size * dilation = " + std::to_string(k * d) + ax +
                                 " exceeds the axis length " + std::to_string(L));
    if (s < 1 || s > k) return invalid(target, "stride " + std::to_string(s) + ax + " must be in [1, kernel_size=" + std::to_string(k) + "]");
    if (c != 0 && c != 1) return invalid(target, "is_causal" + ax + " must be 0 or 1, got " + std::to_string(c));
    p.axis[a].L = static_cast<int32_t>(L);
    p.axis[a].k = static_cast<int32_t>(k);
    p.axis[a].s = static_cast<int32_t>(s);
    p.axis[a].d = static_cast<int32_t>(d);
    p.axis[a].causal = static_cast<int32_t>(c);
    p.N *= L;
    p.W *= k;
  }
  *pr = p;
  return ffi::Error::Success();
}

// Test aid: with JAX_NA_POISON_OUTPUTS=1 in the environment every result is filled with 0xFF bytes
// (NaN in float32/float16/bfloat16) before the kernels run, so an element that a kernel forgets to
// write fails the comparison instead of passing on whatever memory held.
inline bool poison_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("JAX_NA_POISON_OUTPUTS");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

template <typename... Results>
inline ffi::Error poison(const char* target, cudaStream_t stream, Results&... results) {
  if (!poison_enabled()) return ffi::Error::Success();
  cudaError_t status = cudaSuccess;
  auto fill = [&](auto& r) {
    if (status == cudaSuccess && r->size_bytes() > 0)
      status = cudaMemsetAsync(r->untyped_data(), 0xFF, r->size_bytes(), stream);
  };
  (fill(results), ...);
  return cuda_check(target, "the output poisoning memset", status);
}

inline bool unit_stride(const geo::Problem& pr) {
  return pr.axis[0].s == 1 && pr.axis[1].s == 1 && pr.axis[2].s == 1;
}

// rpb / d_rpb shape [H, 2k_1-1, ..., 2k_r-1].
inline Dims rpb_shape(const geo::Problem& pr, size_t rank) {
  Dims d{pr.H};
  for (size_t a = 0; a < rank; ++a) d.push_back(2 * int64_t{pr.axis[a].k} - 1);
  return d;
}

}  // namespace ffi_util
}  // namespace jax_na

// The window attributes of every handler binding (after the operands and results).
#define JNA_WINDOW_ATTRS                                                                      \
  .Attr<jax_na::ffi_util::I64Span>("kernel_size").Attr<jax_na::ffi_util::I64Span>("stride") \
      .Attr<jax_na::ffi_util::I64Span>("dilation").Attr<jax_na::ffi_util::I64Span>("is_causal")
