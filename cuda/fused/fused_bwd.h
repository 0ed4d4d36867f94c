// Fused neighborhood-attention backward: host-side entry points (no device code, no CuTe: the
// host-compiled FFI handler includes this).
//
// Three launches on one stream: delta = rowsum(dO * O) - d_lse (into the caller's workspace), the
// query-stationary dQ kernel and the key-stationary dK/dV kernel (also the additional keys/values),
// on SM80-class MMAs (portable) or on Hopper warpgroup MMAs (sm_90a).
// Deterministic by default: every output element is written by exactly one CTA, no atomics. The
// Hopper backward's non-deterministic mode (BwdArgs::dq_accum) runs one warp-specialized kernel for
// dK, dV and dQ instead of the last two, adding dQ with bulk reductions in whatever order its CTAs
// reach them.
// Supported: as the forward (fwd_supported; D_v == D, rank 1..3, every
// kernel/stride/dilation/causal, GQA, additional keys/values).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "fused/fused_fwd.h"  // FwdArgs::Arch
#include "geometry/window.cuh"

namespace jax_na {
namespace fused {

struct BwdArgs {
  const void* q = nullptr;       // [B, *S, H, D]
  const void* k = nullptr;       // [B, *S, Hkv, D]
  const void* v = nullptr;       // [B, *S, Hkv, D]
  const void* add_k = nullptr;   // [B, Na, Hkv, D]
  const void* add_v = nullptr;   // [B, Na, Hkv, D]
  const void* out = nullptr;     // [B, *S, H, D]
  const float* lse = nullptr;    // [B, *S, H]
  const void* d_out = nullptr;   // [B, *S, H, D]
  const float* d_lse = nullptr;  // [B, *S, H]
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* d_add_k = nullptr;
  void* d_add_v = nullptr;
  float* workspace = nullptr;  // [B * N * H] float32 (delta)
  // [B * N * H * D] float32, or null (deterministic): where the Hopper backward runs, its dK/dV
  // kernel adds dQ here (bulk reductions) instead of a dQ kernel recomputing S and dP (non-deterministic:
  // the order of the additions varies). The portable backward ignores it.
  float* dq_accum = nullptr;
  int32_t D = 0;
  float scale = 1.f;
  int32_t arch = FwdArgs::kAuto;  // as the forward's: kAuto, kPortable or kHopper
  // The dK/dV kernel's tile configuration in the portable / the Hopper kernel set, whichever runs:
  // an index into bwd_tile_configs (0: the default; -1: that set must not run, as FwdArgs').
  int32_t tiles_sm80 = 0;
  int32_t tiles_sm90 = 0;
};

// The backward's compiled tile configurations (the dK/dV kernel's Q tile per step and KV tile per
// CTA) of the portable (arch 80) or Hopper (arch 90) kernels for (dtype, head dim, rank), as
// fwd_tile_configs; !deterministic: the Hopper non-deterministic mode's (its CTAs take twice the keys).
// The non-deterministic list starts with the deterministic one's configurations (their K/V boxes
// twice as large) and may hold more (3-D: 1x8x8 over 2x8x8): an index names a configuration of
// the call's mode only.
int bwd_tile_configs(int arch, DType dtype, int64_t D, int rank, TileConfig* out, int max, bool deterministic);
int bwd_tile_configs(int arch, DType dtype, int64_t D, int rank, TileConfig* out, int max);

// dQ's float32 sums in the non-deterministic mode (BwdArgs::dq_accum): rows of D + kDqAccumPad floats,
// head-major ([B, H, N]), so that the query rows of a Q tile that are consecutive tokens are one
// contiguous run, added with one bulk reduction from the kernel's smem dQ tile, whose rows carry the
// same padding (it keeps the fragment stores free of bank conflicts). The padding is neither zeroed
// nor converted: the reductions add whatever the smem padding holds into it, and nothing reads it.
constexpr int kDqAccumPad = 8;
inline int64_t bwd_dq_accum_floats(const geo::Problem& pr, int64_t D) {
  return pr.B * pr.N * pr.H * (D + kDqAccumPad);
}

// Workspace floats launch_bwd needs: with dq_accum (non-deterministic) its rows first, then delta
// (one float per query row).
inline int64_t bwd_workspace_floats(const geo::Problem& pr, int64_t D, bool deterministic) {
  return pr.B * pr.N * pr.H + (deterministic ? 0 : bwd_dq_accum_floats(pr, D));
}

cudaError_t launch_bwd(const geo::Problem& pr, int rank, DType dtype, const BwdArgs& args, cudaStream_t stream);

template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_bwd(const geo::Problem& pr, const BwdArgs& args, cudaStream_t stream);
// The Hopper one (defined in hopper/bwd_<dtype>_hd<D>.cu, compiled for sm_90a only).
template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_bwd_sm90(const geo::Problem& pr, const BwdArgs& args, cudaStream_t stream);

}  // namespace fused
}  // namespace jax_na
