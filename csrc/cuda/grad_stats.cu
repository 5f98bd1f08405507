// Pass 1 on CUDA: sum of squares of the unscaled gradients and count of non-finite gradients of
// every tensor of a bucket, in one launch, deterministic: float32 accumulation, a fixed-order
// block reduction, and a second stage in the last block to finish (no floating-point atomics).
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
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_stats_kernel(const int64_t* __restrict__ table, int64_t n, int64_t total_chunks,
                      const float* __restrict__ inv_scale, float* __restrict__ out, float* workspace) {
  const float inv = inv_scale != nullptr ? *inv_scale : 1.0f;
  float sum = 0.0f;
  unsigned int count = 0;
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const detail::ChunkRef r = detail::locate<kStatsPtrs>(table, n, chunk);
    detail::stats_chunk<T>(table, r, inv, threadIdx.x, blockDim.x, sum, count);
  }
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
    out[0] += sum;
    if (count > 0) out[1] += static_cast<float>(count);
    *arrived = 0u;
  }
}

template <typename T>
cudaError_t launch(const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale, float* out,
                   float* workspace, int grid, cudaStream_t stream) {
  grad_stats_kernel<T><<<grid, kThreads, 0, stream>>>(table, n, total_chunks, inv_scale, out, workspace);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_grad_stats(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
                              float* out, float* workspace, int grid, cudaStream_t stream) {
  if (total_chunks <= 0 || grid <= 0) return cudaSuccess;
  switch (dtype) {
    case 0: return launch<float>(table, n, total_chunks, inv_scale, out, workspace, grid, stream);
    case 1: return launch<__half>(table, n, total_chunks, inv_scale, out, workspace, grid, stream);
    case 2: return launch<__nv_bfloat16>(table, n, total_chunks, inv_scale, out, workspace, grid, stream);
    case 3: return launch<double>(table, n, total_chunks, inv_scale, out, workspace, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fusedlr
