// Runtime dispatch of the fused kernels over (dtype, head dim, rank) to the compiled instantiations.
#include "fused/fused_bwd.h"
#include "fused/fused_fwd.h"

#include <type_traits>

namespace jax_na {
namespace fused {

bool fwd_supported(DType dtype, int64_t D, int rank) {
  return (dtype == DType::kF16 || dtype == DType::kBF16) && (D == 64 || D == 128) && rank >= 1 && rank <= 3;
}

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
    return D == 64 ? by_rank(dt, std::integral_constant<int, 64>{}) : by_rank(dt, std::integral_constant<int, 128>{});
  };
  return dtype == DType::kF16 ? by_dim(std::integral_constant<DType, DType::kF16>{})
                              : by_dim(std::integral_constant<DType, DType::kBF16>{});
}

struct FwdCall {
  const geo::Problem& pr;
  const FwdArgs& args;
  cudaStream_t stream;
  template <DType kDT, int kD, int kRank>
  cudaError_t run() { return run_fwd<kDT, kD, kRank>(pr, args, stream); }
};

struct BwdCall {
  const geo::Problem& pr;
  const BwdArgs& args;
  cudaStream_t stream;
  template <DType kDT, int kD, int kRank>
  cudaError_t run() { return run_bwd<kDT, kD, kRank>(pr, args, stream); }
};

}  // namespace

cudaError_t launch_fwd(const geo::Problem& pr, int rank, DType dtype, const FwdArgs& args, cudaStream_t stream) {
  return dispatch(dtype, args.D, rank, FwdCall{pr, args, stream});
}

cudaError_t launch_bwd(const geo::Problem& pr, int rank, DType dtype, const BwdArgs& args, cudaStream_t stream) {
  return dispatch(dtype, args.D, rank, BwdCall{pr, args, stream});
}

}  // namespace fused
}  // namespace jax_na
