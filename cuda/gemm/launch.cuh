// Host launch of the GEMM-based kernels for one (dtype, head dim, rank) (included by the ops_<dtype>_hd<E>.cu
// files only). Tilings: PN and NN take the fused forward's (128-query tiles on 8 warps, 64-key tiles;
// 32 for float32),
// IN the fused backward's key-stationary one (64-key tiles on 4 warps, Q tiles of 64 or 32 queries).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "common/launch.cuh"
#include "fused/kernel_traits.cuh"
#include "gemm/gemm_ops.h"
#include "gemm/in.cuh"
#include "gemm/nn.cuh"
#include "gemm/params.cuh"
#include "gemm/pn.cuh"

namespace jax_na {
namespace gemm {

// NN copies the CTA's weight rows to shared memory up to this many bytes, within a CTA total that an
// sm_80 GPU allows (else it reads them from global memory through the same pointers).
constexpr int64_t kMaxStagedWeightBytes = 64 * 1024;
constexpr int64_t kMaxSmemBytes = 160 * 1024;

template <int kRank>
GemmParams make_params(const geo::Problem& pr, float alpha) {
  GemmParams p;
  p.pr = pr;
  p.alpha = alpha;
  int32_t ws = 1, bs = 1;
  for (int a = 2; a >= 0; --a) {
    p.w_stride[a] = ws;
    p.rpb_stride[a] = bs;
    ws *= pr.axis[a].k;
    bs *= 2 * pr.axis[a].k - 1;
  }
  return p;
}

template <class Kernel>
cudaError_t launch(Kernel kernel, int64_t blocks, int64_t heads, int64_t batch, int threads, int smem,
                   const GemmParams& p, cudaStream_t stream) {
  if (blocks == 0 || heads == 0 || batch == 0) return cudaSuccess;
  if (heads > 65535 || batch > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
  return launch_with_smem(kernel, grid, threads, smem, p, stream);
}

// float32 tiles take twice the bytes: 32-key tiles keep PN and NN within an sm_80 GPU's shared memory.
template <DType kDType, int kE, int kRank>
using QTraits = fused::FwdTraits<kDType, kE, kRank, kDType == DType::kF32 ? 32 : 64, 8>;
template <DType kDType, int kE, int kRank>
using KTraits = fused::BwdKVTraits<kDType, kE, kRank>;

template <DType kDType, int kE, int kRank>
cudaError_t run_pn(const geo::Problem& pr, const naive::PNArgs& args, cudaStream_t stream) {
  using Traits = QTraits<kDType, kE, kRank>;
  GemmParams p = make_params<kRank>(pr, args.alpha);
  p.a = args.a;
  p.b = args.b;
  p.rpb = args.mode == naive::PNMode::kScore ? args.rpb : nullptr;
  p.out = args.out;
  p.masked_neg_inf = args.mode == naive::PNMode::kScore;
  int64_t blocks = 0;
  if (!fused::tiles_per_axis<typename Traits::QTile>(pr, p.q_tiles, &blocks)) return cudaErrorInvalidValue;
  constexpr int kSmem = QTileSmem<Traits>::bytes(PnStaging<Traits>::kBytes);
  if (args.out_f32)
    return launch(gemm_pn_kernel<Traits, float>, blocks, pr.H, pr.B, Traits::kNThreads, kSmem, p, stream);
  return launch(gemm_pn_kernel<Traits, typename Traits::Element>, blocks, pr.H, pr.B, Traits::kNThreads, kSmem, p,
                stream);
}

template <DType kDType, int kE, int kRank>
cudaError_t run_nn(const geo::Problem& pr, const naive::NNArgs& args, cudaStream_t stream) {
  using Traits = QTraits<kDType, kE, kRank>;
  GemmParams p = make_params<kRank>(pr, args.alpha);
  p.attn = args.attn;
  p.b = args.vals;
  p.out = args.out;
  const int64_t staged = Traits::kBlockM * pr.W * int64_t(sizeof(typename Traits::Element));
  p.stage_weights = staged <= kMaxStagedWeightBytes && QTileSmem<Traits>::bytes(staged) <= kMaxSmemBytes;
  int64_t blocks = 0;
  if (!fused::tiles_per_axis<typename Traits::QTile>(pr, p.q_tiles, &blocks)) return cudaErrorInvalidValue;
  return launch(gemm_nn_kernel<Traits>, blocks, pr.H, pr.B, Traits::kNThreads,
                QTileSmem<Traits>::bytes(p.stage_weights ? staged : 0), p, stream);
}

template <DType kDType, int kE, int kRank>
cudaError_t run_in(const geo::Problem& pr, const naive::INArgs& args, cudaStream_t stream) {
  using Traits = KTraits<kDType, kE, kRank>;
  GemmParams p = make_params<kRank>(pr, args.alpha);
  p.attn = args.attn;
  p.a = args.vals;
  p.out = args.out;
  int64_t blocks = 0;
  if (!fused::kv_tile_grid<typename Traits::KVTile>(pr, 0, &p.kv_grid, &blocks)) return cudaErrorInvalidValue;
  p.n_kv_ctas = static_cast<int32_t>(blocks);
  return launch(gemm_in_kernel<Traits>, blocks, pr.Hkv, pr.B, Traits::kNThreads, InSmem<Traits>::kBytes, p, stream);
}

#define JNA_GEMM_INSTANTIATE_RANK(DT, E, R)                                                                    \
  template cudaError_t run_pn<DT, E, R>(const geo::Problem&, const naive::PNArgs&, cudaStream_t);              \
  template cudaError_t run_nn<DT, E, R>(const geo::Problem&, const naive::NNArgs&, cudaStream_t);              \
  template cudaError_t run_in<DT, E, R>(const geo::Problem&, const naive::INArgs&, cudaStream_t);
#define JNA_GEMM_INSTANTIATE(DT, E)     \
  JNA_GEMM_INSTANTIATE_RANK(DT, E, 1)   \
  JNA_GEMM_INSTANTIATE_RANK(DT, E, 2)   \
  JNA_GEMM_INSTANTIATE_RANK(DT, E, 3)

}  // namespace gemm
}  // namespace jax_na
