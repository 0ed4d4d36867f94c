// FFI handlers jax_na_naive_fwd / jax_na_naive_bwd: fused-style attention on the naive kernels.
// See docs/ffi.md for operands, results and attributes.
#include <cuda_runtime_api.h>

#include "ffi/common.h"
#include "ffi/handlers.h"
#include "naive/naive.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_na {
namespace {

using namespace ffi_util;  // NOLINT

// Additional keys/values: both zero-element (absent, Na = 0) or [B, Na, Hkv, D] and [B, Na, Hkv, Dv].
ffi::Error decode_additional(const char* target, const ffi::AnyBuffer& add_k, const ffi::AnyBuffer& add_v,
                             int64_t B, int64_t Hkv, int64_t D, int64_t Dv, ffi::DataType dt, int64_t* Na) {
  *Na = 0;
  if (add_k.element_count() == 0 && add_v.element_count() == 0) return ffi::Error::Success();
  const auto kd = add_k.dimensions();
  if (kd.size() != 4)
    return invalid(target, "add_k has shape " + dims_str(kd) + "; expected [B, N_add, H_kv, D]");
  *Na = kd[1];
  if (auto e = check(target, "add_k", add_k, dt, {B, *Na, Hkv, D}); e.failure()) return e;
  if (auto e = check(target, "add_v", add_v, dt, {B, *Na, Hkv, Dv}); e.failure()) return e;
  return ffi::Error::Success();
}

// Shared decoding of q, k, v, add_k, add_v and the attributes.
struct Decoded {
  geo::Problem pr;
  DType dtype;
  ffi::DataType fdt;
  TokenTensor q;
  int64_t D = 0, Dv = 0;
};

ffi::Error decode(const char* target, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                  const ffi::AnyBuffer& v, const ffi::AnyBuffer& add_k, const ffi::AnyBuffer& add_v,
                  const WindowAttrs& attrs, Decoded* out) {
  if (auto e = element_type(target, "q", q, &out->dtype); e.failure()) return e;
  out->fdt = to_ffi(out->dtype);
  if (auto e = decode_tokens(target, "q", q, &out->q); e.failure()) return e;
  TokenTensor kt, vt;
  if (auto e = decode_tokens(target, "k", k, &kt); e.failure()) return e;
  if (auto e = decode_tokens(target, "v", v, &vt); e.failure()) return e;
  const TokenTensor& qt = out->q;
  out->D = qt.last;
  out->Dv = vt.last;
  const int64_t Hkv = kt.heads;
  if (auto e = check(target, "k", k, out->fdt, token_shape(qt.B, qt.S, Hkv, out->D)); e.failure()) return e;
  if (auto e = check(target, "v", v, out->fdt, token_shape(qt.B, qt.S, Hkv, out->Dv)); e.failure()) return e;
  if (auto e = make_problem(target, qt.B, qt.S, qt.heads, Hkv, attrs, &out->pr); e.failure()) return e;
  int64_t Na = 0;
  if (auto e = decode_additional(target, add_k, add_v, qt.B, Hkv, out->D, out->Dv, out->fdt, &Na); e.failure())
    return e;
  out->pr.Na = Na;
  return ffi::Error::Success();
}

ffi::Error NaiveFwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer add_k, ffi::AnyBuffer add_v, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace,
                    I64Span kernel_size, I64Span stride, I64Span dilation, I64Span is_causal, float scale) {
  constexpr const char* kT = "jax_na_naive_fwd";
  Decoded dc;
  if (auto e = decode(kT, q, k, v, add_k, add_v, {kernel_size, stride, dilation, is_causal}, &dc); e.failure())
    return e;
  const geo::Problem& pr = dc.pr;
  const TokenTensor& qt = dc.q;
  if (auto e = check(kT, "out", *out, dc.fdt, token_shape(qt.B, qt.S, qt.heads, dc.Dv)); e.failure()) return e;
  if (auto e = check(kT, "lse", *lse, ffi::DataType::F32, row_shape(qt.B, qt.S, qt.heads)); e.failure()) return e;
  const int64_t ncols = pr.W + pr.Na;
  if (auto e = check_workspace(kT, *workspace, pr.rows() * ncols); e.failure()) return e;

  if (auto e = poison(kT, stream, out, lse, workspace); e.failure()) return e;
  float* scores = static_cast<float*>(workspace->untyped_data());
  naive::PNArgs pn;
  pn.mode = naive::PNMode::kScore;
  pn.a = q.untyped_data();
  pn.b = k.untyped_data();
  pn.add_b = add_k.untyped_data();
  pn.E = dc.D;
  pn.ncols = ncols;
  pn.alpha = scale;
  pn.out = scores;
  pn.out_f32 = true;
  if (auto e = cuda_check(kT, "PN", naive::launch_pn(pr, dc.dtype, pn, stream)); e.failure()) return e;

  float* lse_ptr = static_cast<float*>(lse->untyped_data());
  if (auto e = cuda_check(kT, "softmax", naive::launch_softmax(pr, scores, ncols, lse_ptr, stream)); e.failure())
    return e;

  naive::NNArgs nn;
  nn.attn = scores;
  nn.attn_f32 = true;
  nn.ncols = ncols;
  nn.vals = v.untyped_data();
  nn.add_vals = add_v.untyped_data();
  nn.E = dc.Dv;
  nn.alpha = 1.f;
  nn.out = out->untyped_data();
  return cuda_check(kT, "NN", naive::launch_nn(pr, dc.dtype, nn, stream));
}

ffi::Error NaiveBwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer add_k, ffi::AnyBuffer add_v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                    ffi::AnyBuffer d_out, ffi::AnyBuffer d_lse, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    ffi::Result<ffi::AnyBuffer> d_add_k, ffi::Result<ffi::AnyBuffer> d_add_v,
                    ffi::Result<ffi::AnyBuffer> workspace, I64Span kernel_size, I64Span stride,
                    I64Span dilation, I64Span is_causal, float scale) {
  constexpr const char* kT = "jax_na_naive_bwd";
  Decoded dc;
  if (auto e = decode(kT, q, k, v, add_k, add_v, {kernel_size, stride, dilation, is_causal}, &dc); e.failure())
    return e;
  const geo::Problem& pr = dc.pr;
  const TokenTensor& qt = dc.q;
  const Dims rows = row_shape(qt.B, qt.S, qt.heads);
  const Dims o_shape = token_shape(qt.B, qt.S, qt.heads, dc.Dv);
  if (auto e = check(kT, "out", out, dc.fdt, o_shape); e.failure()) return e;
  if (auto e = check(kT, "d_out", d_out, dc.fdt, o_shape); e.failure()) return e;
  if (auto e = check(kT, "lse", lse, ffi::DataType::F32, rows); e.failure()) return e;
  if (auto e = check(kT, "d_lse", d_lse, ffi::DataType::F32, rows); e.failure()) return e;
  auto same = [&](const char* name, const ffi::AnyBuffer& res, const ffi::AnyBuffer& ref) {
    const auto d = ref.dimensions();
    return check(kT, name, res, dc.fdt, Dims(d.begin(), d.end()));
  };
  if (auto e = same("dq", *dq, q); e.failure()) return e;
  if (auto e = same("dk", *dk, k); e.failure()) return e;
  if (auto e = same("dv", *dv, v); e.failure()) return e;
  if (pr.Na > 0) {
    if (auto e = same("d_add_k", *d_add_k, add_k); e.failure()) return e;
    if (auto e = same("d_add_v", *d_add_v, add_v); e.failure()) return e;
  } else {  // absent: zero-element results (never written)
    if (d_add_k->element_count() != 0 || d_add_v->element_count() != 0)
      return invalid(kT, "d_add_k and d_add_v must be zero-element when add_k/add_v are absent");
  }
  const int64_t ncols = pr.W + pr.Na;
  const int64_t nrows = pr.rows();
  if (auto e = check_workspace(kT, *workspace, 2 * nrows * ncols + nrows); e.failure()) return e;

  if (auto e = poison(kT, stream, dq, dk, dv, d_add_k, d_add_v, workspace); e.failure()) return e;
  float* P = static_cast<float*>(workspace->untyped_data());
  float* dS = P + nrows * ncols;
  float* delta = dS + nrows * ncols;

  // P = exp(scale * q.k - lse) over the window and the additional keys.
  naive::PNArgs pn;
  pn.mode = naive::PNMode::kProb;
  pn.a = q.untyped_data();
  pn.b = k.untyped_data();
  pn.add_b = add_k.untyped_data();
  pn.E = dc.D;
  pn.ncols = ncols;
  pn.alpha = scale;
  pn.lse = static_cast<const float*>(lse.untyped_data());
  pn.out = P;
  if (auto e = cuda_check(kT, "PN (P)", naive::launch_pn(pr, dc.dtype, pn, stream)); e.failure()) return e;

  // delta = rowsum(dO * O) - d_lse.
  if (auto e = cuda_check(kT, "delta",
                          naive::launch_delta(pr, dc.dtype, d_out.untyped_data(), out.untyped_data(), dc.Dv,
                                              static_cast<const float*>(d_lse.untyped_data()), delta, stream));
      e.failure())
    return e;

  // dS = P * (dO . v - delta).
  pn.mode = naive::PNMode::kDS;
  pn.a = d_out.untyped_data();
  pn.b = v.untyped_data();
  pn.add_b = add_v.untyped_data();
  pn.E = dc.Dv;
  pn.alpha = 1.f;
  pn.lse = nullptr;
  pn.p = P;
  pn.delta = delta;
  pn.out = dS;
  if (auto e = cuda_check(kT, "PN (dS)", naive::launch_pn(pr, dc.dtype, pn, stream)); e.failure()) return e;

  // dq = scale * dS . k.
  naive::NNArgs nn;
  nn.attn = dS;
  nn.attn_f32 = true;
  nn.ncols = ncols;
  nn.vals = k.untyped_data();
  nn.add_vals = add_k.untyped_data();
  nn.E = dc.D;
  nn.alpha = scale;
  nn.out = dq->untyped_data();
  if (auto e = cuda_check(kT, "NN (dq)", naive::launch_nn(pr, dc.dtype, nn, stream)); e.failure()) return e;

  // dk = scale * dS^T . q and dv = P^T . dO over the inverse neighborhoods.
  naive::INArgs in;
  in.attn = dS;
  in.attn_f32 = true;
  in.ncols = ncols;
  in.vals = q.untyped_data();
  in.E = dc.D;
  in.alpha = scale;
  in.out = dk->untyped_data();
  if (auto e = cuda_check(kT, "IN (dk)", naive::launch_in(pr, dc.dtype, in, stream)); e.failure()) return e;
  in.attn = P;
  in.vals = d_out.untyped_data();
  in.E = dc.Dv;
  in.alpha = 1.f;
  in.out = dv->untyped_data();
  if (auto e = cuda_check(kT, "IN (dv)", naive::launch_in(pr, dc.dtype, in, stream)); e.failure()) return e;

  if (pr.Na > 0) {
    naive::AddReduceArgs ar;
    ar.attn = dS;
    ar.vals = q.untyped_data();
    ar.E = dc.D;
    ar.alpha = scale;
    ar.out = d_add_k->untyped_data();
    if (auto e = cuda_check(kT, "reduce (d_add_k)", naive::launch_add_reduce(pr, dc.dtype, ar, stream)); e.failure())
      return e;
    ar.attn = P;
    ar.vals = d_out.untyped_data();
    ar.E = dc.Dv;
    ar.alpha = 1.f;
    ar.out = d_add_v->untyped_data();
    if (auto e = cuda_check(kT, "reduce (d_add_v)", naive::launch_add_reduce(pr, dc.dtype, ar, stream)); e.failure())
      return e;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_na

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_na_naive_fwd, jax_na::NaiveFwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // add_k
                                  .Arg<ffi::AnyBuffer>()  // add_v
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Ret<ffi::AnyBuffer>()  // lse
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                      JNA_WINDOW_ATTRS.Attr<float>("scale"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_na_naive_bwd, jax_na::NaiveBwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // add_k
                                  .Arg<ffi::AnyBuffer>()  // add_v
                                  .Arg<ffi::AnyBuffer>()  // out
                                  .Arg<ffi::AnyBuffer>()  // lse
                                  .Arg<ffi::AnyBuffer>()  // d_out
                                  .Arg<ffi::AnyBuffer>()  // d_lse
                                  .Ret<ffi::AnyBuffer>()  // dq
                                  .Ret<ffi::AnyBuffer>()  // dk
                                  .Ret<ffi::AnyBuffer>()  // dv
                                  .Ret<ffi::AnyBuffer>()  // d_add_k
                                  .Ret<ffi::AnyBuffer>()  // d_add_v
                                  .Ret<ffi::AnyBuffer>()  // workspace
                                      JNA_WINDOW_ATTRS.Attr<float>("scale"),
                              {ffi::Traits::kCmdBufferCompatible});
