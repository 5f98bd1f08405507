// Pass 1 on CUDA: sum of squares of the unscaled gradients and count of non-finite gradients of
// every tensor of a bucket, in one launch (float32 accumulation, one pair of atomics per block).
#include "multi_tensor.cuh"

namespace fusedlr {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_stats_kernel(const int64_t* __restrict__ table, int64_t n, int64_t total_chunks,
                      const float* __restrict__ inv_scale, float* __restrict__ out) {
  const float inv = inv_scale != nullptr ? *inv_scale : 1.0f;
  float sum = 0.0f;
  unsigned int count = 0;
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const detail::ChunkRef r = detail::locate<kStatsPtrs>(table, n, chunk);
    detail::stats_chunk<T>(table, r, inv, threadIdx.x, blockDim.x, sum, count);
  }

  // Block reduction: warps by shuffles, then the first warp; one atomic per value and block.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_down_sync(0xffffffffu, sum, off);
    count += __shfl_down_sync(0xffffffffu, count, off);
  }
  __shared__ float s_sum[kThreads / 32];
  __shared__ unsigned int s_count[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
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
    if (lane == 0) {
      atomicAdd(out, sum);
      if (count > 0) atomicAdd(out + 1, static_cast<float>(count));
    }
  }
}

template <typename T>
cudaError_t launch(const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale, float* out, int grid,
                   cudaStream_t stream) {
  grad_stats_kernel<T><<<grid, kThreads, 0, stream>>>(table, n, total_chunks, inv_scale, out);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_grad_stats(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
                              float* out, int grid, cudaStream_t stream) {
  if (total_chunks <= 0 || grid <= 0) return cudaSuccess;
  switch (dtype) {
    case 0: return launch<float>(table, n, total_chunks, inv_scale, out, grid, stream);
    case 1: return launch<__half>(table, n, total_chunks, inv_scale, out, grid, stream);
    case 2: return launch<__nv_bfloat16>(table, n, total_chunks, inv_scale, out, grid, stream);
    case 3: return launch<double>(table, n, total_chunks, inv_scale, out, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace fusedlr
