// Pass 2 on CUDA: the fused AdamW update of every tensor of a bucket in one launch.
//
// Each block first evaluates the per-step scalars (schedule, clip coefficient, AMP scale,
// found_inf, a tensor LR) from device memory, and exits at once when found_inf > 0 (else block 0
// records the applied LR); then it walks its
// chunks (grid-stride), computing each tensor's bias corrections once in shared memory.
#include "multi_tensor.cuh"

namespace fusedlr {
namespace cuda {
namespace {

template <typename T, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const int64_t* __restrict__ table, int64_t n, int64_t total_chunks, AdamWHyper hyper,
                 StepInputs in) {
  using S = typename detail::Elem<T>::S;
  __shared__ StepScalars s_step;
  __shared__ AdamWCoeffs<S> s_coeffs;
  if (threadIdx.x == 0) s_step = step_scalars(hyper, in);
  __syncthreads();
  if (s_step.skip) return;  // uniform over the block
  const StepScalars step = s_step;
  if (blockIdx.x == 0 && threadIdx.x == 0 && in.applied_lr != nullptr) *in.applied_lr = step.lr;

  int64_t current = -1;
  AdamWCoeffs<S> c;
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const detail::ChunkRef r = detail::locate<kUpdatePtrs>(table, n, chunk);
    if (r.tensor != current) {  // uniform over the block
      __syncthreads();          // everyone has read the previous coefficients
      if (threadIdx.x == 0) s_coeffs = tensor_coeffs<S>(hyper, step, in.steps[r.tensor]);
      __syncthreads();
      c = s_coeffs;
      current = r.tensor;
    }
    detail::update_chunk<T, AMSGRAD>(table, r, c, threadIdx.x, blockDim.x);
  }
}

template <typename T>
cudaError_t launch(bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks, const AdamWHyper& hyper,
                   const StepInputs& in, int grid, cudaStream_t stream) {
  if (amsgrad) {
    adamw_kernel<T, true><<<grid, kThreads, 0, stream>>>(table, n, total_chunks, hyper, in);
  } else {
    adamw_kernel<T, false><<<grid, kThreads, 0, stream>>>(table, n, total_chunks, hyper, in);
  }
  return cudaGetLastError();
}

__global__ void schedule_eval_kernel(const double* __restrict__ table, const int64_t* __restrict__ ks,
                                     double* __restrict__ out, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = schedule_multiplier(table, ks[i]);
  }
}

}  // namespace

cudaError_t launch_adamw_update(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                                const AdamWHyper& hyper, const StepInputs& in, int grid, cudaStream_t stream) {
  if (total_chunks <= 0 || grid <= 0) return cudaSuccess;
  switch (dtype) {
    case 0: return launch<float>(amsgrad, table, n, total_chunks, hyper, in, grid, stream);
    case 1: return launch<__half>(amsgrad, table, n, total_chunks, hyper, in, grid, stream);
    case 2: return launch<__nv_bfloat16>(amsgrad, table, n, total_chunks, hyper, in, grid, stream);
    case 3: return launch<double>(amsgrad, table, n, total_chunks, hyper, in, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

int compiled_archs(int* out, int capacity) {
#ifdef __CUDA_ARCH_LIST__
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  const int count = static_cast<int>(sizeof(archs) / sizeof(archs[0]));
  for (int i = 0; i < count && i < capacity; ++i) out[i] = archs[i];
  return count;
#else
  (void)out;
  (void)capacity;
  return 0;
#endif
}

cudaError_t launch_schedule_eval(const double* table, const int64_t* ks, double* out, int64_t count,
                                 cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = (count + threads - 1) / threads;
  schedule_eval_kernel<<<static_cast<int>(blocks < 1024 ? blocks : 1024), threads, 0, stream>>>(table, ks, out, count);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fusedlr
