// Pass 2 on CUDA: the fused AdamW update of every tensor of a bucket in one launch.
//
// Each block first evaluates the per-step scalars (schedule, clip coefficient, AMP scale,
// found_inf, a tensor LR) from device memory, and exits at once when found_inf > 0 (else block 0
// records the applied LR); then it walks its
// chunks (grid-stride), computing each tensor's bias corrections (and, with stochastic rounding,
// its random-bit keys) once in shared memory.
#include <type_traits>

#include "multi_tensor.cuh"

namespace fusedlr {
namespace cuda {
namespace {

// LOWP: the low-precision modes (moments M, masters/remainders, stochastic rounding); without it M is
// the math type and the kernel is the default update.
template <typename T, typename M, bool AMSGRAD, bool LOWP>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const int64_t* __restrict__ table, int64_t n, int64_t total_chunks, AdamWHyper hyper,
                 StepInputs in, LowPrecision lp) {
  using S = typename detail::Elem<T>::S;
  __shared__ StepScalars s_step;
  __shared__ AdamWCoeffs<S> s_coeffs;
  __shared__ RngKeys s_keys;  // of the current tensor (LOWP with stochastic rounding)
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
      __syncthreads();          // everyone has read the previous coefficients (and keys)
      if (threadIdx.x == 0) {
        s_coeffs = tensor_coeffs<S>(hyper, step, in.steps[r.tensor]);
        if (LOWP && lp.stochastic) s_keys = rng_keys(lp.seed, lp.pids[r.tensor], in.steps[r.tensor]);
      }
      __syncthreads();
      c = s_coeffs;
      current = r.tensor;
    }
    detail::update_chunk<T, M, AMSGRAD, LOWP>(table, r, c, lp, s_keys, threadIdx.x, blockDim.x);
  }
}

template <typename T, typename M, bool LOWP>
cudaError_t launch(bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks, const AdamWHyper& hyper,
                   const StepInputs& in, const LowPrecision& lp, int grid, cudaStream_t stream) {
  if (amsgrad) {
    adamw_kernel<T, M, true, LOWP><<<grid, kThreads, 0, stream>>>(table, n, total_chunks, hyper, in, lp);
  } else {
    adamw_kernel<T, M, false, LOWP><<<grid, kThreads, 0, stream>>>(table, n, total_chunks, hyper, in, lp);
  }
  return cudaGetLastError();
}

// The default update (lp null), or the low-precision one with moments of ``state_dtype``: bf16, or
// fp32 for 16-bit and fp64 params (fp32 params are low-precision only with bf16 moments).
template <typename T>
cudaError_t launch_modes(bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                         const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp, int state_dtype,
                         int grid, cudaStream_t stream) {
  using S = typename detail::Elem<T>::S;
  if (lp == nullptr) {
    return launch<T, S, false>(amsgrad, table, n, total_chunks, hyper, in, LowPrecision{}, grid, stream);
  }
  if (state_dtype == kBF16) {
    return launch<T, __nv_bfloat16, true>(amsgrad, table, n, total_chunks, hyper, in, *lp, grid, stream);
  }
  if constexpr (std::is_same_v<T, float>) {
    return cudaErrorInvalidValue;
  } else {
    return launch<T, float, true>(amsgrad, table, n, total_chunks, hyper, in, *lp, grid, stream);
  }
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
                                const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp,
                                int state_dtype, int grid, cudaStream_t stream) {
  if (total_chunks <= 0 || grid <= 0) return cudaSuccess;
  switch (dtype) {
    case kF32: return launch_modes<float>(amsgrad, table, n, total_chunks, hyper, in, lp, state_dtype, grid, stream);
    case kF16: return launch_modes<__half>(amsgrad, table, n, total_chunks, hyper, in, lp, state_dtype, grid, stream);
    case kBF16:
      return launch_modes<__nv_bfloat16>(amsgrad, table, n, total_chunks, hyper, in, lp, state_dtype, grid, stream);
    case kF64: return launch_modes<double>(amsgrad, table, n, total_chunks, hyper, in, lp, state_dtype, grid, stream);
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
