// Pass 1 on CUDA: sum of squares of the unscaled gradients and count of non-finite gradients of
// every tensor of a bucket, in one launch, deterministic: float32 accumulation, a fixed-order
// block reduction, and a second stage in the last block to finish (no floating-point atomics).
//
// The order of the float32 sum, fixed for a given grid: block b takes the contiguous chunks
// [b * total / grid, (b + 1) * total / grid) (detail::block_chunks); each of its threads sums its
// share of them tensor by tensor in table order (detail::stats_span gives the order within a
// tensor); block_sum combines the 512 threads' sums; the last block adds the blocks' sums, thread t
// those of blocks t, t + 512, ... in order, and block_sum combines those.
#include "grid.h"
#include "multi_tensor.cuh"

namespace fusedlr {
namespace cuda {
namespace {

// Sums ``sum`` and ``count`` over the block in a fixed order (warp shuffles, then the first warp);
// the result is valid in thread 0.
__device__ void block_sum(float& sum, unsigned int& count) {
  __shared__ float s_sum[kThreads / 32];
  __shared__ unsigned int s_count[kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_down_sync(0xffffffffu, sum, off);
    count += __shfl_down_sync(0xffffffffu, count, off);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // No barrier needed before the writes below when block_sum runs a second time (stage 2): the
  // block barrier between the two calls orders warp 0's reads of the first call before them.
  if (lane == 0) {
    s_sum[warp] = sum;
    s_count[warp] = count;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    sum = lane < warps ? s_sum[lane] : 0.0f;
    count = lane < warps ? s_count[lane] : 0u;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      sum += __shfl_down_sync(0xffffffffu, sum, off);
      count += __shfl_down_sync(0xffffffffu, count, off);
    }
  }
}

// workspace: float32 [2 * gridDim.x + 1]: block b's partial sum at 2b and its non-finite count
// (bits of an unsigned int) at 2b + 1, then the arrival counter (bits of an unsigned int, zero
// between launches: the last block resets it, so CUDA-graph replays find it zero too).
//
// Registers are capped for kBlocksPerSm resident blocks per SM (32 per thread): full occupancy.
template <typename T>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    grad_stats_kernel(const int64_t* __restrict__ table, int64_t n, int64_t total_chunks,
                      const float* __restrict__ inv_scale, const float* __restrict__ scale, bool reset,
                      float* __restrict__ out, float* workspace) {
  const float inv = unscale_factor(inv_scale, scale);
  float sum = 0.0f;
  unsigned int count = 0;
  detail::SpanWalk<kStatsPtrs> walk(table, n, detail::block_chunks(total_chunks, gridDim.x, blockIdx.x));
  for (detail::Span s; walk.next(s);) detail::stats_span<T>(table, s, inv, threadIdx.x, blockDim.x, sum, count);
  block_sum(sum, count);

  // Stage 1 -> 2: publish the block's partials; the last block to arrive finishes.
  __shared__ bool s_last;
  unsigned int* arrived = reinterpret_cast<unsigned int*>(workspace + 2 * gridDim.x);
  if (threadIdx.x == 0) {
    workspace[2 * blockIdx.x] = sum;
    workspace[2 * blockIdx.x + 1] = __uint_as_float(count);
    __threadfence();
    s_last = atomicAdd(arrived, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;  // uniform over the block
  __threadfence();

  // Stage 2: the partials in block order, each thread a fixed strided subset, then block_sum.
  const volatile float* partials = workspace;
  sum = 0.0f;
  count = 0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
    sum += partials[2 * b];
    count += __float_as_uint(partials[2 * b + 1]);
  }
  block_sum(sum, count);
  if (threadIdx.x == 0) {
    if (reset) {
      out[0] = sum;
      out[1] = static_cast<float>(count);
    } else {
      out[0] += sum;
      if (count > 0) out[1] += static_cast<float>(count);
    }
    *arrived = 0u;
  }
}

using StatsKernel = decltype(&grad_stats_kernel<float>);

// The kernel instance for dtype code ``dtype`` (null: none).
StatsKernel kernel_for(int dtype) {
  switch (dtype) {
    case kF32: return grad_stats_kernel<float>;
    case kF16: return grad_stats_kernel<__half>;
    case kBF16: return grad_stats_kernel<__nv_bfloat16>;
    case kF64: return grad_stats_kernel<double>;
    default: return nullptr;
  }
}

}  // namespace

cudaError_t launch_grad_stats(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
                              const float* scale, bool reset, float* out, float* workspace, int grid,
                              cudaStream_t stream) {
  if (total_chunks <= 0) return reset ? cudaMemsetAsync(out, 0, 2 * sizeof(float), stream) : cudaSuccess;
  if (grid <= 0) return cudaSuccess;
  const StatsKernel kernel = kernel_for(dtype);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  kernel<<<grid, kThreads, 0, stream>>>(table, n, total_chunks, inv_scale, scale, reset, out, workspace);
  return cudaGetLastError();
}

cudaError_t grad_stats_grid(int dtype, int64_t total_chunks, int device, int* grid) {
  const StatsKernel kernel = kernel_for(dtype);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  return occupancy_grid(reinterpret_cast<const void*>(kernel), device, total_chunks, grid);
}

}  // namespace cuda
}  // namespace fusedlr
