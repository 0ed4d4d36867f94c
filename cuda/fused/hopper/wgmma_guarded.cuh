// A warpgroup MMA that runs or not by a runtime condition without a branch around it: the guard
// predicate of the instruction itself (PTX `@q wgmma.mma_async`). For the Hopper forward's P.V over
// the second half of a tile's keys, skipped where a warpgroup computed one half only
// (-DJNA_SM90_HALF_TILES_PV, hopper/mainloop_fwd.cuh): a branch choosing between two P.V shapes
// made ptxas serialize every wgmma of the kernel (C7513; cuda/fused/NOTES.md, session 34), while a
// guarded wgmma only closes the wgmma group before it (a probe kernel's SASS: the guarded HGMMA
// gets a branch of its own and the one before it a gsb0, with no serialization warning).
//
// One m64nNk16 product: float accumulators d (a warpgroup's 64 x N fragment, in CuTe's register
// order), A from registers (4 words of K-major 16-bit pairs), B an MN-major (transposed) smem
// descriptor, accumulating; it runs where `run` is nonzero, which must be uniform over the warpgroup.
#pragma once

#include <cutlass/numeric_types.h>

#include <cstdint>
#include <type_traits>

namespace jax_na {
namespace fused {

// Operand lists: N / 2 accumulators, then A's 4 words, B's descriptor and the guard.
#define JNA_RS_ACC32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define JNA_RS_ACC64 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, " \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63"
#define JNA_RS_REST32 "{%32, %33, %34, %35}, %36", "%37"
#define JNA_RS_REST64 "{%64, %65, %66, %67}, %68", "%69"
#define JNA_RS_ASM2(SHAPE_TY, ACCS, AB, GUARD, ...)                                                      \
  asm volatile("{\n.reg .pred p, q;\nsetp.ne.b32 q, " GUARD ", 0;\nsetp.ne.b32 p, 1, 0;\n"               \
               "@q wgmma.mma_async.sync.aligned." SHAPE_TY " {" ACCS "}, " AB ", p, 1, 1, 1;\n}\n"          \
               : __VA_ARGS__                                                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(run))
#define JNA_RS_ASM(SHAPE_TY, ACCS, REST, ...) JNA_RS_ASM2(SHAPE_TY, ACCS, REST, __VA_ARGS__)
#define JNA_F8(b)                                                                                        \
  "+f"(d[(b)]), "+f"(d[(b) + 1]), "+f"(d[(b) + 2]), "+f"(d[(b) + 3]), "+f"(d[(b) + 4]), "+f"(d[(b) + 5]), \
      "+f"(d[(b) + 6]), "+f"(d[(b) + 7])
#define JNA_F32 JNA_F8(0), JNA_F8(8), JNA_F8(16), JNA_F8(24)
#define JNA_F64 JNA_F32, JNA_F8(32), JNA_F8(40), JNA_F8(48), JNA_F8(56)

template <class Element, int N>
__device__ __forceinline__ void wgmma_rs_guarded(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc,
                                                 uint32_t run) {
  static_assert(N == 64 || N == 128, "N: the head dims of the Hopper forward");
  constexpr bool kBF16 = std::is_same_v<Element, cutlass::bfloat16_t>;
  static_assert(kBF16 || std::is_same_v<Element, cutlass::half_t>, "16-bit operands");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (N == 64 && kBF16)
    JNA_RS_ASM("m64n64k16.f32.bf16.bf16", JNA_RS_ACC32, JNA_RS_REST32, JNA_F32);
  else if constexpr (N == 64)
    JNA_RS_ASM("m64n64k16.f32.f16.f16", JNA_RS_ACC32, JNA_RS_REST32, JNA_F32);
  else if constexpr (kBF16)
    JNA_RS_ASM("m64n128k16.f32.bf16.bf16", JNA_RS_ACC64, JNA_RS_REST64, JNA_F64);
  else
    JNA_RS_ASM("m64n128k16.f32.f16.f16", JNA_RS_ACC64, JNA_RS_REST64, JNA_F64);
#else
  (void)d, (void)a, (void)desc, (void)run;
#endif
}

#undef JNA_F64
#undef JNA_F32
#undef JNA_F8
#undef JNA_RS_ASM
#undef JNA_RS_ASM2
#undef JNA_RS_REST64
#undef JNA_RS_REST32
#undef JNA_RS_ACC64
#undef JNA_RS_ACC32

}  // namespace fused
}  // namespace jax_na
