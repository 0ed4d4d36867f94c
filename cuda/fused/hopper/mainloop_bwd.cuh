// The Hopper (sm90a) fused backward with dQ in the key-stationary kernel, warp-specialized: five
// products per (Q tile, K/V tile) pair where the deterministic backward runs seven (its dQ kernel
// recomputes S and dP), with dQ's reduction off the MMA warps' path.
//
// One CTA = 128 keys (a KV tile; or 128 additional keys), 384 threads:
//   producer warpgroup (threads 0-127): warp 0 loads each Q tile of the CTA's inverse neighbourhood
//     into a 2-stage ring (Q and dO by TMA where the problem allows, else cp.async gathers; lse and
//     delta by cp.async), warp 1 adds each Q tile's dQ from smem into the float32 buffer with bulk
//     reductions (cp.reduce.async.bulk, one per run of consecutive tokens: head-major rows), warps 2-3 idle;
//   two consumer warpgroups (threads 128-383), 64 keys each, per Q tile (keys as MMA rows):
//     S^T = K Q^T, dP^T = V dO^T, P^T = exp(scale S^T - lse) (masked), dS^T = P^T (dP^T - delta)
//     -> smem (from its bf16 registers), dV += P^T dO issued, a 256-thread barrier (dQ needs both
//     warpgroups' keys), dQ = dS K (each warpgroup 64 of its columns) issued, then dK += dS^T Q, and
//     dQ goes to smem for warp 1 while dK runs. This is FlashAttention-3's order; the order that
//     issued dV and dK before the barrier and waited for all three products before dQ's stores was
//     6-8% slower (H100, session 45).
// dQ sums go to the buffer in whatever order the CTAs reach it: not deterministic (the deterministic
// mode keeps the dQ kernel, launch_bwd.cuh). dK = scale * sum; dQ / scale is what the buffer holds
// (the conversion kernel scales it).
//
// mbarriers (hopper/pipeline.cuh terms): full[s] (Q tile in stage s landed: 32 cp.async arrivals of
// warp 0 plus lane 0's, carrying the TMA bytes), empty[s] (every consumer thread is done with stage
// s), dq_full (every consumer thread wrote its dQ values), dq_empty (warp 1's reductions have read
// the dQ tile: one arrival per lane).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <cstdint>

#include "fused/bwd_tile_math.cuh"
#include "fused/copy.cuh"
#include "fused/epilogue.cuh"
#include "fused/fused_bwd.h"  // kDqAccumPad: dq_accum's rows
#include "fused/hopper/gemm.cuh"
#include "fused/kernel_traits.cuh"  // before tma.cuh: tile_scheduler.cuh takes its Box
#include "fused/hopper/tma.cuh"
#include "fused/mask.cuh"
#include "fused/params.cuh"
#include "fused/softmax.cuh"
#include "fused/tile_scheduler.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define JNA_SM90A_BWD_DEVICE 1
#endif

namespace jax_na {
namespace fused {

// KV: BwdKVTraits of the consumers (8 warps, 128 keys, Q tiles of 64, dQ in the kernel). The
// producer warp's gathers take 32 threads (load_rows_pair reads kLoadThreads / kLoadRowsPerPass).
template <class KV>
struct HopperBwdTraits : KV {
  static_assert(KV::kNWarps == 8 && KV::kBlockN == 128 && KV::kBlockM == 64 && KV::kDPasses == 1,
                "two consumer warpgroups of 64 keys, 64-query steps, head dims up to 128");
  using ConsumerTraits = KV;  // K/V gathers by the 256 consumer threads
  static constexpr int kConsumerThreads = KV::kNThreads;
  static constexpr int kProducerThreads = 128;
  static constexpr int kLaunchThreads = kConsumerThreads + kProducerThreads;
  static constexpr int kLoadThreads = 32;
  static constexpr int kLoadRowsPerPass = kLoadThreads / KV::kChunks;
  static constexpr int kLoadUnroll = 2;
  // 168 registers per thread at launch (384 threads); the producer gives back 128 of its 168.
#if defined(JNA_BWD_EXPERIMENT_WS_REGS_240)  // experiment knob: the consumers at setmaxnreg's maximum
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
#else
  static constexpr int kProducerRegs = 40;
  static constexpr int kConsumerRegs = 232;
#endif
  static_assert(kProducerThreads * kProducerRegs + kConsumerThreads * kConsumerRegs <= 65536, "setmaxnreg budget");
  // dQ tile rows in smem: kHeadDim floats plus 8 of padding (the fragment's float2 stores of 8 rows
  // then hit distinct banks), as dq_accum's rows (kDqAccumPad): a run of rows is one bulk reduction.
  static constexpr int kDqRowFloats = KV::kHeadDim + 8;
  static constexpr int kSmemDS = KV::kBlockN * KV::kBlockM * int(sizeof(typename KV::Element));  // dS^T
};

// Shared memory: K, V, 2 stages of Q and dO, 2 of dS^T, the dQ tile, 2 stages of (lse, delta), the
// keys' query intervals, the schedule, the mbarriers.
template <class Traits>
struct BwdSm90Smem {
  static constexpr int kK = 0;
  static constexpr int kV = kK + Traits::kSmemKV;
  static constexpr int kQ = kV + Traits::kSmemKV;
  static constexpr int kDO = kQ + 2 * Traits::kSmemQ;
  static constexpr int kDS = kDO + 2 * Traits::kSmemQ;
  static constexpr int kDQ = kDS + 2 * Traits::kSmemDS;
  static constexpr int kSmall = kDQ + Traits::kBlockM * Traits::kDqRowFloats * 4;
  static constexpr int kSmallStage = 2 * Traits::kBlockM * 4;  // lse, delta
  static constexpr int kInv = kSmall + 2 * kSmallStage;
  static constexpr int kSched = kInv + Traits::kInvEntries * 8;
  static constexpr int kBars = (kSched + 256 + 7) / 8 * 8;
  static constexpr int kBytes = kBars + 6 * 8;
  static_assert(kBytes <= 232448, "227 KB of dynamic shared memory");
  static_assert(Traits::kSmemKV % 1024 == 0 && Traits::kSmemQ % 1024 == 0 && Traits::kSmemDS % 1024 == 0,
                "tile alignment");
};

struct BwdSm90Barriers {
  uint64_t full[2];
  uint64_t empty[2];
  uint64_t dq_full;
  uint64_t dq_empty;
};

// Named barrier of the two consumer warpgroups (dS^T written). Id 0 is __syncthreads.
constexpr uint32_t kBwdDsBarrierId = 1;

__device__ __forceinline__ void bulk_reduce_add_f32(float* gmem, const float* smem, uint32_t bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(gmem), "r"(s),
               "r"(bytes)
               : "memory");
}

template <class Traits>
__global__ void __launch_bounds__(Traits::kLaunchThreads, 1) fused_bwd_sm90_kernel(const __grid_constant__ BwdKernelParams p) {
#if defined(JNA_SM90A_BWD_DEVICE)
  using namespace cute;
  using Bar = cutlass::arch::ClusterBarrier;
  using Element = typename Traits::Element;
  using KV = typename Traits::ConsumerTraits;
  using L = BwdSm90Smem<Traits>;
  using KS = KVScheduler<KV>;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kD = Traits::kHeadDim;

  extern __shared__ __align__(1024) char smem_raw[];
  Element* sK = reinterpret_cast<Element*>(smem_raw + L::kK);
  Element* sV = reinterpret_cast<Element*>(smem_raw + L::kV);
  KVSchedule& ks = *reinterpret_cast<KVSchedule*>(smem_raw + L::kSched);
  static_assert(sizeof(KVSchedule) <= 256, "schedule smem");
  BwdSm90Barriers& bars = *reinterpret_cast<BwdSm90Barriers*>(smem_raw + L::kBars);
  auto sQ = [&](int s) { return reinterpret_cast<Element*>(smem_raw + L::kQ + s * Traits::kSmemQ); };
  auto sdO = [&](int s) { return reinterpret_cast<Element*>(smem_raw + L::kDO + s * Traits::kSmemQ); };
  auto sdS = [&](int s) { return reinterpret_cast<Element*>(smem_raw + L::kDS + s * Traits::kSmemDS); };
  float* sdQ = reinterpret_cast<float*>(smem_raw + L::kDQ);
  auto s_lse = [&](int s) { return reinterpret_cast<float*>(smem_raw + L::kSmall + s * L::kSmallStage); };
  auto s_dlt = [&](int s) { return s_lse(s) + kBlockM; };
  int2* s_inv = reinterpret_cast<int2*>(smem_raw + L::kInv);

  const int tid = threadIdx.x;
  if (tid == 0) {
    Bar::init(&bars.full[0], 33);
    Bar::init(&bars.full[1], 33);
    Bar::init(&bars.empty[0], Traits::kConsumerThreads);
    Bar::init(&bars.empty[1], Traits::kConsumerThreads);
    Bar::init(&bars.dq_full, Traits::kConsumerThreads);
    Bar::init(&bars.dq_empty, 32);
    cutlass::arch::fence_barrier_init();
  }
  KS::compute(p.pr, p.kv_grid, p.n_window_ctas, ks, tid);
  __syncthreads();  // schedule and mbarriers
  if (!ks.live) return;  // uniform over the CTA
  const geo::Problem& pr = p.pr;
  const int32_t n_iters = __shfl_sync(0xffffffffu, pr.groups() * ks.n_q_tiles, 0);
  auto kv_off = [&](int r) { return KS::kv_row_offset(pr, ks, r); };

  if (__shfl_sync(0xffffffffu, tid / Traits::kProducerThreads, 0) == 0) {
    // ---------------------------------------------------------------- producer warpgroup
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegs>();
    const int warp = __shfl_sync(0xffffffffu, tid / 32, 0);
    const int lane = tid % 32;
    if (warp == 0) {
      QTileWalker<KV> walker;
      for (int32_t i = 0; i < n_iters; ++i) {
        const int s = i & 1;
        if (i >= 2) Bar::wait(&bars.empty[s], ((i >> 1) & 1) ^ 1);
        int32_t org[3];
        walker.origin(ks, org);
        const bool tma = p.q_tma && !ks.is_add && box_fits_tma<Traits::kRank, typename Traits::QTile>(pr, org);
        if (lane == 0) {
          if (tma) {
            cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&bars.full[s], 2 * Traits::kSmemQ);
            load_q_do_tma<Traits>(p.q_maps, pr, ks.hkv * pr.groups() + walker.head, static_cast<int32_t>(ks.b), org,
                                  sQ(s), sdO(s), &bars.full[s]);
          } else {
            Bar::arrive(&bars.full[s]);
          }
        }
        auto gather = [&](const auto& rows) {
          if (!tma)
            load_rows_pair<Traits, kBlockM, Element, typename Traits::SmemLayoutQ>(
                sQ(s), static_cast<const Element*>(p.q), sdO(s), static_cast<const Element*>(p.d_out), lane, rows);
#pragma unroll
          for (int r = lane; r < kBlockM; r += 32) {
            const int64_t off = rows(r);
            const int64_t row = off >= 0 ? off / kD : 0;  // [B, N, H] row = element offset / D
            cp_async_4(s_lse(s) + r, p.lse + row, off >= 0);
            cp_async_4(s_dlt(s) + r, p.delta + row, off >= 0);
          }
        };
        if (ks.is_add)
          gather(walker.token_rows(ks, org));
        else
          gather(walker.window_rows(ks, org));
        cutlass::arch::cpasync_barrier_arrive_noinc(&bars.full[s]);
        walker.advance(ks);
      }
      cp_async_wait<0>();
    } else if (warp == 1) {
      // dQ of each Q tile into dq_accum's head-major rows (fused_bwd.h): one bulk reduction per run of
      // smem rows whose query rows follow each other there, i.e. consecutive tokens of the tile's
      // head (a 1-D tile is one run, a 2-D or 3-D tile one per line of its box along the last axis;
      // dilation leaves runs of one row). Rows past the data or outside the group are skipped.
      constexpr int kRowFloats = Traits::kDqRowFloats;
      static_assert(kRowFloats == kD + kDqAccumPad, "the smem dQ rows are dq_accum's");
      static_assert(kBlockM == 64, "two rows per lane: 64-bit row masks");
      // dq_accum's rows of a tile: the walker's box (the same positions and limits) over head-major
      // rows: q's token steps (multiples of H D elements) become steps of kRowFloats per token, and
      // the base is the group's first token of the tile's head. Divisions once per CTA, none per tile.
      const int64_t G = pr.groups(), H = pr.H, N = pr.N;
      const int64_t tok0 = (ks.q_base / kD - ks.hkv * G) / H - ks.b * N;  // the group's first token
      const int64_t acc_base = ((ks.b * H + ks.hkv * G) * N + tok0) * kRowFloats;
      int64_t acc_step[3];
#pragma unroll
      for (int a = 0; a < 3; ++a) acc_step[a] = ks.q_step[a] / (H * kD) * kRowFloats;
      QTileWalker<KV> walker;
      for (int32_t i = 0; i < n_iters; ++i) {
        int32_t org[3];
        walker.origin(ks, org);
        const int64_t base = acc_base + static_cast<int64_t>(walker.head) * N * kRowFloats;
        int64_t acc[2];  // dq_accum offset of the tile's rows lane and lane + 32, or -1 for no row
        auto offsets = [&](auto rows) {
          rows.base = base;
#pragma unroll
          for (int a = 0; a < 3; ++a) rows.step[a] = acc_step[a];
#pragma unroll
          for (int j = 0; j < 2; ++j) acc[j] = rows(lane + 32 * j);
        };
        if (ks.is_add)
          offsets(walker.token_rows(ks, org));
        else
          offsets(walker.window_rows(ks, org));
        walker.advance(ks);
        // Row r continues a run when row r - 1 holds the dq_accum row before its own.
        const int64_t last_of_first_half = __shfl_sync(0xffffffffu, acc[0], 31);
        bool cont[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          int64_t prev = __shfl_up_sync(0xffffffffu, acc[j], 1);
          if (lane == 0) prev = j == 0 ? -1 : last_of_first_half;
          cont[j] = acc[j] >= 0 && prev >= 0 && acc[j] == prev + kRowFloats;
        }
        const uint64_t cont_rows = uint64_t(__ballot_sync(0xffffffffu, cont[0])) |
                                   (uint64_t(__ballot_sync(0xffffffffu, cont[1])) << 32);
        Bar::wait(&bars.dq_full, i & 1);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int r = lane + 32 * j;
          const uint64_t anew = r == 63 ? 0 : ~cont_rows >> (r + 1);  // bit k: row r + 1 + k starts anew
          const int len = anew ? __ffsll(static_cast<long long>(anew)) : 64 - r;
#if defined(JNA_BWD_EXPERIMENT_WS_NO_REDUCE)  // experiment knob: the reductions' cost (dQ stays 0)
          if (acc[j] >= 0 && !cont[j] && p.scale == 12345.f)
#else
          if (acc[j] >= 0 && !cont[j])
#endif
            bulk_reduce_add_f32(p.dq_accum + acc[j], sdQ + r * kRowFloats, len * kRowFloats * 4);
        }
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
        Bar::arrive(&bars.dq_empty);
      }
      asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    }
    return;
  }

  // ---------------------------------------------------------------- consumer warpgroups
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegs>();
  const int ctid = tid - Traits::kProducerThreads;
  const int warp = __shfl_sync(0xffffffffu, ctid / 32, 0);
  const int lane = ctid % 32;
  load_rows<KV, kBlockN, Element, typename KV::SmemLayoutKV>(
      sK, static_cast<const Element*>(ks.is_add ? p.add_k : p.k), ctid, kv_off);
  load_rows<KV, kBlockN, Element, typename KV::SmemLayoutKV>(
      sV, static_cast<const Element*>(ks.is_add ? p.add_v : p.v), ctid, kv_off);
  cp_async_commit();
  if (!ks.is_add) InverseRangeTable<KV>::store(pr, ks, s_inv, ctid);
  using Gemm = Sm90Gemm<KV>;
  Gemm gemm(ctid);
  const uint32_t key_rows = key_row_bits<KV::kNWarps>(gemm.template acc<kBlockN, kBlockM>(), kv_off, warp, lane);
  cp_async_wait<0>();
  gemm.fence_smem_writes();
  cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, kBwdDsBarrierId);  // K, V, s_inv visible

  auto acc_dk = gemm.template acc<kBlockN, kD>();
  auto acc_dv = gemm.template acc<kBlockN, kD>();
  Tensor dk_rc = make_tensor(acc_dk.data(), row_col(acc_dk.layout()));
  Tensor dv_rc = make_tensor(acc_dv.data(), row_col(acc_dv.layout()));
  clear(acc_dk);
  clear(acc_dv);
  Tensor dq_coord = gemm.template coords_tn<kBlockM, kD>();  // (row, column) of each dQ value
  QTileWalker<KV> walker;
#pragma unroll 1
  for (int32_t i = 0; i < n_iters; ++i) {
    const int s = i & 1;
    int32_t org[3];
    walker.origin(ks, org);
    walker.advance(ks);
    const bool full = ks.is_add || KS::q_tile_full(ks, org);
    Bar::wait(&bars.full[s], (i >> 1) & 1);
    gemm.fence_smem_writes();  // gathered (cp.async) Q/dO -> wgmma reads

    auto acc_s = gemm.template acc<kBlockN, kBlockM>();
    auto acc_dp = gemm.template acc<kBlockN, kBlockM>();
    Tensor s_rc = make_tensor(acc_s.data(), row_col(acc_s.layout()));
    Tensor dp_rc = make_tensor(acc_dp.data(), row_col(acc_dp.layout()));
    Tensor rP = make_tensor_like<Element>(acc_s);
    Tensor rdS = make_tensor_like<Element>(acc_dp);
    // Order (as FlashAttention-3's backward): dS^T is written and dV issued before the warpgroups
    // meet, dQ is issued before dK, and dQ goes to smem while dK runs.
    gemm.template ss<kBlockN, kBlockM>(acc_s, sK, sQ(s));
    gemm.template ss<kBlockN, kBlockM>(acc_dp, sV, sdO(s));
    gemm.template wait<1>(acc_s);  // S^T done, dP^T may still run
    if (!full) mask_inverse_tile<KV>(s_rc, s_inv, org, warp, lane);
    probabilities_t(s_rc, s_lse(s), p.scale_log2, lane);
    convert_fragment_into(acc_s, rP);
    gemm.template wait<0>(acc_dp);
    score_grads_t(dp_rc, s_rc, s_dlt(s), lane);
    zero_rows_outside(dp_rc, key_rows);  // (dK rows of keys past the data are never stored)
    convert_fragment_into(acc_dp, rdS);
    // dS^T (both warpgroups' 64 key rows) for dQ = dS K. Stage i & 1: the other warpgroup's dQ of
    // tile i - 1 may still read the other stage; the one of tile i - 2 completed before that
    // warpgroup reached tile i - 1's barrier.
    // The lane through an opaque move: its swizzled addresses are then computed here, per tile, rather
    // than hoisted out of the loop (16 registers, which ptxas spilled and reloaded per tile).
    int lane_here;
    asm volatile("mov.b32 %0, %1;" : "=r"(lane_here) : "r"(lane));
    frag_to_smem<KV::kNWarps, typename KV::template SmemLayoutRows<kBlockN, kBlockM>>(
        make_tensor(rdS.data(), row_col(rdS.layout())), sdS(s), warp, lane_here);
    gemm.template rs<kBlockM>(acc_dv, rP, sdO(s));  // dV += P^T dO, in flight across the barrier
    gemm.fence_smem_writes();
    cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, kBwdDsBarrierId);
    auto acc_dq = gemm.template acc_tn<kBlockM, kD>();  // this warpgroup's kD / 2 columns
#if defined(JNA_BWD_EXPERIMENT_WS_NO_DQ)  // experiment knob: the dQ product's cost (wrong dQ)
    clear(acc_dq);
#else
    gemm.template tn<kBlockM, kBlockN, kD>(acc_dq, sdS(s), sK);
#endif
    gemm.template wait<1>(acc_dv, rP);              // dV done, dQ in flight
    gemm.template rs<kBlockM>(acc_dk, rdS, sQ(s));  // dK += dS^T Q
    gemm.template wait<1>(acc_dq);                  // dQ done, dK in flight
    if (i > 0) Bar::wait(&bars.dq_empty, (i - 1) & 1);
    static_assert(decltype(size(acc_dq))::value % 2 == 0, "column pairs");
    // A thread's values sit at fixed offsets from its first one: one base address and immediates
    // (the coordinates themselves, hoisted out of the loop, spilled).
    const int row0 = get<0>(dq_coord(0)), col0 = get<1>(dq_coord(0));
    float* dq_base = sdQ + row0 * Traits::kDqRowFloats + col0;
#pragma unroll
    for (int v = 0; v < size(acc_dq); v += 2)
      *reinterpret_cast<float2*>(dq_base + (get<0>(dq_coord(v)) - row0) * Traits::kDqRowFloats +
                                 (get<1>(dq_coord(v)) - col0)) = make_float2(acc_dq(v), acc_dq(v + 1));
    cutlass::arch::fence_view_async_shared();  // for warp 1's bulk reductions (async proxy)
    Bar::arrive(&bars.dq_full);
    gemm.template wait<0>(acc_dk, rdS);
    Bar::arrive(&bars.empty[s]);  // Q, dO, lse, delta of stage s read
  }

  // Epilogue: dK * scale and dV -> smem (over K and V) -> rows of dk/dv (or d_add_k/d_add_v).
  if (n_iters > 0) Bar::wait(&bars.dq_empty, (n_iters - 1) & 1);  // nothing else reads smem after this
  cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, kBwdDsBarrierId);  // every wgmma on K/V done
  using OutLayout = typename KV::template SmemLayoutRows<kBlockN>;
  acc_to_smem<KV::kNWarps, Element, OutLayout>(dk_rc, sK, p.scale, warp, lane);
  acc_to_smem<KV::kNWarps, Element, OutLayout>(dv_rc, sV, 1.f, warp, lane);
  cutlass::arch::NamedBarrier::sync(Traits::kConsumerThreads, kBwdDsBarrierId);
  store_rows<KV, kBlockN, OutLayout>(static_cast<Element*>(ks.is_add ? p.d_add_k : p.dk), sK, ctid, kv_off);
  store_rows<KV, kBlockN, OutLayout>(static_cast<Element*>(ks.is_add ? p.d_add_v : p.dv), sV, ctid, kv_off);
#elif defined(__CUDA_ARCH__)
  asm volatile("trap;");
#endif
}

}  // namespace fused
}  // namespace jax_na
