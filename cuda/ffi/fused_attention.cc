// FFI handlers jax_na_fused_fwd / jax_na_fused_bwd: fused neighborhood attention (cuda/fused/: the
// portable sm80-class kernels, and a Hopper sm_90a forward). Attributes kernel_size, stride, dilation,
// is_causal (i64 arrays, one entry per spatial axis) and scale (f32); both take arch (i64: 0 picks the
// Hopper kernels on sm_90 devices, 80 the portable ones, 90 the Hopper ones) and tiles_sm80 /
// tiles_sm90 (i64: the tile configuration of each kernel set, an index into fused::fwd_tile_configs
// or fused::bwd_tile_configs; -1 where that set must not run), the backward also deterministic (i64:
// 0 lets the Hopper backward add dQ into the workspace). See docs/ffi.md.
//   fwd: q, k, v, add_k, add_v -> out, lse, workspace (int32 [1]: zeroed here, the tile counter of the
//        persistent Hopper forward)
//   bwd: q, k, v, add_k, add_v, out, lse, d_out, d_lse -> dq, dk, dv, d_add_k, d_add_v, workspace
//        (float32 [B * N * H]: delta; deterministic 0: [B * N * H * (D + 1)], dQ accumulators then delta)
#include <cuda_runtime_api.h>

#include <string>

#include "ffi/common.h"
#include "ffi/handlers.h"
#include "fused/fused_bwd.h"
#include "fused/fused_fwd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jax_na {
namespace {

using namespace ffi_util;  // NOLINT

// What both directions decode: the problem, dtype and head dim, with the fused kernels' limits.
struct FusedCall {
  geo::Problem pr;
  DType dtype;
  ffi::DataType fdt;
  TokenTensor q;
  int64_t D = 0;
  int rank = 0;
};

ffi::Error decode_fused(const char* kT, int64_t arch, const ffi::AnyBuffer& q, const ffi::AnyBuffer& k,
                        const ffi::AnyBuffer& v, const ffi::AnyBuffer& add_k, const ffi::AnyBuffer& add_v,
                        const WindowAttrs& attrs, FusedCall* c) {
  if (auto e = element_type(kT, "q", q, &c->dtype); e.failure()) return e;
  if (c->dtype == DType::kF32 && arch == fused::FwdArgs::kHopper)
    return invalid(kT, "q has element type float32; the Hopper kernels (arch=90) support float16 and bfloat16 "
                       "(float32 runs on the portable ones: arch 0 or 80)");
  c->fdt = to_ffi(c->dtype);
  TokenTensor kt, vt;
  if (auto e = decode_tokens(kT, "q", q, &c->q); e.failure()) return e;
  if (auto e = decode_tokens(kT, "k", k, &kt); e.failure()) return e;
  if (auto e = decode_tokens(kT, "v", v, &vt); e.failure()) return e;
  const TokenTensor& qt = c->q;
  const int64_t D = qt.last, Dv = vt.last, Hkv = kt.heads;
  c->D = D;
  if (Dv != D)
    return invalid(kT, "v has head dim " + std::to_string(Dv) + " but q has " + std::to_string(D) +
                           "; the fused kernels need D_v == D (use the naive or reference backend)");
  if (D != 32 && D != 64 && D != 128 && D != 256)
    return invalid(kT, "head dim " + std::to_string(D) +
                           " is not supported by the fused kernels (32, 64, 128 or 256; use the naive or reference "
                           "backend)");
  if (arch == fused::FwdArgs::kHopper && !fused::hopper_supported(c->dtype, D))
    return invalid(kT, "head dim " + std::to_string(D) +
                           " has no Hopper kernel (arch=90: 64 or 128; head dims 32 and 256 run on the portable "
                           "kernels: arch 0 or 80)");
  if (auto e = check(kT, "k", k, c->fdt, token_shape(qt.B, qt.S, Hkv, D)); e.failure()) return e;
  if (auto e = check(kT, "v", v, c->fdt, token_shape(qt.B, qt.S, Hkv, Dv)); e.failure()) return e;
  if (auto e = make_problem(kT, qt.B, qt.S, qt.heads, Hkv, attrs, &c->pr); e.failure()) return e;
  // Additional keys/values: both zero-element (absent) or [B, Na, Hkv, D].
  c->pr.Na = 0;
  if (add_k.element_count() != 0 || add_v.element_count() != 0) {
    const auto kd = add_k.dimensions();
    if (kd.size() != 4) return invalid(kT, "add_k has shape " + dims_str(kd) + "; expected [B, N_add, H_kv, D]");
    c->pr.Na = kd[1];
    if (auto e = check(kT, "add_k", add_k, c->fdt, {qt.B, c->pr.Na, Hkv, D}); e.failure()) return e;
    if (auto e = check(kT, "add_v", add_v, c->fdt, {qt.B, c->pr.Na, Hkv, Dv}); e.failure()) return e;
  }
  if (qt.B > 65535 || qt.heads > 65535)
    return invalid(kT, "batch (" + std::to_string(qt.B) + ") and query heads (" + std::to_string(qt.heads) +
                           ") must each be at most 65535 for the fused kernels");
  c->rank = static_cast<int>(qt.S.size());
  if (!fused::fwd_supported(c->dtype, D, c->rank))
    return invalid(kT, std::string("no fused kernel for ") + dtype_name(c->dtype) + ", head dim " +
                           std::to_string(D) + ", rank " + std::to_string(c->rank));
  return ffi::Error::Success();
}

// arch: 0 (auto), 80 (the portable kernels) or 90 (the Hopper kernels, where they can run).
ffi::Error check_arch(const char* kT, int64_t arch) {
  if (arch != fused::FwdArgs::kAuto && arch != fused::FwdArgs::kPortable && arch != fused::FwdArgs::kHopper)
    return invalid(kT, "arch must be 0 (auto), 80 (portable kernel) or 90 (Hopper kernel), got " +
                           std::to_string(arch));
  if (arch == fused::FwdArgs::kHopper && !fused::sm90_available())
    return invalid(kT, "arch=90 asks for the Hopper kernels, which need a compute capability 9.0 "
                       "GPU and a build with 90a in JAX_NA_CUDA_ARCHS");
  return ffi::Error::Success();
}

// tiles_sm80 / tiles_sm90: indices into the tile configurations of each kernel set (`configs`:
// fused::fwd_tile_configs, or fused::bwd_tile_configs of the call's mode); 0 (the default) always
// passes, -1 means that set has no configuration with the shapes asked for (the other set must run:
// arch says which).
template <class TileConfigsFn>
ffi::Error check_tiles(const char* kT, TileConfigsFn configs, const FusedCall& c, int64_t arch, int64_t tiles_sm80,
                       int64_t tiles_sm90) {
  const int64_t idx[2] = {tiles_sm80, tiles_sm90};
  const int archs[2] = {fused::FwdArgs::kPortable, fused::FwdArgs::kHopper};
  const char* names[2] = {"tiles_sm80", "tiles_sm90"};
  for (int i = 0; i < 2; ++i) {
    const int n = configs(archs[i], c.dtype, c.D, c.rank, nullptr, 0);
    if (idx[i] < -1 || (idx[i] > 0 && idx[i] >= n))
      return invalid(kT, std::string(names[i]) + " must be -1, 0 or a tile configuration index below " +
                             std::to_string(n) + " for " + dtype_name(c.dtype) + ", head dim " + std::to_string(c.D) +
                             ", rank " + std::to_string(c.rank) + "; got " + std::to_string(idx[i]));
  }
  if ((arch == fused::FwdArgs::kHopper && tiles_sm90 < 0) || (arch != fused::FwdArgs::kHopper && tiles_sm80 < 0))
    return invalid(kT, "arch=" + std::to_string(arch) + " may run a kernel set whose tile index is -1 (tiles_sm80=" +
                           std::to_string(tiles_sm80) + ", tiles_sm90=" + std::to_string(tiles_sm90) +
                           "): a tile configuration only one set has needs that set's arch (80 or 90)");
  return ffi::Error::Success();
}

ffi::Error FusedFwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer add_k, ffi::AnyBuffer add_v, ffi::Result<ffi::AnyBuffer> out,
                    ffi::Result<ffi::AnyBuffer> lse, ffi::Result<ffi::AnyBuffer> workspace, I64Span kernel_size,
                    I64Span stride, I64Span dilation, I64Span is_causal, float scale, int64_t arch,
                    int64_t tiles_sm80, int64_t tiles_sm90) {
  constexpr const char* kT = "jax_na_fused_fwd";
  if (auto e = check_arch(kT, arch); e.failure()) return e;
  FusedCall c;
  if (auto e = decode_fused(kT, arch, q, k, v, add_k, add_v, {kernel_size, stride, dilation, is_causal}, &c);
      e.failure())
    return e;
  if (auto e = check_tiles(kT, fused::fwd_tile_configs, c, arch, tiles_sm80, tiles_sm90); e.failure()) return e;
  const TokenTensor& qt = c.q;
  if (auto e = check(kT, "out", *out, c.fdt, token_shape(qt.B, qt.S, qt.heads, c.D)); e.failure()) return e;
  if (auto e = check(kT, "lse", *lse, ffi::DataType::F32, row_shape(qt.B, qt.S, qt.heads)); e.failure()) return e;
  if (auto e = check(kT, "workspace", *workspace, ffi::DataType::S32, {1}); e.failure()) return e;

  if (auto e = poison(kT, stream, out, lse); e.failure()) return e;
  // The persistent Hopper forward's CTAs draw their Q tiles from this counter (FwdArgs::tile_counter).
  if (auto e = cuda_check(kT, "zeroing the tile counter",
                          cudaMemsetAsync(workspace->untyped_data(), 0, sizeof(int32_t), stream));
      e.failure())
    return e;
  fused::FwdArgs args;
  args.q = q.untyped_data();
  args.k = k.untyped_data();
  args.v = v.untyped_data();
  args.add_k = add_k.untyped_data();
  args.add_v = add_v.untyped_data();
  args.out = out->untyped_data();
  args.lse = static_cast<float*>(lse->untyped_data());
  args.D = static_cast<int32_t>(c.D);
  args.scale = scale;
  args.arch = static_cast<int32_t>(arch);
  args.tiles_sm80 = static_cast<int32_t>(tiles_sm80);
  args.tiles_sm90 = static_cast<int32_t>(tiles_sm90);
  args.tile_counter = static_cast<int32_t*>(workspace->untyped_data());
  return cuda_check(kT, "the fused forward kernel", fused::launch_fwd(c.pr, c.rank, c.dtype, args, stream));
}

ffi::Error FusedBwd(cudaStream_t stream, ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                    ffi::AnyBuffer add_k, ffi::AnyBuffer add_v, ffi::AnyBuffer out, ffi::AnyBuffer lse,
                    ffi::AnyBuffer d_out, ffi::AnyBuffer d_lse, ffi::Result<ffi::AnyBuffer> dq,
                    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                    ffi::Result<ffi::AnyBuffer> d_add_k, ffi::Result<ffi::AnyBuffer> d_add_v,
                    ffi::Result<ffi::AnyBuffer> workspace, I64Span kernel_size, I64Span stride, I64Span dilation,
                    I64Span is_causal, float scale, int64_t arch, int64_t tiles_sm80, int64_t tiles_sm90,
                    int64_t deterministic) {
  constexpr const char* kT = "jax_na_fused_bwd";
  if (auto e = check_arch(kT, arch); e.failure()) return e;
  if (deterministic != 0 && deterministic != 1)
    return invalid(kT, "deterministic is " + std::to_string(deterministic) + "; allowed: 0 or 1");
  FusedCall c;
  if (auto e = decode_fused(kT, arch, q, k, v, add_k, add_v, {kernel_size, stride, dilation, is_causal}, &c);
      e.failure())
    return e;
  const bool det = deterministic != 0;  // the Hopper set's non-deterministic kernel has its own list
  auto bwd_configs = [det](int a, DType dt, int64_t D, int rank, fused::TileConfig* out, int max) {
    return fused::bwd_tile_configs(a, dt, D, rank, out, max, det);
  };
  if (auto e = check_tiles(kT, bwd_configs, c, arch, tiles_sm80, tiles_sm90); e.failure()) return e;
  const TokenTensor& qt = c.q;
  const auto qshape = token_shape(qt.B, qt.S, qt.heads, c.D);
  const auto rows = row_shape(qt.B, qt.S, qt.heads);
  if (auto e = check(kT, "out", out, c.fdt, qshape); e.failure()) return e;
  if (auto e = check(kT, "lse", lse, ffi::DataType::F32, rows); e.failure()) return e;
  if (auto e = check(kT, "d_out", d_out, c.fdt, qshape); e.failure()) return e;
  if (auto e = check(kT, "d_lse", d_lse, ffi::DataType::F32, rows); e.failure()) return e;
  if (auto e = check(kT, "dq", *dq, c.fdt, qshape); e.failure()) return e;
  if (auto e = check_like(kT, "dk", *dk, k); e.failure()) return e;
  if (auto e = check_like(kT, "dv", *dv, v); e.failure()) return e;
  if (auto e = check_like(kT, "d_add_k", *d_add_k, add_k); e.failure()) return e;
  if (auto e = check_like(kT, "d_add_v", *d_add_v, add_v); e.failure()) return e;
  const int64_t ws = fused::bwd_workspace_floats(c.pr, c.D, deterministic != 0);
  if (auto e = check(kT, "workspace", *workspace, ffi::DataType::F32, {ws}); e.failure()) return e;

  if (auto e = poison(kT, stream, dq, dk, dv, d_add_k, d_add_v, workspace); e.failure()) return e;
  fused::BwdArgs args;
  args.q = q.untyped_data();
  args.k = k.untyped_data();
  args.v = v.untyped_data();
  args.add_k = add_k.untyped_data();
  args.add_v = add_v.untyped_data();
  args.out = out.untyped_data();
  args.lse = static_cast<const float*>(lse.untyped_data());
  args.d_out = d_out.untyped_data();
  args.d_lse = static_cast<const float*>(d_lse.untyped_data());
  args.dq = dq->untyped_data();
  args.dk = dk->untyped_data();
  args.dv = dv->untyped_data();
  args.d_add_k = d_add_k->untyped_data();
  args.d_add_v = d_add_v->untyped_data();
  // Non-deterministic: the dQ accumulators first, at the buffer's own (XLA: 16-byte or better)
  // alignment, which their float4 accesses need (launch_bwd checks it); delta after them.
  float* ws_data = static_cast<float*>(workspace->untyped_data());
  args.dq_accum = deterministic != 0 ? nullptr : ws_data;
  args.workspace = deterministic != 0 ? ws_data : ws_data + fused::bwd_dq_accum_floats(c.pr, c.D);
  args.D = static_cast<int32_t>(c.D);
  args.scale = scale;
  args.arch = static_cast<int32_t>(arch);
  args.tiles_sm80 = static_cast<int32_t>(tiles_sm80);
  args.tiles_sm90 = static_cast<int32_t>(tiles_sm90);
  return cuda_check(kT, "the fused backward kernels", fused::launch_bwd(c.pr, c.rank, c.dtype, args, stream));
}

}  // namespace
}  // namespace jax_na

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_na_fused_fwd, jax_na::FusedFwd,
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
                                      JNA_WINDOW_ATTRS.Attr<float>("scale")
                                  .Attr<int64_t>("arch")
                                  .Attr<int64_t>("tiles_sm80")
                                  .Attr<int64_t>("tiles_sm90"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_na_fused_bwd, jax_na::FusedBwd,
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
                                      JNA_WINDOW_ATTRS.Attr<float>("scale")
                                  .Attr<int64_t>("arch")
                                  .Attr<int64_t>("tiles_sm80")
                                  .Attr<int64_t>("tiles_sm90")
                                  .Attr<int64_t>("deterministic"),
                              {ffi::Traits::kCmdBufferCompatible});
