// The producer -> consumer pipeline of the warp-specialized Hopper forward: mbarriers in smem.
//
// q_full: the Q tile landed: one cp.async arrival per producer thread (immediate when the tile came
//   by TMA) plus one ordinary arrival of producer thread 0, carrying the TMA transaction bytes when
//   the tile came by TMA.
// full[s]: K/V stage s landed and its TileFlags are written: one cp.async arrival per producer
//   thread (immediate when the tile came by TMA) plus one ordinary arrival of the thread that wrote
//   the flags (which releases them), carrying the TMA transaction bytes when the tile came by TMA.
// empty[s]: every consumer warp is done with stage s (one arrival per consumer warp).
// Tile n lives in stage n % kStages; its round r = n / kStages decides the parities: consumers wait
// for completion r of full[s], the producer (from round 1 on) for completion r - 1 of empty[s].
#pragma once

#include <cutlass/arch/barrier.h>

#include <cstdint>

namespace jax_na {
namespace fused {

template <int kStages>
struct FwdPipeline {
  uint64_t q_full;
  uint64_t full[kStages];
  uint64_t empty[kStages];

  // One thread; a CTA barrier must follow before any other use.
  __device__ __forceinline__ void init(int producer_threads, int consumer_warps) {
    using Bar = cutlass::arch::ClusterBarrier;
    Bar::init(&q_full, producer_threads + 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      Bar::init(&full[s], producer_threads + 1);
      Bar::init(&empty[s], consumer_warps);
    }
    cutlass::arch::fence_barrier_init();
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
