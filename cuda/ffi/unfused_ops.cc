// FFI handlers of the unfused ops, one set per kernel family with the same contract (docs/ffi.md):
// jax_na_naive_{qk,av,qk_bwd,av_bwd} (naive kernels) and jax_na_gemm_{qk,av,qk_bwd,av_bwd} (tensor-core
// implicit GEMMs, gemm/gemm_ops.h; calls those kernels do not take run the naive ones: float32, head
// dims other than 64/128, which the Python lowering pads smaller ones to).
#include <cuda_runtime_api.h>

#include "ffi/common.h"
#include "ffi/handlers.h"
#include "naive/naive.h"
#include "xla/ffi/api/ffi.h"
#if defined(JAX_NA_WITH_GEMM)
#include "gemm/gemm_ops.h"
#endif

namespace ffi = xla::ffi;

namespace jax_na {

// The naive kernels behind the unfused handlers.
struct NaiveKernels {
  static constexpr const char* kQK = "jax_na_naive_qk";
  static constexpr const char* kAV = "jax_na_naive_av";
  static constexpr const char* kQKBwd = "jax_na_naive_qk_bwd";
  static constexpr const char* kAVBwd = "jax_na_naive_av_bwd";
  static cudaError_t pn(const geo::Problem& pr, int, DType dt, const naive::PNArgs& a, cudaStream_t s) {
    return naive::launch_pn(pr, dt, a, s);
  }
  static cudaError_t nn(const geo::Problem& pr, int, DType dt, const naive::NNArgs& a, cudaStream_t s) {
    return naive::launch_nn(pr, dt, a, s);
  }
  static cudaError_t in(const geo::Problem& pr, int, DType dt, const naive::INArgs& a, cudaStream_t s) {
    return naive::launch_in(pr, dt, a, s);
  }
};

#if defined(JAX_NA_WITH_GEMM)
// The tensor-core kernels where they take the call, else the naive ones.
struct GemmKernels {
  static constexpr const char* kQK = "jax_na_gemm_qk";
  static constexpr const char* kAV = "jax_na_gemm_av";
  static constexpr const char* kQKBwd = "jax_na_gemm_qk_bwd";
  static constexpr const char* kAVBwd = "jax_na_gemm_av_bwd";
  static cudaError_t pn(const geo::Problem& pr, int rank, DType dt, const naive::PNArgs& a, cudaStream_t s) {
    return gemm::supports_pn(dt, rank, pr, a) ? gemm::launch_pn(pr, rank, dt, a, s) : naive::launch_pn(pr, dt, a, s);
  }
  static cudaError_t nn(const geo::Problem& pr, int rank, DType dt, const naive::NNArgs& a, cudaStream_t s) {
    return gemm::supports_nn(dt, rank, pr, a) ? gemm::launch_nn(pr, rank, dt, a, s) : naive::launch_nn(pr, dt, a, s);
  }
  static cudaError_t in(const geo::Problem& pr, int rank, DType dt, const naive::INArgs& a, cudaStream_t s) {
    return gemm::supports_in(dt, rank, pr, a) ? gemm::launch_in(pr, rank, dt, a, s) : naive::launch_in(pr, dt, a, s);
  }
};
#endif

namespace {

using namespace ffi_util;  // NOLINT

// The window-weight tensor [B, *S, H, W] (attn / d_attn) must have W = prod(kernel_size).
ffi::Error check_window_tensor(const char* target, const char* name, const ffi::AnyBuffer& buf,
                               ffi::DataType dt, const TokenTensor& ref, const geo::Problem& pr) {
  return check(target, name, buf, dt, token_shape(ref.B, ref.S, pr.H, pr.W));
}

// rpb / d_rpb: zero elements (absent) or [H, 2k_1-1, ...] of the call's dtype; needs stride 1.
ffi::Error check_rpb(const char* target, const char* name, const ffi::AnyBuffer& buf, ffi::DataType dt,
                     const geo::Problem& pr, size_t rank, bool* present) {
  *present = buf.element_count() != 0;
  if (!*present) return ffi::Error::Success();
  if (auto e = check(target, name, buf, dt, rpb_shape(pr, rank)); e.failure()) return e;
  if (!unit_stride(pr)) return invalid(target, std::string(name) + " requires stride 1 on every axis");
  return ffi::Error::Success();
}

template <class K>
ffi::Error UnfusedQK(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer rpb,
                   ffi::Result<ffi::AnyBuffer> attn, I64Span kernel_size, I64Span stride, I64Span dilation,
                   I64Span is_causal, float scale) {
  const char* const kT = K::kQK;
  DType dtype;
  if (auto e = element_type(kT, "q", q, &dtype); e.failure()) return e;
  const ffi::DataType fdt = to_ffi(dtype);
  TokenTensor qt, kt;
  if (auto e = decode_tokens(kT, "q", q, &qt); e.failure()) return e;
  if (auto e = decode_tokens(kT, "k", k, &kt); e.failure()) return e;
  if (auto e = check(kT, "k", k, fdt, token_shape(qt.B, qt.S, kt.heads, qt.last)); e.failure()) return e;
  geo::Problem pr;
  const int rank = static_cast<int>(qt.S.size());
  if (auto e = make_problem(kT, qt.B, qt.S, qt.heads, kt.heads, {kernel_size, stride, dilation, is_causal}, &pr);
      e.failure())
    return e;
  bool has_rpb = false;
  if (auto e = check_rpb(kT, "rpb", rpb, fdt, pr, qt.S.size(), &has_rpb); e.failure()) return e;
  // Scores in the call's dtype, or float32 (what na*d's composite on these ops asks for).
  const bool f32_scores = attn->element_type() == ffi::DataType::F32;
  if (auto e = check_window_tensor(kT, "attn", *attn, f32_scores ? ffi::DataType::F32 : fdt, qt, pr); e.failure())
    return e;

  if (auto e = poison(kT, stream, attn); e.failure()) return e;
  naive::PNArgs pn;
  pn.mode = naive::PNMode::kScore;
  pn.a = q.untyped_data();
  pn.b = k.untyped_data();
  pn.E = qt.last;
  pn.ncols = pr.W;
  pn.alpha = scale;
  pn.rpb = has_rpb ? rpb.untyped_data() : nullptr;
  pn.out = attn->untyped_data();
  pn.out_f32 = f32_scores;
  return cuda_check(kT, "PN", K::pn(pr, rank, dtype, pn, stream));
}

template <class K>
ffi::Error UnfusedAV(cudaStream_t stream, ffi::AnyBuffer attn, ffi::AnyBuffer v, ffi::Result<ffi::AnyBuffer> out,
                   I64Span kernel_size, I64Span stride, I64Span dilation, I64Span is_causal) {
  const char* const kT = K::kAV;
  DType dtype;
  if (auto e = element_type(kT, "attn", attn, &dtype); e.failure()) return e;
  const ffi::DataType fdt = to_ffi(dtype);
  TokenTensor at, vt;
  if (auto e = decode_tokens(kT, "attn", attn, &at); e.failure()) return e;
  if (auto e = decode_tokens(kT, "v", v, &vt); e.failure()) return e;
  if (auto e = check(kT, "v", v, fdt, token_shape(at.B, at.S, vt.heads, vt.last)); e.failure()) return e;
  geo::Problem pr;
  const int rank = static_cast<int>(at.S.size());
  if (auto e = make_problem(kT, at.B, at.S, at.heads, vt.heads, {kernel_size, stride, dilation, is_causal}, &pr);
      e.failure())
    return e;
  if (auto e = check_window_tensor(kT, "attn", attn, fdt, at, pr); e.failure()) return e;
  if (auto e = check(kT, "out", *out, fdt, token_shape(at.B, at.S, at.heads, vt.last)); e.failure()) return e;

  if (auto e = poison(kT, stream, out); e.failure()) return e;
  naive::NNArgs nn;
  nn.attn = attn.untyped_data();
  nn.attn_f32 = false;
  nn.ncols = pr.W;
  nn.vals = v.untyped_data();
  nn.E = vt.last;
  nn.alpha = 1.f;
  nn.out = out->untyped_data();
  return cuda_check(kT, "NN", K::nn(pr, rank, dtype, nn, stream));
}

template <class K>
ffi::Error UnfusedQKBwd(cudaStream_t stream, ffi::AnyBuffer d_attn, ffi::AnyBuffer q, ffi::AnyBuffer k,
                      ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk,
                      ffi::Result<ffi::AnyBuffer> d_rpb, I64Span kernel_size, I64Span stride,
                      I64Span dilation, I64Span is_causal, float scale) {
  const char* const kT = K::kQKBwd;
  DType dtype;
  if (auto e = element_type(kT, "d_attn", d_attn, &dtype); e.failure()) return e;
  const ffi::DataType fdt = to_ffi(dtype);
  TokenTensor qt, kt;
  if (auto e = decode_tokens(kT, "q", q, &qt); e.failure()) return e;
  if (auto e = decode_tokens(kT, "k", k, &kt); e.failure()) return e;
  if (auto e = check_dtype(kT, "q", q, fdt); e.failure()) return e;
  if (auto e = check(kT, "k", k, fdt, token_shape(qt.B, qt.S, kt.heads, qt.last)); e.failure()) return e;
  geo::Problem pr;
  const int rank = static_cast<int>(qt.S.size());
  if (auto e = make_problem(kT, qt.B, qt.S, qt.heads, kt.heads, {kernel_size, stride, dilation, is_causal}, &pr);
      e.failure())
    return e;
  if (auto e = check_window_tensor(kT, "d_attn", d_attn, fdt, qt, pr); e.failure()) return e;
  if (auto e = check(kT, "dq", *dq, fdt, token_shape(qt.B, qt.S, qt.heads, qt.last)); e.failure()) return e;
  if (auto e = check(kT, "dk", *dk, fdt, token_shape(qt.B, qt.S, kt.heads, qt.last)); e.failure()) return e;
  bool has_rpb = false;
  if (auto e = check_rpb(kT, "d_rpb", *d_rpb, fdt, pr, qt.S.size(), &has_rpb); e.failure()) return e;

  if (auto e = poison(kT, stream, dq, dk, d_rpb); e.failure()) return e;
  naive::NNArgs nn;
  nn.attn = d_attn.untyped_data();
  nn.attn_f32 = false;
  nn.ncols = pr.W;
  nn.vals = k.untyped_data();
  nn.E = qt.last;
  nn.alpha = scale;
  nn.out = dq->untyped_data();
  if (auto e = cuda_check(kT, "NN (dq)", K::nn(pr, rank, dtype, nn, stream)); e.failure()) return e;

  naive::INArgs in;
  in.attn = d_attn.untyped_data();
  in.attn_f32 = false;
  in.ncols = pr.W;
  in.vals = q.untyped_data();
  in.E = qt.last;
  in.alpha = scale;
  in.out = dk->untyped_data();
  if (auto e = cuda_check(kT, "IN (dk)", K::in(pr, rank, dtype, in, stream)); e.failure()) return e;

  if (!has_rpb) return ffi::Error::Success();
  return cuda_check(kT, "rpb gradient",
                    naive::launch_rpb_grad(pr, dtype, d_attn.untyped_data(), d_rpb->untyped_data(), stream));
}

template <class K>
ffi::Error UnfusedAVBwd(cudaStream_t stream, ffi::AnyBuffer d_out, ffi::AnyBuffer attn, ffi::AnyBuffer v,
                      ffi::Result<ffi::AnyBuffer> d_attn, ffi::Result<ffi::AnyBuffer> dv,
                      I64Span kernel_size, I64Span stride, I64Span dilation, I64Span is_causal) {
  const char* const kT = K::kAVBwd;
  DType dtype;
  if (auto e = element_type(kT, "d_out", d_out, &dtype); e.failure()) return e;
  const ffi::DataType fdt = to_ffi(dtype);
  TokenTensor ot, vt;
  if (auto e = decode_tokens(kT, "d_out", d_out, &ot); e.failure()) return e;
  if (auto e = decode_tokens(kT, "v", v, &vt); e.failure()) return e;
  if (auto e = check(kT, "v", v, fdt, token_shape(ot.B, ot.S, vt.heads, ot.last)); e.failure()) return e;
  geo::Problem pr;
  const int rank = static_cast<int>(ot.S.size());
  if (auto e = make_problem(kT, ot.B, ot.S, ot.heads, vt.heads, {kernel_size, stride, dilation, is_causal}, &pr);
      e.failure())
    return e;
  if (auto e = check_window_tensor(kT, "attn", attn, fdt, ot, pr); e.failure()) return e;
  if (auto e = check_window_tensor(kT, "d_attn", *d_attn, fdt, ot, pr); e.failure()) return e;
  if (auto e = check(kT, "dv", *dv, fdt, token_shape(ot.B, ot.S, vt.heads, ot.last)); e.failure()) return e;

  // d_attn = d_out . v over the window (0 at masked entries).
  if (auto e = poison(kT, stream, d_attn, dv); e.failure()) return e;
  naive::PNArgs pn;
  pn.mode = naive::PNMode::kRaw;
  pn.a = d_out.untyped_data();
  pn.b = v.untyped_data();
  pn.E = ot.last;
  pn.ncols = pr.W;
  pn.out = d_attn->untyped_data();
  pn.out_f32 = false;
  if (auto e = cuda_check(kT, "PN (d_attn)", K::pn(pr, rank, dtype, pn, stream)); e.failure()) return e;

  // dv = attn^T . d_out over the inverse neighborhoods.
  naive::INArgs in;
  in.attn = attn.untyped_data();
  in.attn_f32 = false;
  in.ncols = pr.W;
  in.vals = d_out.untyped_data();
  in.E = ot.last;
  in.alpha = 1.f;
  in.out = dv->untyped_data();
  return cuda_check(kT, "IN (dv)", K::in(pr, rank, dtype, in, stream));
}

}  // namespace
}  // namespace jax_na

// One binding per op, shared by the kernel families.
#define JNA_QK_BINDING                                  \
  ffi::Ffi::Bind()                                      \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()         \
      .Arg<ffi::AnyBuffer>() /* q */                    \
      .Arg<ffi::AnyBuffer>() /* k */                    \
      .Arg<ffi::AnyBuffer>() /* rpb ([0]: none) */      \
      .Ret<ffi::AnyBuffer>() /* attn */                 \
          JNA_WINDOW_ATTRS.Attr<float>("scale")
#define JNA_AV_BINDING                                  \
  ffi::Ffi::Bind()                                      \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()         \
      .Arg<ffi::AnyBuffer>() /* attn */                 \
      .Arg<ffi::AnyBuffer>() /* v */                    \
      .Ret<ffi::AnyBuffer>() /* out */                  \
          JNA_WINDOW_ATTRS
#define JNA_QK_BWD_BINDING                              \
  ffi::Ffi::Bind()                                      \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()         \
      .Arg<ffi::AnyBuffer>() /* d_attn */               \
      .Arg<ffi::AnyBuffer>() /* q */                    \
      .Arg<ffi::AnyBuffer>() /* k */                    \
      .Ret<ffi::AnyBuffer>() /* dq */                   \
      .Ret<ffi::AnyBuffer>() /* dk */                   \
      .Ret<ffi::AnyBuffer>() /* d_rpb ([0]: none) */    \
          JNA_WINDOW_ATTRS.Attr<float>("scale")
#define JNA_AV_BWD_BINDING                              \
  ffi::Ffi::Bind()                                      \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()         \
      .Arg<ffi::AnyBuffer>() /* d_out */                \
      .Arg<ffi::AnyBuffer>() /* attn */                 \
      .Arg<ffi::AnyBuffer>() /* v */                    \
      .Ret<ffi::AnyBuffer>() /* d_attn */               \
      .Ret<ffi::AnyBuffer>() /* dv */                   \
          JNA_WINDOW_ATTRS

#define JNA_UNFUSED_HANDLERS(FAMILY, KERNELS)                                                                    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_na_##FAMILY##_qk, jax_na::UnfusedQK<KERNELS>, JNA_QK_BINDING,               \
                                {ffi::Traits::kCmdBufferCompatible});                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_na_##FAMILY##_av, jax_na::UnfusedAV<KERNELS>, JNA_AV_BINDING,               \
                                {ffi::Traits::kCmdBufferCompatible});                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_na_##FAMILY##_qk_bwd, jax_na::UnfusedQKBwd<KERNELS>, JNA_QK_BWD_BINDING,    \
                                {ffi::Traits::kCmdBufferCompatible});                                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_na_##FAMILY##_av_bwd, jax_na::UnfusedAVBwd<KERNELS>, JNA_AV_BWD_BINDING,    \
                                {ffi::Traits::kCmdBufferCompatible});

JNA_UNFUSED_HANDLERS(naive, jax_na::NaiveKernels)
#if defined(JAX_NA_WITH_GEMM)
JNA_UNFUSED_HANDLERS(gemm, jax_na::GemmKernels)
#endif
