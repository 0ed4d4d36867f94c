// Launch helpers shared by the kernels.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

namespace jax_na {

// Grid for a grid-stride loop over n elements (the loop makes any cap correct).
inline unsigned int grid_for(int64_t n, int block, int64_t max_blocks = int64_t{1} << 20) {
  int64_t blocks = (n + block - 1) / block;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks);
}

// Launches kernel(params) on grid x threads with smem bytes of dynamic shared memory, after raising
// the kernel's dynamic shared-memory limit to that (needed above 48 KB).
template <class Kernel, class Params>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem, const Params& params,
                             cudaStream_t stream) {
  cudaError_t st = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (st != cudaSuccess) return st;
  kernel<<<grid, threads, smem, stream>>>(params);
  return cudaGetLastError();
}

// Attribute kAttr (a positive int) of the current device, queried once per device (host threads
// race benignly: they store the same value).
template <cudaDeviceAttr kAttr>
inline cudaError_t current_device_attribute(int* value) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int dev = 0;
  cudaError_t st = cudaGetDevice(&dev);
  if (st != cudaSuccess) return st;
  int v = dev < kMaxDevices ? cache[dev].load() : 0;
  if (v <= 0) {
    st = cudaDeviceGetAttribute(&v, kAttr, dev);
    if (st != cudaSuccess) return st;
    if (dev < kMaxDevices) cache[dev] = v;
  }
  *value = v;
  return cudaSuccess;
}

// The CTAs of a kernel with `per_sm` CTAs per SM that run at once on the current device, or
// JAX_NA_PERSISTENT_CTAS where that variable is set (read once): tests set it to make small problems
// behave as on a GPU of that many SMs (persistent grids, the order of the key tiles).
inline cudaError_t resident_ctas(int per_sm, int64_t* n) {
  static const int64_t cap = [] {
    const char* v = std::getenv("JAX_NA_PERSISTENT_CTAS");
    return v != nullptr ? std::strtoll(v, nullptr, 10) : 0;
  }();
  if (cap > 0) {
    *n = cap;
    return cudaSuccess;
  }
  int sms = 0;
  const cudaError_t st = current_device_attribute<cudaDevAttrMultiProcessorCount>(&sms);
  if (st != cudaSuccess) return st;
  *n = int64_t{sms} * per_sm;
  return cudaSuccess;
}

// The grid of a persistent kernel (one CTA per SM: resident_ctas) over `tiles` work tiles.
inline cudaError_t persistent_ctas(int64_t tiles, unsigned* ctas) {
  int64_t n = 0;
  const cudaError_t st = resident_ctas(1, &n);
  if (st != cudaSuccess) return st;
  if (n > tiles) n = tiles;
  *ctas = static_cast<unsigned>(n < 1 ? 1 : n);
  return cudaSuccess;
}

// Grid-stride loop over [0, n) with 64-bit indices.
#define JNA_GRID_STRIDE_LOOP(i, n)                                                       \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// Block-stride loop over [0, n): one block per output element.
#define JNA_BLOCK_STRIDE_LOOP(o, n) \
  for (int64_t o = blockIdx.x; o < (n); o += gridDim.x)

// Deterministic sum of one float per thread over a block of kBlock threads (fixed tree order).
// The result is valid in thread 0. Leaves smem reusable (ends with a barrier).
template <int kBlock>
__device__ __forceinline__ float block_sum(float v, float* smem) {
  static_assert((kBlock & (kBlock - 1)) == 0, "block size must be a power of two");
  smem[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int width = kBlock / 2; width > 0; width >>= 1) {
    if (threadIdx.x < width) smem[threadIdx.x] += smem[threadIdx.x + width];
    __syncthreads();
  }
  const float r = smem[0];
  __syncthreads();
  return r;
}

}  // namespace jax_na
