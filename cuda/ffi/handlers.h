// XLA FFI handlers of jax_na (typed API, api_version 1, platform "CUDA"). See docs/ffi.md.
// Each symbol is a C function XLA calls with its call frame; jax_na._C hands them to Python as capsules.
#pragma once

#include "xla/ffi/api/api.h"

// Naive backend: fused-style attention.
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_naive_fwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_naive_bwd);
// Naive backend: unfused ops.
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_naive_qk);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_naive_av);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_naive_qk_bwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_naive_av_bwd);
#if defined(JAX_NA_WITH_FUSED)
// Fused backend (built when the CUTLASS headers are found).
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_fused_fwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_fused_bwd);
#endif
#if defined(JAX_NA_WITH_GEMM)
// GEMM backend: unfused ops on tensor cores (built when the CUTLASS headers are found).
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_gemm_qk);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_gemm_av);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_gemm_qk_bwd);
XLA_FFI_DECLARE_HANDLER_SYMBOL(jax_na_gemm_av_bwd);
#endif

// Every handler above, by target name, for registration (null-terminated).
struct JaxNaFfiTarget {
  const char* name;
  XLA_FFI_Error* (*handler)(XLA_FFI_CallFrame*);
};

static const JaxNaFfiTarget kJaxNaFfiTargets[] = {
    {"jax_na_naive_fwd", jax_na_naive_fwd},
    {"jax_na_naive_bwd", jax_na_naive_bwd},
    {"jax_na_naive_qk", jax_na_naive_qk},
    {"jax_na_naive_av", jax_na_naive_av},
    {"jax_na_naive_qk_bwd", jax_na_naive_qk_bwd},
    {"jax_na_naive_av_bwd", jax_na_naive_av_bwd},
#if defined(JAX_NA_WITH_FUSED)
    {"jax_na_fused_fwd", jax_na_fused_fwd},
    {"jax_na_fused_bwd", jax_na_fused_bwd},
#endif
#if defined(JAX_NA_WITH_GEMM)
    {"jax_na_gemm_qk", jax_na_gemm_qk},
    {"jax_na_gemm_av", jax_na_gemm_av},
    {"jax_na_gemm_qk_bwd", jax_na_gemm_qk_bwd},
    {"jax_na_gemm_av_bwd", jax_na_gemm_av_bwd},
#endif
    {nullptr, nullptr},
};
