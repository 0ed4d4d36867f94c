// Runtime dispatch of the fused kernels over (dtype, head dim, rank) to the compiled instantiations.
#include "fused/fused_bwd.h"
#include "fused/fused_fwd.h"
#include "fused/tile_shapes.cuh"

#include <type_traits>
#include <utility>

namespace jax_na {
namespace fused {

bool fwd_supported(DType dtype, int64_t D, int rank) {
  // Head dims 32 and 256: 16-bit only (float32 tiles of 256 columns exceed the shared memory; float32
  // at head dims up to 32 runs padded to 64, which keeps two of its slowest-compiling units out).
  return (D == 64 || D == 128 || ((D == 32 || D == 256) && dtype != DType::kF32)) && rank >= 1 && rank <= 3;
}

namespace {

// The (dtype, head dim) instantiations the Hopper kernels have: 16-bit, 64 or 128. The one statement
// of it: hopper_supported (runtime), kHasHopperKernels (compile time) and use_hopper ask it.
constexpr bool has_hopper_kernels(DType dtype, int64_t D) { return dtype != DType::kF32 && (D == 64 || D == 128); }

template <DType kDT, int kD>
constexpr bool kHasHopperKernels = has_hopper_kernels(kDT, kD);

}  // namespace

bool hopper_supported(DType dtype, int64_t D) { return has_hopper_kernels(dtype, D); }

namespace {

// Calls f.template run<dtype, D, rank>() for the runtime (dtype, D, rank); every combination that
// fwd_supported accepts is instantiated.
template <class F>
cudaError_t dispatch(DType dtype, int64_t D, int rank, F&& f) {
  if (!fwd_supported(dtype, D, rank)) return cudaErrorInvalidValue;
  auto by_rank = [&](auto dt, auto d) -> cudaError_t {
    constexpr DType kDT = decltype(dt)::value;
    constexpr int kD = decltype(d)::value;
    switch (rank) {
      case 1: return f.template run<kDT, kD, 1>();
      case 2: return f.template run<kDT, kD, 2>();
      default: return f.template run<kDT, kD, 3>();
    }
  };
  auto by_dim = [&](auto dt) -> cudaError_t {
    if (D == 64) return by_rank(dt, std::integral_constant<int, 64>{});
    if constexpr (decltype(dt)::value != DType::kF32) {
      if (D == 32) return by_rank(dt, std::integral_constant<int, 32>{});
      if (D == 256) return by_rank(dt, std::integral_constant<int, 256>{});
    }
    return by_rank(dt, std::integral_constant<int, 128>{});
  };
  switch (dtype) {
    case DType::kF16: return by_dim(std::integral_constant<DType, DType::kF16>{});
    case DType::kBF16: return by_dim(std::integral_constant<DType, DType::kBF16>{});
    default: return by_dim(std::integral_constant<DType, DType::kF32>{});
  }
}

struct FwdCall {
  const geo::Problem& pr;
  const FwdArgs& args;
  cudaStream_t stream;
  bool hopper;
  template <DType kDT, int kD, int kRank>
  cudaError_t run() {
#if defined(JNA_FUSED_WITH_SM90)
    if constexpr (kHasHopperKernels<kDT, kD>)
      if (hopper) return run_fwd_sm90<kDT, kD, kRank>(pr, args, stream);
#endif
    return run_fwd<kDT, kD, kRank>(pr, args, stream);
  }
};

struct BwdCall {
  const geo::Problem& pr;
  const BwdArgs& args;
  cudaStream_t stream;
  bool hopper;
  template <DType kDT, int kD, int kRank>
  cudaError_t run() {
#if defined(JNA_FUSED_WITH_SM90)
    if constexpr (kHasHopperKernels<kDT, kD>)
      if (hopper) return run_bwd_sm90<kDT, kD, kRank>(pr, args, stream);
#endif
    return run_bwd<kDT, kD, kRank>(pr, args, stream);
  }
};

}  // namespace

namespace {

// Copies Configs' descriptions into out[0..max) and returns their count.
template <class Configs, int... I>
int describe_configs(TileConfig* out, int max, std::integer_sequence<int, I...>) {
  const TileConfigDesc all[] = {describe_tiles<typename Configs::template At<I>>()...};
  for (int i = 0; i < Configs::kCount && i < max; ++i) {
    for (int a = 0; a < 3; ++a) {
      out[i].q[a] = all[i].q[a];
      out[i].kv[a] = all[i].kv[a];
      out[i].warp[a] = all[i].warp[a];
    }
  }
  return Configs::kCount;
}

template <class Configs>
int describe_configs(TileConfig* out, int max) {
  return describe_configs<Configs>(out, max, std::make_integer_sequence<int, Configs::kCount>{});
}

// dispatch() callback: the configurations of one instantiation (forward or backward) into out,
// their count into *count.
struct DescribeCall {
  int arch;
  bool forward;
  bool deterministic;  // backward: without it the Hopper set runs its warp-specialized kernel
  TileConfig* out;
  int max;
  int* count;
  template <DType kDT, int kD, int kRank>
  cudaError_t run() {
    *count = 0;
    if (arch == FwdArgs::kPortable) {
      *count = forward ? describe_configs<PortableFwdTilesFor<kDT, kD, kRank>>(out, max)
                       : describe_configs<PortableBwdTiles<kDT, kD, kRank>>(out, max);
    } else if constexpr (kHasHopperKernels<kDT, kD>) {
      *count = forward         ? describe_configs<HopperFwdTiles<kRank>>(out, max)
               : deterministic ? describe_configs<HopperBwdTiles<kRank>>(out, max)
                               : describe_configs<HopperBwdWsTiles<kRank>>(out, max);
    }
    return cudaSuccess;
  }
};

int tile_configs(int arch, bool forward, bool deterministic, DType dtype, int64_t D, int rank, TileConfig* out,
                 int max) {
  if (arch != FwdArgs::kPortable && arch != FwdArgs::kHopper) return 0;
  int count = 0;
  dispatch(dtype, D, rank, DescribeCall{arch, forward, deterministic, out, max, &count});
  return count;
}

}  // namespace

int fwd_tile_configs(int arch, DType dtype, int64_t D, int rank, TileConfig* out, int max) {
  return tile_configs(arch, /*forward=*/true, /*deterministic=*/true, dtype, D, rank, out, max);
}

int bwd_tile_configs(int arch, DType dtype, int64_t D, int rank, TileConfig* out, int max, bool deterministic) {
  return tile_configs(arch, /*forward=*/false, deterministic, dtype, D, rank, out, max);
}

int bwd_tile_configs(int arch, DType dtype, int64_t D, int rank, TileConfig* out, int max) {
  return bwd_tile_configs(arch, dtype, D, rank, out, max, /*deterministic=*/true);
}

bool sm90_available() {
#if defined(JNA_FUSED_WITH_SM90)
  // sm_90a code runs on compute capability 9.0 only; the answer per device is cached.
  static int cached[64] = {};  // 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    int major = 0, minor = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess;
    cached[dev] = (ok && major == 9 && minor == 0) ? 1 : 2;
  }
  return cached[dev] == 1;
#else
  return false;
#endif
}

namespace {

// Whether a call runs the Hopper kernels: where asked for (arch kHopper), or under kAuto at head dim
// 128 and at head dim 64 for windows (product of the kernel sizes) of 256 keys or more; for the
// forward only without dilation (where its K/V tiles come by TMA). Never where no Hopper kernel is
// instantiated (has_hopper_kernels). `sm90`: the device can run them.
bool use_hopper(const geo::Problem& pr, int rank, DType dtype, int32_t arch, int32_t D, bool sm90, bool forward) {
  if (!sm90 || arch == FwdArgs::kPortable || !has_hopper_kernels(dtype, D)) return false;
  if (arch == FwdArgs::kHopper) return true;
  int64_t window = 1;
  bool dilated = false;
  for (int a = 0; a < rank; ++a) {
    window *= pr.axis[a].k;
    dilated = dilated || pr.axis[a].d != 1;
  }
  return !(forward && dilated) && (D == 128 || window >= 256);
}

}  // namespace

// Auto rule measurements (H100, BENCHMARKS.md problems, cuda/fused/NOTES.md): the Hopper forward is
// 1.3-1.9x the portable one at head dim 128 and 1.13x at head dim 64 with 1023-key windows (p11);
// for small windows at head dim 64 the portable one runs two CTAs per SM and measured faster (p4,
// 7x7: 0.69 vs 0.84 ms); with dilation the Hopper forward gathers with cp.async, no faster than the
// portable kernel. The Hopper backward is 1.3-1.9x the portable one on p1-p3 and p6-p11, and 2-4%
// slower on p4/p5 (7x7 at head dim 32, then padded to 64; head dim 32 now runs on the portable
// kernels only).
cudaError_t launch_fwd(const geo::Problem& pr, int rank, DType dtype, const FwdArgs& args, cudaStream_t stream) {
  const bool sm90 = sm90_available();
  if (args.arch == FwdArgs::kHopper && !sm90) return cudaErrorNoKernelImageForDevice;
  if (args.arch == FwdArgs::kHopper && !hopper_supported(dtype, args.D)) return cudaErrorInvalidValue;
  // Tile configurations only one kernel set has come with that set's arch (jax_na._checks); this
  // keeps a direct caller from running the other set with an index it did not mean.
  if ((args.arch != FwdArgs::kHopper && args.tiles_sm80 < 0) || (args.arch == FwdArgs::kHopper && args.tiles_sm90 < 0))
    return cudaErrorInvalidValue;
  const bool hopper = use_hopper(pr, rank, dtype, args.arch, args.D, sm90, /*forward=*/true) && args.tiles_sm90 >= 0;
  return dispatch(dtype, args.D, rank, FwdCall{pr, args, stream, hopper});
}

cudaError_t launch_bwd(const geo::Problem& pr, int rank, DType dtype, const BwdArgs& args, cudaStream_t stream) {
  const bool sm90 = sm90_available();
  if (args.arch == FwdArgs::kHopper && !sm90) return cudaErrorNoKernelImageForDevice;
  if (args.arch == FwdArgs::kHopper && !hopper_supported(dtype, args.D)) return cudaErrorInvalidValue;
  if ((args.arch != FwdArgs::kHopper && args.tiles_sm80 < 0) || (args.arch == FwdArgs::kHopper && args.tiles_sm90 < 0))
    return cudaErrorInvalidValue;
  const bool hopper = use_hopper(pr, rank, dtype, args.arch, args.D, sm90, /*forward=*/false) && args.tiles_sm90 >= 0;
  return dispatch(dtype, args.D, rank, BwdCall{pr, args, stream, hopper});
}

}  // namespace fused
}  // namespace jax_na
