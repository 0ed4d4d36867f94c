// Fused neighborhood-attention forward: the host-side entry points of the portable sm80-class path
// (mma.sync via CuTe SM80 atoms, cp.async, ldmatrix) and of the Hopper path (sm_90a: wgmma). No CUDA device code and no CuTe here, so the
// host-compiled FFI handler can include it.
//
// Computes out = softmax(scale * q.k^T over each query's window [+ additional keys]) . v and
// lse = natural log of the sum of exp of the scaled scores, exactly as SEMANTICS.md defines.
// Supported: fp16/bf16 at head dim 32, 64, 128 or 256, fp32 at 64 or 128 (D_v == D), rank 1..3, any
// kernel/stride/dilation/causal, GQA (H % Hkv == 0), additional keys/values (Na >= 0).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

struct FwdArgs {
  const void* q = nullptr;      // [B, *S, H, D]
  const void* k = nullptr;      // [B, *S, Hkv, D]
  const void* v = nullptr;      // [B, *S, Hkv, D]
  const void* add_k = nullptr;  // [B, Na, Hkv, D] (unused when Na == 0)
  const void* add_v = nullptr;  // [B, Na, Hkv, D]
  void* out = nullptr;          // [B, *S, H, D]
  float* lse = nullptr;         // [B, *S, H] float32
  int32_t D = 0;                // head dim of q, k and v
  float scale = 1.f;
  // Which kernel: kAuto (dispatch.cu's rule: the Hopper one on sm_90 devices where compiled, at head
  // dim 128 and for large windows at 64; else the portable one), kPortable, or kHopper (an error where
  // it cannot run: no sm_90 device, float32, head dim 256).
  enum Arch : int32_t { kAuto = 0, kPortable = 80, kHopper = 90 };
  int32_t arch = kAuto;
  // Tile configuration of the portable / the Hopper kernel, whichever runs: an index into
  // fwd_tile_configs (0: the default). The caller gives both; -1 where the shapes it asked for have
  // no configuration in that set (then that set must not run: arch names the other one).
  int32_t tiles_sm80 = 0;
  int32_t tiles_sm90 = 0;
  // One int32 of device memory, zero when the launch runs on its stream (the caller's workspace):
  // the persistent Hopper forward's CTAs take their next Q tile from it, so a CTA that drew cheap
  // tiles takes more. nullptr: each CTA strides over the tiles by the grid size (unbalanced where
  // tile costs vary: causal and border tiles).
  int32_t* tile_counter = nullptr;
};

// One compiled tile configuration: Q tile and KV tile extents per axis (axes past the rank are 1).
struct TileConfig {
  int32_t q[3];
  int32_t kv[3];
  int32_t warp[3];  // a portable forward configuration's warp box (16 or 32 queries); zeros in the backward
};

// The forward's compiled tile configurations of the portable (arch 80) or Hopper (arch 90) kernels
// for (dtype, head dim, rank), the default first; writes at most `max` into `out` and returns how
// many there are (0 for a combination with no kernel).
int fwd_tile_configs(int arch, DType dtype, int64_t D, int rank, TileConfig* out, int max);

// True when a compiled instantiation exists for (dtype, head dim, rank): head dims 64 and 128, and
// 256 in float16/bfloat16 (portable kernels only).
bool fwd_supported(DType dtype, int64_t D, int rank);

// True when the Hopper kernels exist for (dtype, head dim): float16/bfloat16 at head dims 64 and 128.
bool hopper_supported(DType dtype, int64_t D);

// True when the Hopper forward was compiled (sm_90a in the build) and the current device is sm_90.
bool sm90_available();

// Launches the forward kernel on `stream` (no synchronization, no allocation). `pr` comes from
// ffi_util::make_problem (+ pr.Na); `rank` is the number of spatial axes (1..3).
// Returns cudaErrorInvalidValue for an unsupported combination or a grid that does not fit, and
// cudaErrorNoKernelImageForDevice when args.arch == kHopper and !sm90_available().
cudaError_t launch_fwd(const geo::Problem& pr, int rank, DType dtype, const FwdArgs& args,
                       cudaStream_t stream);

// One instantiation (defined in fwd_<dtype>_hd<D>.cu).
template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_fwd(const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream);
// The Hopper one (defined in hopper/fwd_<dtype>_hd<D>.cu, compiled for sm_90a only).
template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_fwd_sm90(const geo::Problem& pr, const FwdArgs& args, cudaStream_t stream);

}  // namespace fused
}  // namespace jax_na
