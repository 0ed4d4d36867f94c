// The producer -> consumer pipeline of the warp-specialized Hopper forward (mbarriers in smem), and
// the TMA stages of the backward kernels.
//
// q_full: the Q tile landed: one cp.async arrival per producer thread (immediate when the tile came
//   by TMA) plus one ordinary arrival of producer thread 0, carrying the TMA transaction bytes when
//   the tile came by TMA.
// full[s]: K/V stage s landed and its TileFlags are written: one cp.async arrival per producer
//   thread (immediate when the tile came by TMA) plus one ordinary arrival of the thread that wrote
//   the flags (which releases them), carrying the TMA transaction bytes when the tile came by TMA.
// empty[s]: every consumer warp is done with stage s (one arrival per consumer warp).
// The ring runs on over the Q tiles of a persistent CTA: K/V tile n of the CTA's whole walk lives in
// stage n % kStages; its round r = n / kStages decides the parities: consumers wait for completion r
// of full[s], the producer (from round 1 on) for completion r - 1 of empty[s].
// Per Q tile of the CTA (completion i for its i-th tile, or its i-th live tile for the Q barriers):
// sched_full: the CtaSchedule is written (one arrival per schedule thread);
// sched_empty: every consumer warp has taken what it needs of the schedule (one arrival per warp);
// q_empty: every consumer warp's GEMMs that read the Q tile are done (one arrival per warp).
#pragma once

#include <cutlass/arch/barrier.h>

#include <cstdint>

namespace jax_na {
namespace fused {

template <int kStages>
struct FwdPipeline {
  uint64_t q_full;
  uint64_t q_empty;
  uint64_t sched_full;
  uint64_t sched_empty;
  uint64_t full[kStages];
  uint64_t empty[kStages];

  // One thread; a CTA barrier must follow before any other use.
  __device__ __forceinline__ void init(int producer_threads, int consumer_warps, int schedule_threads) {
    using Bar = cutlass::arch::ClusterBarrier;
    Bar::init(&q_full, producer_threads + 1);
    Bar::init(&q_empty, consumer_warps);
    Bar::init(&sched_full, schedule_threads);
    Bar::init(&sched_empty, consumer_warps);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      Bar::init(&full[s], producer_threads + 1);
      Bar::init(&empty[s], consumer_warps);
    }
    cutlass::arch::fence_barrier_init();
  }
};

// The two stages of a double-buffered load of the backward kernels, either of which may come by TMA:
// an mbarrier per stage, completed by one arrival of the issuing thread (carrying the TMA bytes when
// the stage came by TMA). Every thread waits for it, then meets the others at the CTA barrier that
// also covers their own cp.async writes (lse/delta, gathered tiles).
struct LoadStages2 {
  uint64_t* bar;        // 2 mbarriers in smem
  uint32_t phases = 0;  // bit s: the parity of stage s's next completion

  __device__ __forceinline__ explicit LoadStages2(void* smem) : bar(static_cast<uint64_t*>(smem)) {}
  // One thread; a CTA barrier must follow before any other use.
  __device__ __forceinline__ void init() const {
    cutlass::arch::ClusterBarrier::init(&bar[0], 1);
    cutlass::arch::ClusterBarrier::init(&bar[1], 1);
    cutlass::arch::fence_barrier_init();
  }
  // The issuing thread, before its TMA copies into stage s: tma_bytes of them (0: none).
  __device__ __forceinline__ void arrive(int s, uint32_t tma_bytes) const {
    if (tma_bytes != 0)
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&bar[s], tma_bytes);
    else
      cutlass::arch::ClusterBarrier::arrive(&bar[s]);
  }
  __device__ __forceinline__ void wait(int s) {
    cutlass::arch::ClusterBarrier::wait(&bar[s], (phases >> s) & 1u);
    phases ^= 1u << s;
  }
};

// Stage index and round parity of a walk over the tiles.
template <int kStages>
struct PipelineState {
  int stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

}  // namespace fused
}  // namespace jax_na
