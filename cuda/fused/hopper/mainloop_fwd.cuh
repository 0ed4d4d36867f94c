// The Hopper (sm90a) fused neighborhood-attention forward: warp-specialized and persistent. A
// producer warpgroup computes each Q tile's schedule, loads the Q tile and fills a 3-stage K/V smem
// ring (mbarriers: hopper/pipeline.cuh): Q and the window tiles by TMA, one thread per tile, where the
// problem allows (hopper/tma.cuh), else by cp.async gathers of the 128 producer threads (and always
// the additional keys); two consumer warpgroups run the GEMMs on warpgroup MMAs and the softmax,
// never waiting on each other (no CTA barrier in the main loop; two consumer barriers per Q tile).
//
// One CTA per SM walks Q tiles (128 queries each), drawing each next one from a counter in the call's
// workspace (or striding by the grid without one). The producer runs
// ahead across tiles: while the consumers finish a tile (its last products, O and lse stored straight
// from registers), it already has the next tile's schedule, Q and first K/V stages in flight, so a
// tile's prologue and epilogue no longer idle the tensor cores.
//
// Consumer warpgroup g owns query rows 64g..64g+63. Per K/V tile n of a consumer warpgroup:
//   wait full(n); issue S(n) = Q K(n)^T; issue O += P(n-1) V(n-1); wait S(n); mask, softmax(n);
//   wait P.V; rescale O; release the stage of tile n-1
// so the tensor cores run P.V while the warpgroup computes exponentials; the two warpgroups take
// turns issuing their GEMMs (GemmTurns), so each one's softmax overlaps the other's GEMMs. A
// warpgroup skips S on the tiles that miss all of its queries' windows (wgmma is warpgroup-wide);
// each warp skips the mask arithmetic on tiles inside all of its own queries' windows. Schedule and
// windows: tile_scheduler.cuh, mask.cuh (shared with the portable kernel).
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
#include "fused/trace.cuh"
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

// Kernel parameters: the portable forward's, the Q tiles the persistent CTAs walk, the K/V tensor
// maps when use_tma and the Q map when use_tma_q.
struct HopperFwdParams {
  KVTensorMaps maps;
  CUtensorMap q_map;
  FwdKernelParams base;
  QTileSpace tiles;
  int32_t* tile_counter;  // FwdArgs::tile_counter
  int32_t use_tma;
  int32_t use_tma_q;
#if defined(JNA_FWD_TRACE)
  FwdTrace trace;
#endif
};

// cutlass's mbarrier waits are asm without a memory clobber: nothing keeps the compiler from reusing
// a schedule field loaded before the wait. This barrier does (it emits no instruction).
__device__ __forceinline__ void compiler_fence() { asm volatile("" ::: "memory"); }

// Named barriers (cutlass numbering, after its reserved ids): all consumer threads; per consumer
// warpgroup, the turn to issue its GEMMs; all producer threads.
constexpr uint32_t kConsumerBarrierId = 1;
constexpr uint32_t kGemmTurnBarrierId = 2;  // + consumer warpgroup
constexpr uint32_t kProducerBarrierId = 4;

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

// Producer warpgroup (ptid 0..127): per Q tile of the CTA, the schedule (once the consumers took
// what they need of the previous one), Q (once their GEMMs on the previous Q are done), then every
// K/V tile into the ring, each stage once the consumers released it.
template <class Traits>
__device__ __forceinline__ void fwd_produce(const HopperFwdParams& hp, const FwdSmem<Traits>& sm,
                                            FwdPipeline<Traits::kStages>& pipe, int ptid, CtaTrace* tr) {
  using Bar = cutlass::arch::ClusterBarrier;
  const FwdKernelParams& p = hp.base;
  const CtaSchedule& cs = *sm.cs;
  PipelineState<Traits::kStages> st;
  int32_t ring_fill = 0;  // stages filled before the first wait on empty (saturates at kStages)
  uint32_t q_round = 0;   // live Q tiles so far
  int64_t tile = blockIdx.x;
  for (uint32_t it = 0;; ++it) {
    if (it > 0) {
      // Every producer thread is done with the previous schedule; so is every consumer warp.
      cutlass::arch::NamedBarrier::sync(Traits::kLoadThreads, kProducerBarrierId);
      Bar::wait(&pipe.sched_empty, (it - 1) & 1u);
    }
    if (ptid < 32) {  // warp 0: the next tile and its schedule (TileScheduler::compute on its lanes)
      if (it > 0) {
        if (hp.tile_counter != nullptr) {
          int32_t drawn = 0;
          if (ptid == 0) drawn = atomicAdd(hp.tile_counter, 1);
          tile = static_cast<int64_t>(gridDim.x) + __shfl_sync(0xffffffffu, drawn, 0);
        } else {
          tile += gridDim.x;
        }
      }
      const bool done = tile >= hp.tiles.total;  // uniform over warp 0
      if (!done) TileScheduler<Traits>::compute(p.pr, p.q_tiles, hp.tiles.at(tile), *sm.cs, ptid);
      __syncwarp();  // the whole warp's schedule writes, ordered before the first kNWarps lanes' arrivals
      if (ptid < Traits::kNWarps) {
        if (ptid == 0) sm.cs->done = done;
        Bar::arrive(&pipe.sched_full);
      }
    }
    Bar::wait(&pipe.sched_full, it & 1u);
    compiler_fence();  // the schedule is re-read below (the wait's asm tells the compiler nothing)
    if (it == 0) JNA_TRACE(tr, kTraceScheduled);
    if (cs.done) break;      // uniform
    if (!cs.live) continue;  // uniform
    if (q_round > 0) Bar::wait(&pipe.q_empty, (q_round - 1) & 1u);
    ++q_round;
    st.stage = __shfl_sync(0xffffffffu, st.stage, 0);  // uniform registers (see the consumers)
    st.phase = __shfl_sync(0xffffffffu, st.phase, 0);
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
    if (it == 0) JNA_TRACE(tr, kTraceQIssued);
    KVTileWalker<Traits> walker;
    const int32_t n_tiles = cs.n_tiles;
    for (int32_t n = 0; n < n_tiles; ++n) {
      if (ring_fill == Traits::kStages)
        Bar::wait(&pipe.empty[st.stage], st.phase ^ 1u);
      else
        ++ring_fill;
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
    if (it == 0) JNA_TRACE(tr, kTraceProducerDone);
  }
  cp_async_wait<0>();  // nothing in flight when the warp exits
}

// Consumer warpgroups (ctid 0..255): per Q tile of the CTA, the row windows and the tile's origin
// from the schedule (then it goes back to the producer), the main loop, and O and lse stored from
// registers (smem has no room for a staged O beside the ring, and sQ already holds the next Q).
template <class Traits>
__device__ __forceinline__ void fwd_consume(const HopperFwdParams& hp, const FwdSmem<Traits>& sm,
                                            FwdPipeline<Traits::kStages>& pipe, int ctid, CtaTrace* tr) {
  using namespace cute;
  using Bar = cutlass::arch::ClusterBarrier;
  using Element = typename Traits::Element;
  using TS = TileScheduler<Traits>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;
  constexpr int kWarpsPerGroup = 4;
  const FwdKernelParams& p = hp.base;
  // Values that steer wgmma go through a lane-0 shuffle: ptxas then knows they are warp-uniform and
  // does not serialize the wgmmas behind the branches they decide (C7518).
  const int warp = __shfl_sync(0xffffffffu, ctid / 32, 0);
  const int lane = ctid % 32;
  const int wg_warp0 = (warp / kWarpsPerGroup) * kWarpsPerGroup;
  auto consumer_sync = [] { cutlass::arch::NamedBarrier::sync(Traits::kNThreads, kConsumerBarrierId); };
  const CtaSchedule& cs = *sm.cs;
  static_assert(sizeof(QTileOrigin) <= Traits::kSmemBytes - Traits::kOffOrigin, "QTileOrigin smem");
  QTileOrigin& origin = *reinterpret_cast<QTileOrigin*>(reinterpret_cast<char*>(sm.q) + Traits::kOffOrigin);

  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  // The slices only make wgmma descriptors (the accumulators are thread-independent fragments), so
  // they take the warpgroup's first thread: warp-uniform, the descriptors then stay in uniform
  // registers instead of moving there (R2UR) per wgmma.
  auto thr_s = mma_s.get_thread_slice(wg_warp0 * 32);
  auto thr_o = mma_o.get_thread_slice(wg_warp0 * 32);
  Tensor sQ = make_tensor(make_smem_ptr(sm.q), typename Traits::GmmaLayoutQ{});
  Tensor tSrQ = thr_s.partition_fragment_A(sQ);  // wgmma descriptors
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kD>>{});
  Tensor acc_o_rc = make_tensor(acc_o.data(), row_col(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  OnlineSoftmax<kRows> softmax;

  // P of the last tile, waiting for its P.V product (V in stage pv_stage). Always "pending" (zeros
  // at first and after a skipped tile) so that no branch decides whether a wgmma runs.
  Tensor rP = make_tensor<Element>(partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{}).layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_gmma_a_layout(rP.layout()));
  int pv_stage = 0;
  auto issue_pv = [&]() {
    Tensor sVt = make_tensor(make_smem_ptr(sm.v_stage(pv_stage)), typename Traits::GmmaLayoutVt{});
    wgmma_issue<false>(mma_o, tOrP, thr_o.partition_fragment_B(sVt), acc_o);
  };

  const GemmTurns<kWarpsPerGroup * 32> turns{warp / kWarpsPerGroup};
  PipelineState<Traits::kStages> st;
  uint32_t q_round = 0;  // live Q tiles so far
  for (uint32_t it = 0;; ++it) {
    Bar::wait(&pipe.sched_full, it & 1u);
    compiler_fence();  // as in the producer
    if (__shfl_sync(0xffffffffu, cs.done, 0)) break;  // uniform
    const bool live = __shfl_sync(0xffffffffu, cs.live, 0) != 0;  // uniform
    int32_t n_tiles = 0, n_window_tiles = 0;
    if (live) {
      if (it > 0) consumer_sync();  // every warp is done with the previous row windows and origin
      RowWindowTable<Traits>::store(p.pr, cs, sm.win, ctid);
      if (ctid == 0) origin.assign(cs);
      n_tiles = __shfl_sync(0xffffffffu, cs.n_tiles, 0);
      n_window_tiles = cs.n_window_tiles;
    }
    __syncwarp();
    if (lane == 0) Bar::arrive(&pipe.sched_empty);  // the producer may write the next schedule
    if (!live) continue;
    consumer_sync();  // windows and origin visible

    clear(acc_o);
    softmax.init();
    clear(rP);
    // The ring position through lane-0 shuffles: ptxas then keeps it (and the smem addresses of the
    // stages' wgmma descriptors and barriers) in uniform registers through the loop below.
    st.stage = __shfl_sync(0xffffffffu, st.stage, 0);
    st.phase = __shfl_sync(0xffffffffu, st.phase, 0);
    pv_stage = st.stage;  // tile 0's stage: the first P.V adds zeros times V(0)
    turns.start();
    Bar::wait(&pipe.q_full, q_round & 1u);
    ++q_round;
    if (it == 0) JNA_TRACE(tr, kTraceQReady);
    // Not unrolled: the P.V wait after the softmax branches on n's parity, which an unroll by two
    // would make constant (ptxas would then hoist the wait above that work again).
#pragma unroll 1
    for (int32_t n = 0; n < n_tiles; ++n) {
      Bar::wait(&pipe.full[st.stage], st.phase);
      if (it == 0 && n == 0) JNA_TRACE(tr, kTraceFirstKV);
      cutlass::arch::fence_view_async_shared();  // cp.async writes -> wgmma (async proxy) reads
      // Only lane 0 reads the stage's flags (and passes them on): it is the lane that releases the
      // stage, so its release covers every read of them before the producer rewrites them.
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
      // After the tile's S (or without one), this warp's GEMMs on Q are done: on the last tile the
      // Q tile goes back to the producer, whose next Q then lands while this one's P.V, softmax and
      // stores finish.
      if (!((active >> wg_warp0) & 0xfu)) {  // uniform over the warpgroup
        if (last && lane == 0) Bar::arrive(&pipe.q_empty);
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
        if (last && lane == 0) Bar::arrive(&pipe.q_empty);

        Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
        if (!full) {
#pragma unroll
          for (int a = 0; a < 3; ++a) org[a] = __shfl_sync(0xffffffffu, org[a], 0);
          mask_tile<Traits>(s_rc, sm.win, p.pr, n_window_tiles, n, org, warp, lane);
        }
        float alpha[kRows];
        const bool moved = softmax.update_scores(s_rc, p.scale_log2, alpha);
        // P.V(n - 1) completes here, after the softmax, in the arms of a branch on the tile's
        // parity, uniform over the warpgroup (a wait in the softmax's block was scheduled ahead of
        // it: see wgmma_wait_in_arm). A branch on "any row of the warpgroup moved" needed a
        // 128-thread vote per tile: 0.5-2.5% slower (H100, session 33). Each warp then rescales only
        // if its own rows moved (alpha = 1 otherwise).
        if (n & 1)
          wgmma_wait_in_arm<0, 0>(acc_o, tOrP);
        else
          wgmma_wait_in_arm<0, 1>(acc_o, tOrP);
        if (moved) OnlineSoftmax<kRows>::rescale(acc_o_rc, alpha);
        convert_fragment_into(acc_s, rP);  // same layout as acc_s
      }
      // The P.V just waited for read V(n - 1): its stage goes back to the producer.
      if (n > 0 && lane == 0) Bar::arrive(&pipe.empty[pv_stage]);
      pv_stage = st.stage;
      st.advance();
    }
    issue_pv();
    wgmma_wait<0>(acc_o, tOrP);
    if (lane == 0) Bar::arrive(&pipe.empty[pv_stage]);  // the last stage goes back to the producer
    if (it == 0) JNA_TRACE(tr, kTraceLoopDone);

    float lse[kRows];
    softmax.finalize(acc_o_rc, p.scale, lse);
    int64_t row_off[kRows];  // element offsets of this thread's output rows (-1: outside the group)
#pragma unroll
    for (int r = 0; r < kRows; ++r) row_off[r] = TS::q_row_offset(p.pr, origin, acc_row<Traits::kNWarps>(r, warp, lane));
    acc_to_rows(acc_o_rc, static_cast<Element*>(p.out), row_off, lane);
    if ((lane & 3) == 0) {
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        if (row_off[r] >= 0) p.lse[row_off[r] / kD] = lse[r];  // [B, N, H] row index = element offset / D
    }
#if defined(JNA_FWD_TRACE)
    if (it == 0) trace_end(tr, n_tiles);
#endif
  }
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1) fused_fwd_sm90_kernel(const __grid_constant__ HopperFwdParams hp) {
#if defined(JNA_SM90A_DEVICE)
  extern __shared__ __align__(1024) char smem_raw[];
  const FwdSmem<Traits> sm(smem_raw);
  auto& pipe = *reinterpret_cast<FwdPipeline<Traits::kStages>*>(smem_raw + Traits::kOffBarriers);
  const int tid = threadIdx.x;
  CtaTrace* tr = nullptr;  // the trace record of this CTA, on the threads that write it
#if defined(JNA_FWD_TRACE)
  if (tid == 0 || tid == Traits::kLoadThreads) tr = trace_slot(hp.trace);
  if (tid == 0) trace_begin(tr);
#endif
  if (tid == 0) pipe.init(Traits::kLoadThreads, Traits::kNWarps, Traits::kNWarps);
  __syncthreads();  // the mbarriers' init
  if (__shfl_sync(0xffffffffu, tid / Traits::kLoadThreads, 0) == 0) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    fwd_produce<Traits>(hp, sm, pipe, tid, tr);
  } else {
    cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
    fwd_consume<Traits>(hp, sm, pipe, tid - Traits::kLoadThreads, tr);
  }
#elif defined(__CUDA_ARCH__)
  asm volatile("trap;");
#endif
}

}  // namespace fused
}  // namespace jax_na
