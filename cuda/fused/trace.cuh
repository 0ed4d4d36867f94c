// Per-CTA phase timestamps of the forward kernels (Hopper and portable), for experiments only:
// compiled in with -DJNA_FWD_TRACE (cuda/fused/test_fused_fwd.cu --trace reads them back and prints
// where a CTA's time goes). Without the definition every trace point compiles to nothing. The
// portable kernel records entry, scheduled (after its whole prologue), first_kv, loop_done and
// epilogue on thread 0.
#pragma once

#include <cstdint>

namespace jax_na {
namespace fused {

// Phases, in the order a CTA passes them (producer points on the producer's thread 0, the others on
// thread 0 of the first consumer warp).
enum TracePoint : int {
  kTraceEntry = 0,      // kernel entry (thread 0)
  kTraceScheduled,      // after the schedule's CTA barrier
  kTraceQIssued,        // producer: Q gathers issued
  kTraceQReady,         // consumer: Q landed
  kTraceFirstKV,        // consumer: first K/V stage landed
  kTraceLoopDone,       // consumer: main loop done
  kTraceEpilogueDone,   // consumer: O and lse stored
  kTraceProducerDone,   // producer: last tile issued
  kTracePoints
};

struct CtaTrace {
  uint32_t smid;
  int32_t n_tiles;
  uint64_t t_begin;              // %globaltimer (ns) at entry
  uint64_t t_end;                // %globaltimer (ns) after the epilogue
  int64_t clk[kTracePoints];     // clock64 (SM cycles) at each point
};

// Where a launch records (one CtaTrace per CTA, linear block index below capacity); buf == nullptr:
// nowhere.
struct FwdTrace {
  CtaTrace* buf = nullptr;
  int64_t capacity = 0;
};

#if defined(JNA_FWD_TRACE)
// Host: the buffer the next launches record into (defined by the program that reads it).
FwdTrace fwd_trace_target();

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ CtaTrace* trace_slot(const FwdTrace& t) {
  const int64_t id = blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
  return (t.buf != nullptr && id < t.capacity) ? t.buf + id : nullptr;
}
#define JNA_TRACE(tr, point)                         \
  do {                                               \
    if ((tr) != nullptr) (tr)->clk[point] = clock64(); \
  } while (0)
// A CTA's first record (entry clock, start time, SM) and its last (epilogue done, end time, tiles).
__device__ __forceinline__ void trace_begin(CtaTrace* tr) {
  if (tr == nullptr) return;
  tr->clk[kTraceEntry] = clock64();
  tr->t_begin = global_timer_ns();
  uint32_t smid;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
  tr->smid = smid;
}
__device__ __forceinline__ void trace_end(CtaTrace* tr, int32_t n_tiles) {
  if (tr == nullptr) return;
  tr->clk[kTraceEpilogueDone] = clock64();
  tr->t_end = global_timer_ns();
  tr->n_tiles = n_tiles;
}
#else
#define JNA_TRACE(tr, point) \
  do {                       \
  } while (0)
#endif

}  // namespace fused
}  // namespace jax_na
