// jax_na._C: the compiled extension. Hands the XLA FFI handlers to Python as capsules.
// Also builds without CUDA (JAX_NA_WITH_CUDA undefined): no targets, has_cuda() is False.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <string>

#if defined(JAX_NA_WITH_CUDA)
#include "ffi/handlers.h"
#endif
#if defined(JAX_NA_WITH_FUSED)
#include "fused/fused_bwd.h"
#include "fused/fused_fwd.h"
#endif

namespace nb = nanobind;

#ifndef JAX_NA_CUDA_ARCHS
#define JAX_NA_CUDA_ARCHS ""
#endif

#if defined(JAX_NA_WITH_FUSED)
// The fused kernels' dtype of a dtype name; false for a name they do not take.
static bool fused_dtype(const std::string& name, jax_na::DType* dt) {
  if (name == "float32")
    *dt = jax_na::DType::kF32;
  else if (name == "float16")
    *dt = jax_na::DType::kF16;
  else if (name == "bfloat16")
    *dt = jax_na::DType::kBF16;
  else
    return false;
  return true;
}
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

  // The compiled tile configurations of one direction: [(q_tile_shape, kv_tile_shape), ...].
  auto tile_configs = [](bool forward) {
    return [forward](int arch, const std::string& dtype, int64_t head_dim, int rank, bool deterministic) {
      nb::list configs;
#if defined(JAX_NA_WITH_FUSED)
      jax_na::DType dt;
      if (!fused_dtype(dtype, &dt)) return configs;
      jax_na::fused::TileConfig out[16];
      const int n = forward ? jax_na::fused::fwd_tile_configs(arch, dt, head_dim, rank, out, 16)
                            : jax_na::fused::bwd_tile_configs(arch, dt, head_dim, rank, out, 16, deterministic);
      for (int i = 0; i < n && i < 16; ++i) {
        nb::list q, kv;
        for (int a = 0; a < rank; ++a) {
          q.append(out[i].q[a]);
          kv.append(out[i].kv[a]);
        }
        configs.append(nb::make_tuple(nb::tuple(q), nb::tuple(kv)));
      }
#endif
      return configs;
    };
  };
  m.def("fused_fwd_tile_configs",
        [f = tile_configs(true)](int arch, const std::string& dtype, int64_t head_dim, int rank) {
          return f(arch, dtype, head_dim, rank, true);
        },
        nb::arg("arch"), nb::arg("dtype"), nb::arg("head_dim"), nb::arg("rank"),
        "The fused forward's compiled tile configurations [(q_tile_shape, kv_tile_shape), ...] of the portable "
        "(arch 80) or Hopper (arch 90) kernels for a dtype name, head dim and rank, the default first; empty "
        "where none is compiled.");
  m.def("fused_bwd_tile_configs", tile_configs(false), nb::arg("arch"), nb::arg("dtype"), nb::arg("head_dim"),
        nb::arg("rank"), nb::arg("deterministic") = true,
        "The fused backward's compiled tile configurations [(q_tile_shape, kv_tile_shape), ...] (the dK/dV "
        "kernel's Q tile per step and KV tile per CTA), as fused_fwd_tile_configs; deterministic=False: the "
        "Hopper non-deterministic mode's (its CTAs take twice the keys).");

  m.def(
      "fused_fwd_warp_tiles",
      [](const std::string& dtype, int64_t head_dim, int rank) {
        nb::list boxes;
#if defined(JAX_NA_WITH_FUSED)
        jax_na::DType dt;
        if (!fused_dtype(dtype, &dt)) return boxes;
        jax_na::fused::TileConfig out[16];
        const int n = jax_na::fused::fwd_tile_configs(/*arch=*/80, dt, head_dim, rank, out, 16);
        for (int i = 0; i < n && i < 16; ++i) {
          nb::list w;
          for (int a = 0; a < rank; ++a) w.append(out[i].warp[a]);
          boxes.append(nb::tuple(w));
        }
#endif
        return boxes;
      },
      nb::arg("dtype"), nb::arg("head_dim"), nb::arg("rank"),
      "The portable fused forward's warp boxes (the queries of one warp: 16 or 32), one per compiled tile "
      "configuration in fused_fwd_tile_configs(80, ...)'s order; empty where none is compiled.");

  m.def(
      "cuda_archs", []() { return std::string(JAX_NA_CUDA_ARCHS); },
      "CUDA architectures the kernels were built for (e.g. \"80;90a\"); empty without CUDA.");
}
