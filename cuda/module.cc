// jax_na._C: the compiled extension. Hands the XLA FFI handlers to Python as capsules.
// Also builds without CUDA (JAX_NA_WITH_CUDA undefined): no targets, has_cuda() is False.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#if defined(JAX_NA_WITH_CUDA)
#include "ffi/handlers.h"
#endif

namespace nb = nanobind;

#ifndef JAX_NA_CUDA_ARCHS
#define JAX_NA_CUDA_ARCHS ""
#endif

NB_MODULE(_C, m) {
  m.doc() = "jax_na compiled extension: XLA FFI handlers of the CUDA kernels";

  m.def(
      "ffi_targets",
      []() {
        nb::dict targets;
#if defined(JAX_NA_WITH_CUDA)
        for (const JaxNaFfiTarget* t = kJaxNaFfiTargets; t->name != nullptr; ++t)
          targets[t->name] = nb::capsule(reinterpret_cast<void*>(t->handler));
#endif
        return targets;
      },
      "Every compiled FFI handler (platform CUDA, api_version 1), by target name.");

  m.def(
      "has_cuda",
      []() {
#if defined(JAX_NA_WITH_CUDA)
        return true;
#else
        return false;
#endif
      },
      "True when the extension was built with its CUDA kernels.");

  m.def(
      "cuda_archs", []() { return std::string(JAX_NA_CUDA_ARCHS); },
      "CUDA architectures the kernels were built for (e.g. \"80;90a\"); empty without CUDA.");
}
