// The Hopper (sm90a) fused neighborhood-attention forward: warp-specialized. A producer warpgroup
// loads the Q tile and fills a 3-stage K/V smem ring (mbarriers: hopper/pipeline.cuh): Q and the
// window tiles by TMA, one thread per tile, where the problem allows (hopper/tma.cuh), else by
// cp.async gathers of the 128 producer threads (and always the additional keys); two consumer
// warpgroups run the GEMMs on warpgroup MMAs and the softmax, never waiting on each other (no CTA
// barrier in the main loop).
//
// One CTA = one 128-query tile; consumer warpgroup g owns query rows 64g..64g+63. Per tile n of a
// consumer warpgroup:
//   wait full(n); issue S(n) = Q K(n)^T; issue O += P(n-1) V(n-1); wait S(n); mask, softmax(n);
//   wait P.V; rescale O; release the stage of tile n-1
// so the tensor cores run P.V while the warpgroup computes exponentials; the two warpgroups take
// turns issuing their GEMMs (GemmTurns), so each one's softmax overlaps the other's GEMMs. A
// warpgroup skips S on the tiles that miss all of its queries' windows (wgmma is warpgroup-wide);
// each warp skips the mask arithmetic on tiles inside all of its own queries' windows. Schedule, windows and epilogue:
// cta_fwd.cuh (shared with the portable kernel).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <cstdint>

#include "fused/cta_fwd.cuh"
#include "fused/epilogue.cuh"
#include "fused/hopper/gemm.cuh"
#include "fused/hopper/kernel_traits.cuh"
#include "fused/hopper/pipeline.cuh"
#include "fused/hopper/tma.cuh"
#include "fused/hopper/trace.cuh"
#include "fused/mask.cuh"
#include "fused/softmax.cuh"
#include "fused/tile_scheduler.cuh"

// wgmma and setmaxnreg need the arch-specific sm_90a target; other targets compile an empty kernel
// that traps (the host never launches it there: see dispatch.cu).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JNA_SM90A_DEVICE 1
#endif

namespace jax_na {
namespace fused {

// Kernel parameters: the portable forward's, the K/V tensor maps when use_tma and the Q map when
// use_tma_q.
struct HopperFwdParams {
  KVTensorMaps maps;
  CUtensorMap q_map;
  FwdKernelParams base;
  int32_t use_tma;
  int32_t use_tma_q;
#if defined(JNA_FWD_TRACE)
  FwdTrace trace;
#endif
};

// Named barriers (cutlass numbering, after its reserved ids): all consumer threads; and per
// consumer warpgroup, the turn to issue its GEMMs.
constexpr uint32_t kConsumerBarrierId = 1;
constexpr uint32_t kGemmTurnBarrierId = 2;  // + consumer warpgroup

// Ping-pong between the two consumer warpgroups: they take turns issuing their GEMMs of a tile, so
// one warpgroup's softmax runs while the other's GEMMs occupy the tensor cores (instead of both
// drifting into the same phase). Turn k of warpgroup 0 follows turn k - 1 of warpgroup 1, turn k of
// warpgroup 1 follows turn k of warpgroup 0; each bar.sync pairs with exactly one bar.arrive.
template <int kThreadsPerGroup>
struct GemmTurns {
  int wg;  // consumer warpgroup, 0 or 1
  __device__ __forceinline__ void start() const {
    if (wg == 1) cutlass::arch::NamedBarrier::arrive(2 * kThreadsPerGroup, kGemmTurnBarrierId + 0);
  }
  __device__ __forceinline__ void wait() const {
    cutlass::arch::NamedBarrier::sync(2 * kThreadsPerGroup, kGemmTurnBarrierId + wg);
  }
  // Hands the turn to the other warpgroup; warpgroup 1 has no turn to hand on after its last one.
  __device__ __forceinline__ void pass(bool last) const {
    if (wg == 0 || !last) cutlass::arch::NamedBarrier::arrive(2 * kThreadsPerGroup, kGemmTurnBarrierId + (1 - wg));
  }
};

// Producer warpgroup (ptid 0..127): Q, then every K/V tile into the ring, each stage once the
// consumers released it.
template <class Traits>
__device__ __forceinline__ void fwd_produce(const HopperFwdParams& hp, const FwdSmem<Traits>& sm,
                                            FwdPipeline<Traits::kStages>& pipe, int ptid, CtaTrace* tr) {
  using Bar = cutlass::arch::ClusterBarrier;
  const FwdKernelParams& p = hp.base;
  const CtaSchedule& cs = *sm.cs;
  if (hp.use_tma_q) {  // uniform
    if (ptid == 0) {
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&pipe.q_full, q_tile_tma_bytes<Traits>());
      load_q_tma<Traits>(hp.q_map, p.pr, cs, sm.q, &pipe.q_full);
    }
  } else {
    fwd_load_q<Traits>(p, sm, ptid);
    if (ptid == 0) Bar::arrive(&pipe.q_full);
  }
  cutlass::arch::cpasync_barrier_arrive_noinc(&pipe.q_full);
  JNA_TRACE(tr, kTraceQIssued);
  KVTileWalker<Traits> walker;
  PipelineState<Traits::kStages> st;
  const int32_t n_tiles = cs.n_tiles;
  for (int32_t n = 0; n < n_tiles; ++n) {
    if (n >= Traits::kStages) Bar::wait(&pipe.empty[st.stage], st.phase ^ 1u);
    int32_t org[3];
    walker.origin(cs, org);
    walker.publish(p.pr, cs, org, sm.cs->flags[st.stage], ptid);  // thread 0 writes the flags
    uint64_t* full = &pipe.full[st.stage];
    typename Traits::Element* sK = sm.k_stage(st.stage);
    typename Traits::Element* sV = sm.v_stage(st.stage);
    if (hp.use_tma && n < cs.n_window_tiles && kv_tile_fits_tma<Traits>(p.pr, org)) {  // uniform
      if (ptid == 0) {
        cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(full, kv_tile_tma_bytes<Traits>());
        load_kv_tma<Traits>(hp.maps, p.pr, cs, org, sK, sV, full);
      }
    } else {
      TileScheduler<Traits>::load_kv(p.pr, cs, n, org, p.k, p.v, p.add_k, p.add_v, sK, sV, ptid);
      if (ptid == 0) Bar::arrive(full);
    }
    cutlass::arch::cpasync_barrier_arrive_noinc(full);
    walker.advance(cs);
    st.advance();
  }
  JNA_TRACE(tr, kTraceProducerDone);
  cp_async_wait<0>();  // nothing in flight when the warp exits
}

// Consumer warpgroups (ctid 0..255): the main loop and the epilogue.
template <class Traits>
__device__ __forceinline__ void fwd_consume(const FwdKernelParams& p, const FwdSmem<Traits>& sm,
                                            FwdPipeline<Traits::kStages>& pipe, int ctid, CtaTrace* tr) {
  using namespace cute;
  using Bar = cutlass::arch::ClusterBarrier;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kWarpsPerGroup = 4;
  // Values that steer wgmma go through a lane-0 shuffle: ptxas then knows they are warp-uniform and
  // does not serialize the wgmmas behind the branches they decide (C7518).
  const int warp = __shfl_sync(0xffffffffu, ctid / 32, 0);
  const int lane = ctid % 32;
  const int wg_warp0 = (warp / kWarpsPerGroup) * kWarpsPerGroup;
  auto consumer_sync = [] { cutlass::arch::NamedBarrier::sync(Traits::kNThreads, kConsumerBarrierId); };
  const CtaSchedule& cs = *sm.cs;

  store_row_windows<Traits>(p.pr, cs, sm.win, ctid);
  consumer_sync();  // windows visible

  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_s = mma_s.get_thread_slice(ctid);
  auto thr_o = mma_o.get_thread_slice(ctid);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Traits::GmmaLayoutQ{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // wgmma descriptors
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kD>>{});
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), row_col(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  OnlineSoftmax<kRows> softmax;
  softmax.init();

  // P of the last tile, waiting for its P.V product (V in stage pv_stage). Always "pending" (zeros
  // at first and after a skipped tile) so that no branch decides whether a wgmma runs.
  Tensor rP = make_tensor<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_gmma_a_layout(rP.layout()));
  clear(rP);
  int pv_stage = 0;  // tile 0's stage: the first P.V adds zeros times V(0)
  auto issue_pv = [&]() {
    Tensor sVt = make_tensor(make_smem_ptr(sm.v_stage(pv_stage)), typename Traits::GmmaLayoutVt{});
    wgmma_issue<false>(mma_o, tOrP, thr_o.partition_fragment_B(sVt), acc_o);
  };

  const GemmTurns<kWarpsPerGroup * 32> turns{warp / kWarpsPerGroup};
  turns.start();
  Bar::wait(&pipe.q_full, 0);
  JNA_TRACE(tr, kTraceQReady);
  PipelineState<Traits::kStages> st;
  const int32_t n_tiles = __shfl_sync(0xffffffffu, cs.n_tiles, 0);
  for (int32_t n = 0; n < n_tiles; ++n) {
    Bar::wait(&pipe.full[st.stage], st.phase);
    if (n == 0) JNA_TRACE(tr, kTraceFirstKV);
    cutlass::arch::fence_view_async_shared();  // cp.async writes -> wgmma (async proxy) reads
    // Only lane 0 reads the stage's flags (and passes them on): it is the lane that releases the stage,
    // so its release covers every read of them before the producer rewrites them.
    uint32_t active = 0, full_bits = 0;
    int32_t org[3] = {0, 0, 0};
    if (lane == 0) {
      const TileFlags& tf = cs.flags[st.stage];
      active = tf.active;
      full_bits = tf.full;
      org[0] = tf.org[0];
      org[1] = tf.org[1];
      org[2] = tf.org[2];
    }
    active = __shfl_sync(0xffffffffu, active, 0);
    full_bits = __shfl_sync(0xffffffffu, full_bits, 0);
    const bool last = n + 1 == n_tiles;
    if (!((active >> wg_warp0) & 0xfu)) {  // uniform over the warpgroup
      turns.wait();
      issue_pv();
      turns.pass(last);
      wgmma_wait<0>(acc_o, tOrP);
      clear(rP);
    } else {
      // A warp without any key of the tile in its windows masks all of it (full is false for it).
      const bool full = (full_bits >> warp) & 1u;
      Tensor sK = make_tensor(make_smem_ptr(sm.k_stage(st.stage)), typename Traits::GmmaLayoutK{});
      Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
      turns.wait();
      wgmma_issue<true>(mma_s, tSrQ, thr_s.partition_fragment_B(sK), acc_s);
      issue_pv();
      turns.pass(last);
      wgmma_wait<1>(acc_s);  // S done, P.V in flight

      Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
      if (!full) {
#pragma unroll
        for (int a = 0; a < 3; ++a) org[a] = __shfl_sync(0xffffffffu, org[a], 0);
        mask_tile<Traits>(s_rc, sm.win, p.pr, cs, n, org, warp, lane);
      }
      float alpha[kRows];
      const bool moved = softmax.update_scores(s_rc, p.scale_log2, alpha);
      wgmma_wait<0>(acc_o, tOrP);
      if (moved) OnlineSoftmax<kRows>::rescale(acc_o_rc, alpha);
      Tensor rP_new = convert_fragment<Element>(acc_s);
      copy(rP_new, rP);
    }
    // The P.V just waited for read V(n - 1): its stage goes back to the producer.
    if (n > 0 && lane == 0) Bar::arrive(&pipe.empty[pv_stage]);
    pv_stage = st.stage;
    st.advance();
  }
  issue_pv();
  wgmma_wait<0>(acc_o, tOrP);
  JNA_TRACE(tr, kTraceLoopDone);

  float lse[kRows];
  softmax.finalize(acc_o_rc, p.scale, lse);
  fwd_epilogue<Traits>(p, sm, acc_o_rc, lse, ctid, warp, lane, consumer_sync);
  JNA_TRACE(tr, kTraceEpilogueDone);
#if defined(JNA_FWD_TRACE)
  if (tr != nullptr) {
    tr->t_end = global_timer_ns();
    tr->n_tiles = n_tiles;
  }
#endif
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1) fused_fwd_sm90_kernel(const __grid_constant__ HopperFwdParams hp) {
#if defined(JNA_SM90A_DEVICE)
  const FwdKernelParams& p = hp.base;
  extern __shared__ __align__(1024) char smem_raw[];
  const FwdSmem<Traits> sm(smem_raw);
  auto& pipe = *reinterpret_cast<FwdPipeline<Traits::kStages>*>(smem_raw + Traits::kOffBarriers);
  const int tid = threadIdx.x;
  CtaTrace* tr = nullptr;  // the trace record of this CTA, on the threads that write it
#if defined(JNA_FWD_TRACE)
  if (tid == 0 || tid == Traits::kLoadThreads) tr = trace_slot(hp.trace);
  if (tid == 0 && tr != nullptr) {
    tr->clk[kTraceEntry] = clock64();
    tr->t_begin = global_timer_ns();
    uint32_t smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    tr->smid = smid;
  }
#endif
  if (tid == 0) pipe.init(Traits::kLoadThreads, Traits::kNWarps);
  if (!fwd_schedule<Traits>(p, sm, tid)) return;  // its barrier also publishes the mbarrier init
  if (tid == 0) JNA_TRACE(tr, kTraceScheduled);
  if (__shfl_sync(0xffffffffu, tid / Traits::kLoadThreads, 0) == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    fwd_produce<Traits>(hp, sm, pipe, tid, tr);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    fwd_consume<Traits>(p, sm, pipe, tid - Traits::kLoadThreads, tr);
  }
#elif defined(__CUDA_ARCH__)
  asm volatile("trap;");
#endif
}

}  // namespace fused
}  // namespace jax_na
