// Host launch of one fused backward instantiation (included by the bwd_<dtype>_hd<D>.cu files only).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "common/launch.cuh"
#include "fused/fused_bwd.h"
#include "fused/kernel_traits.cuh"
#include "fused/mainloop_bwd_dkdv.cuh"
#include "fused/mainloop_bwd_dq.cuh"
#include "fused/preprocess_bwd.cuh"

namespace jax_na {
namespace fused {

template <class Kernel>
cudaError_t launch_kernel(Kernel kernel, int64_t blocks, int heads, int64_t batch, int threads, int smem,
                          const BwdKernelParams& kp, cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
  return launch_with_smem(kernel, grid, threads, smem, kp, stream);
}

// The key-stationary kernel of a backward: its function, threads per CTA and smem, whether it adds dQ
// into the float32 buffer args.dq_accum itself (kAddsDq: then the dQ kernel does not run), and its
// CTAs per SM for the key tiles' order (kResidentPerSm; 0: raster order, kv_tile_grid).
// Here the synchronous dK/dV kernel of mainloop_bwd_dkdv.cuh; the Hopper non-deterministic mode has
// its own (hopper/launch_bwd.cuh).
template <class KVTraits, class KVGemm>
struct DkdvLaunch {
  static auto kernel() { return fused_bwd_dkdv_kernel<KVTraits, KVGemm>; }
  static constexpr int kThreads = KVTraits::kNThreads;
  static constexpr int kSmem = DkdvSmem<KVTraits>::kBytes;
  static constexpr bool kAddsDq = false;
  static constexpr int kResidentPerSm = 0;  // key tiles in raster order (kv_tile_grid)
};

// The three launches of the backward with the given tilings and MMA policies (Sm80Gemm here, Sm90Gemm
// for the Hopper backward: hopper/launch_bwd.cuh).
template <class DqTraits, class KVTraits, class DqGemm, class KVGemm, class Dkdv = DkdvLaunch<KVTraits, KVGemm>>
cudaError_t launch_bwd_kernels(const geo::Problem& pr, const BwdArgs& args, cudaStream_t stream) {
  using Element = typename DqTraits::Element;
  constexpr int kHeadDim = DqTraits::kHeadDim;
  if (pr.B == 0 || pr.N == 0) return cudaSuccess;
  if (pr.H > 65535 || pr.B > 65535) return cudaErrorInvalidValue;
  // The dQ accumulators take float4 stores (zeroing, conversion) and 16-byte aligned bulk reductions.
  if (Dkdv::kAddsDq && reinterpret_cast<uintptr_t>(args.dq_accum) % 16 != 0) return cudaErrorInvalidValue;

  BwdKernelParams kp;
  kp.pr = pr;
  kp.q = args.q;
  kp.k = args.k;
  kp.v = args.v;
  kp.add_k = args.add_k;
  kp.add_v = args.add_v;
  kp.d_out = args.d_out;
  kp.lse = args.lse;
  kp.delta = args.workspace;
  kp.dq = args.dq;
  kp.dk = args.dk;
  kp.dv = args.dv;
  kp.d_add_k = args.d_add_k;
  kp.d_add_v = args.d_add_v;
  kp.dq_accum = Dkdv::kAddsDq ? args.dq_accum : nullptr;
  // The Hopper kernels' K/V (dQ) and Q/dO (dK/dV) tiles by TMA where the problem takes the maps (no
  // dilation).
  kp.kv_tma = 0;
  kp.q_tma = 0;
  if constexpr (DqGemm::kTmaLoads) kp.kv_tma = encode_kv_tensor_maps<DqTraits>(pr, args.k, args.v, &kp.kv_maps);
  if constexpr (KVGemm::kTmaLoads) kp.q_tma = encode_q_tile_maps<KVTraits>(pr, args.q, args.d_out, &kp.q_maps);
  kp.scale = args.scale;
  kp.scale_log2 = static_cast<float>(static_cast<double>(args.scale) * 1.4426950408889634);

  // 1) delta.
  const int64_t rows = pr.B * pr.N * pr.H;
  constexpr int kTPR = kHeadDim / (16 / int(sizeof(Element)));  // threads per row (fused_bwd_delta_kernel)
  const int64_t threads = rows * kTPR;
  const int64_t delta_blocks = (threads + 255) / 256;
  if (delta_blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;
  constexpr int kDqRowFloats = kHeadDim + kDqAccumPad;  // dq_accum's rows (fused_bwd.h)
  fused_bwd_delta_kernel<Element, kHeadDim, kDqRowFloats><<<static_cast<unsigned>(delta_blocks), 256, 0, stream>>>(
      static_cast<const Element*>(args.out), static_cast<const Element*>(args.d_out), args.d_lse, args.workspace,
      kp.dq_accum, rows);
  cudaError_t st = cudaGetLastError();
  if (st != cudaSuccess) return st;

  // 2) dQ (query-stationary, as the forward), unless the dK/dV kernel adds it up (kAddsDq).
  int64_t q_blocks = 0;
  if (!tiles_per_axis<typename DqTraits::QTile>(pr, kp.q_tiles, &q_blocks)) return cudaErrorInvalidValue;
  // 3) dK/dV (key-stationary) over the window keys, then the additional keys.
  int64_t kv_blocks = 0;
  int64_t resident = 0;  // 0: raster order
  if (Dkdv::kResidentPerSm > 0) {
    const cudaError_t st_res = resident_ctas(Dkdv::kResidentPerSm, &resident);
    if (st_res != cudaSuccess) return st_res;
  }
#if defined(JNA_BWD_EXPERIMENT_RASTER_ORDER)  // experiment knob: raster order for every key-stationary grid
  resident = 0;
#endif
  if (!kv_tile_grid<typename KVTraits::KVTile>(pr, resident, &kp.kv_grid, &kv_blocks)) return cudaErrorInvalidValue;
  kp.n_window_ctas = static_cast<int32_t>(kv_blocks);
  const int64_t add_blocks = (pr.Na + KVTraits::kBlockN - 1) / KVTraits::kBlockN;
  if (kv_blocks + add_blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;

  // Experiment knobs (standalone timing builds only, test_fused_bwd.cu): leave one kernel out.
#if !defined(JNA_BWD_EXPERIMENT_NO_DQ_KERNEL)
  if constexpr (!Dkdv::kAddsDq) {
    st = launch_kernel(fused_bwd_dq_kernel<DqTraits, DqGemm>, q_blocks, pr.H, pr.B, DqTraits::kNThreads,
                       DqSmem<DqTraits>::kBytes, kp, stream);
    if (st != cudaSuccess) return st;
  }
#endif
#if !defined(JNA_BWD_EXPERIMENT_NO_DKDV_KERNEL)
  st = launch_kernel(Dkdv::kernel(), kv_blocks + add_blocks, pr.Hkv, pr.B, Dkdv::kThreads, Dkdv::kSmem, kp, stream);
#endif
  if constexpr (Dkdv::kAddsDq) {
    if (st != cudaSuccess) return st;
    // 4) dq = scale * dq_accum (the dK/dV kernel added dQ / scale there), head-major rows to [B, N, H, D].
    const int64_t convert_blocks = (pr.N * (kHeadDim / 8) + 255) / 256;
    if (convert_blocks > std::numeric_limits<int32_t>::max()) return cudaErrorInvalidValue;
    fused_bwd_dq_convert_kernel<Element, kHeadDim, kDqRowFloats>
        <<<dim3(static_cast<unsigned>(convert_blocks), static_cast<unsigned>(pr.H), static_cast<unsigned>(pr.B)), 256,
           0, stream>>>(kp.dq_accum, static_cast<Element*>(args.dq), args.scale, pr.N);
    return cudaGetLastError();
  }
  return st;
}

template <DType kDType, int kHeadDim, int kRank>
cudaError_t run_bwd(const geo::Problem& pr, const BwdArgs& args, cudaStream_t stream) {
  // The tile configuration args.tiles_sm80 asks for (PortableBwdTiles): dQ on 128-query tiles (64 at
  // head dim 32) over 32-key tiles (dQ, S and dP accumulators in registers), a warp per 16 queries;
  // dK/dV: 64 keys on 4 warps.
  // float32 at head dim 128 and 16-bit at head dim 256: ~197 KB of smem for dQ (Q and dO tiles of
  // 64 KB each): sm_90 class GPUs (elsewhere the launch fails with cudaErrorInvalidValue).
  using Configs = PortableBwdTiles<kDType, kHeadDim, kRank>;
  return with_tile_config<Configs>(args.tiles_sm80, [&](auto config) {
    using Shapes = typename Configs::template At<decltype(config)::value>;
    using DqTiles = typename Shapes::DqTiles;
    using DqTraits = FwdTraits<kDType, kHeadDim, kRank, kPortableDqBlockN, DqTiles::QTile::kSize / 16, 2, DqTiles>;
    using KVTraits = BwdKVTraits<kDType, kHeadDim, kRank, 4, 64, kPortableBwdBlockM<kHeadDim>, Shapes>;
    return launch_bwd_kernels<DqTraits, KVTraits, Sm80Gemm<DqTraits>, Sm80Gemm<KVTraits>>(pr, args, stream);
  });
}

#define JNA_FUSED_BWD_INSTANTIATE(DT, D)                                                     \
  template cudaError_t run_bwd<DT, D, 1>(const geo::Problem&, const BwdArgs&, cudaStream_t); \
  template cudaError_t run_bwd<DT, D, 2>(const geo::Problem&, const BwdArgs&, cudaStream_t); \
  template cudaError_t run_bwd<DT, D, 3>(const geo::Problem&, const BwdArgs&, cudaStream_t);

}  // namespace fused
}  // namespace jax_na
