// The Hopper (sm90a) fused neighborhood-attention forward: the portable forward's schedule with the
// GEMMs on warpgroup MMAs, the P.V product of one tile overlapped with the softmax of the next.
//
// One CTA = one 128-query tile, two warpgroups of 64 query rows. K/V tiles are gathered with cp.async
// (token rows are scattered over [B, *S, H_kv, D]) into three smem stages, one barrier per tile,
// loads one tile ahead. Per tile n of a warpgroup:
//   issue S(n) = Q K(n)^T; issue O += P(n-1) V(n-1); wait S(n); mask, softmax(n);
//   wait P.V; rescale O
// so the tensor cores run P.V while the warpgroup computes exponentials. The third stage keeps V(n-1)
// alive while K/V(n+1) streams in. A warpgroup skips the tiles that miss all of its queries' windows
// (wgmma is warpgroup-wide); each warp skips the mask arithmetic on tiles inside all of its own
// queries' windows. Prologue and epilogue: cta_fwd.cuh (shared with the portable kernel).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include <cstdint>

#include "fused/cta_fwd.cuh"
#include "fused/epilogue.cuh"
#include "fused/hopper/gemm.cuh"
#include "fused/hopper/kernel_traits.cuh"
#include "fused/mask.cuh"
#include "fused/softmax.cuh"
#include "fused/tile_scheduler.cuh"

// wgmma needs the arch-specific sm_90a target; other targets compile an empty kernel that traps (the
// host never launches it there: see dispatch.cu).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JNA_SM90A_DEVICE 1
#endif

namespace jax_na {
namespace fused {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1) fused_fwd_sm90_kernel(const __grid_constant__ FwdKernelParams p) {
#if defined(JNA_SM90A_DEVICE)
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  static_assert(kStages == 3, "P.V of tile n-1 runs while tile n+1 loads");
  constexpr int kWarpsPerGroup = 4;

  extern __shared__ __align__(1024) char smem_raw[];
  const FwdSmem<Traits> sm(smem_raw);
  // Values that steer wgmma go through a lane-0 shuffle: ptxas then knows they are warp-uniform and
  // does not serialize the wgmmas behind the branches they decide (C7518).
  const int tid = threadIdx.x;
  const int warp = __shfl_sync(0xffffffffu, tid / 32, 0);
  const int lane = tid % 32;
  const int wg_warp0 = (warp / kWarpsPerGroup) * kWarpsPerGroup;

  if (!fwd_prologue<Traits>(p, sm, tid)) return;
  const CtaSchedule& cs = *sm.cs;
  KVTileWalker<Traits> kv_walker;
  fwd_issue_kv<Traits>(p, sm, kv_walker, 0, tid);
  cp_async_commit();

  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(tid);
  auto thr_o = mma_o.get_thread_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Traits::GmmaLayoutQ{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // wgmma descriptors
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), row_col(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  OnlineSoftmax<kRows> softmax;
  softmax.init();

  // P of the last tile this warpgroup computed, waiting for its P.V product (V in stage pv_stage).
  // Always "pending" (zeros at first and after a flush) so that no branch decides whether a wgmma runs.
  Tensor rP = make_tensor<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_gmma_a_layout(rP.layout()));
  clear(rP);
  int pv_stage = 0;  // tile 0's stage: loaded before the first P.V (P = 0 there: adds zeros)
  auto issue_pv = [&]() {
    Tensor sVt = make_tensor(make_smem_ptr(sm.v_stage(pv_stage)), typename Traits::GmmaLayoutVt{});
    wgmma_issue<false>(mma_o, tOrP, thr_o.partition_fragment_B(sVt), acc_o);
  };

  const int32_t n_tiles = __shfl_sync(0xffffffffu, cs.n_tiles, 0);
  int stage = 0;
  for (int32_t n = 0; n < n_tiles; ++n) {
    cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();  // cp.async writes -> wgmma (async proxy) reads
    // K/V(n) (and Q, windows, flags) visible; every warpgroup has completed its MMAs on tile n - 2's
    // stage, which tile n + 1 takes.
    __syncthreads();
    const int next_stage = stage + 1 == kStages ? 0 : stage + 1;
    if (n + 1 < n_tiles) {
      fwd_issue_kv<Traits>(p, sm, kv_walker, next_stage, tid);
      cp_async_commit();
    }
    const TileFlags& tf = cs.flags[stage];
    const uint32_t active = __shfl_sync(0xffffffffu, tf.active, 0);
    const uint32_t full_bits = __shfl_sync(0xffffffffu, tf.full, 0);
    if (!((active >> wg_warp0) & 0xfu)) {  // uniform over the warpgroup
      issue_pv();  // flush P.V before tile n + 2 overwrites its V
      wgmma_wait<0>(acc_o, tOrP);
      clear(rP);
      stage = next_stage;
      continue;
    }
    // A warp without any key of the tile in its windows masks all of it (full is false for it).
    const bool full = (full_bits >> warp) & 1u;

    Tensor sK = make_tensor(make_smem_ptr(sm.k_stage(stage)), typename Traits::GmmaLayoutK{});
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    wgmma_issue<true>(mma_s, tSrQ, thr_s.partition_fragment_B(sK), acc_s);
    issue_pv();
    wgmma_wait<1>(acc_s);  // S done, P.V in flight

    Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
    if (!full) {
      const int32_t org[3] = {tf.org[0], tf.org[1], tf.org[2]};
      mask_tile<Traits>(s_rc, sm.win, p.pr, cs, n, org, warp, lane);
    }
    float alpha[kRows];
    softmax.update_scores(s_rc, p.scale_log2, alpha);
    wgmma_wait<0>(acc_o, tOrP);
    OnlineSoftmax<kRows>::rescale(acc_o_rc, alpha);
    Tensor rP_new = convert_fragment<Element>(acc_s);
    copy(rP_new, rP);
    pv_stage = stage;
    stage = next_stage;
  }
  issue_pv();
  wgmma_wait<0>(acc_o, tOrP);

  float lse[kRows];
  softmax.finalize(acc_o_rc, p.scale, lse);
  fwd_epilogue<Traits>(p, sm, acc_o_rc, lse, tid, warp, lane);
#elif defined(__CUDA_ARCH__)
  asm volatile("trap;");
#endif
}

}  // namespace fused
}  // namespace jax_na
