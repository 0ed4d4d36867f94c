// Runtime dispatch of the GEMM-based kernels over (dtype, head dim, rank) to the compiled instantiations.
#include <type_traits>

#include "gemm/gemm_ops.h"

namespace jax_na {
namespace gemm {

bool supports(DType dtype, int64_t E, int rank, int64_t ncols, const geo::Problem& pr) {
  return (E == 64 || E == 128) && rank >= 1 && rank <= 3 &&
         ncols == pr.W && pr.Na == 0 && pr.B <= 65535 && pr.H <= 65535;
}

bool supports_pn(DType dtype, int rank, const geo::Problem& pr, const naive::PNArgs& args) {
  return supports(dtype, args.E, rank, args.ncols, pr) &&
         (args.mode == naive::PNMode::kScore || args.mode == naive::PNMode::kRaw);
}
bool supports_nn(DType dtype, int rank, const geo::Problem& pr, const naive::NNArgs& args) {
  return supports(dtype, args.E, rank, args.ncols, pr) && !args.attn_f32;
}
bool supports_in(DType dtype, int rank, const geo::Problem& pr, const naive::INArgs& args) {
  return supports(dtype, args.E, rank, args.ncols, pr) && !args.attn_f32;
}

namespace {

// Calls f.template run<dtype, E, rank>() for the runtime (dtype, E, rank) (checked by supports()).
template <class F>
cudaError_t dispatch(DType dtype, int64_t E, int rank, F&& f) {
  auto by_rank = [&](auto dt, auto e) -> cudaError_t {
    constexpr DType kDT = decltype(dt)::value;
    constexpr int kE = decltype(e)::value;
    switch (rank) {
      case 1: return f.template run<kDT, kE, 1>();
      case 2: return f.template run<kDT, kE, 2>();
      default: return f.template run<kDT, kE, 3>();
    }
  };
  auto by_dim = [&](auto dt) -> cudaError_t {
    return E == 64 ? by_rank(dt, std::integral_constant<int, 64>{}) : by_rank(dt, std::integral_constant<int, 128>{});
  };
  switch (dtype) {
    case DType::kF16: return by_dim(std::integral_constant<DType, DType::kF16>{});
    case DType::kBF16: return by_dim(std::integral_constant<DType, DType::kBF16>{});
    default: return by_dim(std::integral_constant<DType, DType::kF32>{});
  }
}

template <class Args, int kOp>
struct Call {
  const geo::Problem& pr;
  const Args& args;
  cudaStream_t stream;
  template <DType kDT, int kE, int kRank>
  cudaError_t run() {
    if constexpr (kOp == 0) return run_pn<kDT, kE, kRank>(pr, args, stream);
    else if constexpr (kOp == 1) return run_nn<kDT, kE, kRank>(pr, args, stream);
    else return run_in<kDT, kE, kRank>(pr, args, stream);
  }
};

}  // namespace

cudaError_t launch_pn(const geo::Problem& pr, int rank, DType dtype, const naive::PNArgs& args, cudaStream_t stream) {
  if (!supports_pn(dtype, rank, pr, args)) return cudaErrorInvalidValue;
  return dispatch(dtype, args.E, rank, Call<naive::PNArgs, 0>{pr, args, stream});
}
cudaError_t launch_nn(const geo::Problem& pr, int rank, DType dtype, const naive::NNArgs& args, cudaStream_t stream) {
  if (!supports_nn(dtype, rank, pr, args)) return cudaErrorInvalidValue;
  return dispatch(dtype, args.E, rank, Call<naive::NNArgs, 1>{pr, args, stream});
}
cudaError_t launch_in(const geo::Problem& pr, int rank, DType dtype, const naive::INArgs& args, cudaStream_t stream) {
  if (!supports_in(dtype, rank, pr, args)) return cudaErrorInvalidValue;
  return dispatch(dtype, args.E, rank, Call<naive::INArgs, 2>{pr, args, stream});
}

}  // namespace gemm
}  // namespace jax_na
