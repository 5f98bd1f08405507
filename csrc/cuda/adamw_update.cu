// Pass 2 on CUDA: the fused AdamW update of every tensor of a bucket in one launch.
//
// Each block first evaluates the per-step scalars (schedule, clip coefficient, AMP scale,
// found_inf, a tensor LR) from device memory (block 0 writes the step's norm and found_inf outputs),
// and exits at once when the step is skipped (else block 0 records the applied LR); then it walks its
// contiguous range of chunks (detail::block_chunks: one binary search, then forward tensor by tensor),
// computing each tensor's bias corrections (and, with stochastic rounding, its random-bit keys) once per
// tensor in shared memory. When the launch advances the step counters or k, the last block to finish
// (an integer arrival counter, as in grad_stats.cu) advances them, after every block has read them.
// A launch set (launch_adamw_update_set) runs the same walk over the tensors of several buckets in kernel
// instances of their own (SET), each tensor's coefficients from its segment's hyperparameters and steps.
#include <type_traits>

#include "grid.h"
#include "multi_tensor.cuh"

namespace fusedlr {
namespace cuda {
namespace {

// Resident blocks per SM the update's registers are capped for: 2 (64 registers) for the default
// update of 16- and 32-bit params, which fits them without spilling in its element loops (see
// benchmarks/cuda_resources.py); 1 for the others, which need more, and for the launch-set instances (SET),
// whose per-segment prologue would push the 64-register ones into spilling inside their element loops.
template <typename T, bool LOWP, bool SET>
constexpr int kUpdateMinBlocks = !LOWP && !SET && sizeof(T) < 8 ? 2 : 1;

// The set region of a launch set's table (table.h).
struct SetView {
  const int64_t* seg_of;   // [n] each tensor's segment
  const SetSegment* segs;  // [nseg]
  int64_t nseg;
};

// Segment ``g``'s hyperparameters: the launch's (max_norm) with g's values.
__device__ AdamWHyper segment_hyper(const SetSegment& g, const AdamWHyper& hyper) {
  AdamWHyper h = hyper;
  h.lr = g.lr;
  h.beta1 = g.beta1;
  h.beta2 = g.beta2;
  h.eps = g.eps;
  h.weight_decay = g.weight_decay;
  h.maximize = g.maximize != 0;
  return h;
}

// The step's scalars that every segment shares: the schedule multiplier (1 without a schedule) and the gradient
// scale before maximize's sign.
struct SharedScalars {
  double sched;
  double scale;
  bool skip;
};

// Segment ``g``'s step scalars: step_scalars with g's hyperparameters and tensor LR, bit for bit (the same
// products), from the shared ones (no schedule evaluation).
__device__ StepScalars segment_scalars(const SetSegment& g, const StepInputs& in, const SharedScalars& sh) {
  const double lr = g.lr_f64 != nullptr ? *g.lr_f64 : (g.lr_f32 != nullptr ? static_cast<double>(*g.lr_f32) : g.lr);
  StepScalars s;
  s.skip = sh.skip;
  s.lr = in.schedule != nullptr ? lr * sh.sched : lr;
  s.scale = g.maximize != 0 ? -sh.scale : sh.scale;
  return s;
}

// What a block of a launch set keeps in shared memory (thread 0 writes it): the set region, the scalars its
// segments share, and the hyperparameters and step scalars of segment ``seg`` (-1: none yet), recomputed when
// the block's walk enters another segment.
struct SetState {
  SetView view;
  SharedScalars shared;
  AdamWHyper hyper;
  StepScalars step;
  int64_t seg;
};

// A set's state before its walk, from the launch's ``hyper`` (max_norm, maximize of segment 0) and its step
// scalars ``s``.
__device__ SetState set_state(const int64_t* table, int64_t n, int64_t nseg, const AdamWHyper& hyper,
                              const StepInputs& in, const StepScalars& s) {
  const int64_t* region = table + table_size(n, kUpdatePtrs);
  const SharedScalars shared{in.schedule != nullptr ? schedule_multiplier(in.schedule, *in.k) : 1.0,
                             hyper.maximize ? -s.scale : s.scale, s.skip};
  return SetState{SetView{region, reinterpret_cast<const SetSegment*>(region + n), nseg}, shared, hyper, s, -1};
}

// Block 0, thread 0 of an applied step of a set: every segment's applied LR.
__device__ void write_segment_lrs(const SetState& st, const StepInputs& in) {
  for (int64_t s = 0; s < st.view.nseg; ++s) {
    const SetSegment& g = st.view.segs[s];
    if (g.applied_lr != nullptr) *g.applied_lr = segment_scalars(g, in, st.shared).lr;
  }
}

// Thread 0 of a set, entering ``tensor``: its coefficients (and keys) as the single-bucket kernel computes
// them from its segment's hyperparameters, step scalars and steps.
template <typename S, bool LOWP>
__device__ void segment_tensor_start(SetState& st, int64_t tensor, const AdamWHyper& hyper, const StepInputs& in,
                                     const LowPrecision& lp, AdamWCoeffs<S>& coeffs, RngKeys& keys) {
  const int64_t seg = st.view.seg_of[tensor];
  const SetSegment& g = st.view.segs[seg];
  if (seg != st.seg) {
    st.hyper = segment_hyper(g, hyper);
    st.step = segment_scalars(g, in, st.shared);
    st.seg = seg;
  }
  const int64_t local = tensor - g.first;
  const int64_t t = g.steps[local] + 1;  // a set always advances its segments' steps
  coeffs = tensor_coeffs<S>(st.hyper, st.step, t);
  if (LOWP && lp.stochastic) keys = rng_keys(lp.seed, g.pids[local], t);
}

// The epilogue of a launch that advances the step counters (``outs.steps``, n of them; SET: every segment's of
// ``set``) or k: the last block to arrive advances them and leaves the arrival counter zero. Every block reads
// them in thread 0 only (step_scalars, tensor_coeffs), before it arrives.
template <bool SET>
__device__ void advance_counters(int64_t n, const StepOutputs& outs, const SetView& set) {
  __shared__ bool s_last;
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(outs.arrival, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;  // uniform over the block
  __threadfence();
  if constexpr (SET) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const SetSegment& g = set.segs[set.seg_of[i]];
      g.steps[i - g.first] += 1;
    }
  } else if (outs.steps != nullptr) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) outs.steps[i] += 1;
  }
  if (threadIdx.x == 0) {
    if (outs.k != nullptr) *outs.k += 1;
    *outs.arrival = 0u;
  }
}

// LOWP: the low-precision modes (moments M, masters/remainders, stochastic rounding); without it M is
// the math type and the kernel is the default update.
// SET: a launch set of nseg (> 0) segments (the table's set region; ``hyper``'s max_norm and ``in`` are the
// step's, the rest per segment; it advances every segment's steps); else one bucket (nseg unused).
template <typename T, typename M, bool AMSGRAD, bool LOWP, bool SET>
__global__ void __launch_bounds__(kThreads, kUpdateMinBlocks<T, LOWP, SET>)
    adamw_kernel(const int64_t* __restrict__ table, int64_t n, int64_t total_chunks, AdamWHyper hyper,
                 StepInputs in, LowPrecision lp, StepOutputs outs, int64_t nseg) {
  using S = typename detail::Elem<T>::S;
  __shared__ StepScalars s_step;
  __shared__ AdamWCoeffs<S> s_coeffs;
  __shared__ RngKeys s_keys;  // of the current tensor (LOWP with stochastic rounding)
  __shared__ SetState s_set;  // SET only
  if (threadIdx.x == 0) {
    s_step = step_scalars(hyper, in);
    if constexpr (SET) s_set = set_state(table, n, nseg, hyper, in, s_step);
  }
  __syncthreads();
  if (blockIdx.x == 0 && threadIdx.x == 0) write_step_flags(in, s_step, outs);
  if (s_step.skip) return;  // uniform over the block (a set's segments share it)
  const StepScalars step = s_step;
  if constexpr (SET) {
    if (blockIdx.x == 0 && threadIdx.x == 0) write_segment_lrs(s_set, in);
  } else {
    if (blockIdx.x == 0 && threadIdx.x == 0 && in.applied_lr != nullptr) *in.applied_lr = step.lr;
  }
  const int64_t offset = outs.steps != nullptr ? 1 : 0;  // in.steps: the updates applied before this one

  // The block's chunks tensor by tensor: one binary search for the first one's tensor, then forward
  // (tensors without chunks in the range, zero-size ones included, are passed over).
  const detail::ChunkRange range = detail::block_chunks(total_chunks, gridDim.x, blockIdx.x);
  const int64_t* prefix = table + n * (kUpdatePtrs + 1);
  int64_t chunk = range.first;
  for (int64_t tensor = detail::find_tensor(prefix, n, chunk); chunk < range.last; ++tensor) {
    const int64_t end = prefix[tensor + 1] < range.last ? prefix[tensor + 1] : range.last;
    if (end <= chunk) continue;  // uniform over the block
    __syncthreads();             // everyone has read the previous coefficients (and keys)
    if (threadIdx.x == 0) {
      if constexpr (SET) {
        segment_tensor_start<S, LOWP>(s_set, tensor, hyper, in, lp, s_coeffs, s_keys);
      } else {
        const int64_t t = in.steps[tensor] + offset;
        s_coeffs = tensor_coeffs<S>(hyper, step, t);
        if (LOWP && lp.stochastic) s_keys = rng_keys(lp.seed, lp.pids[tensor], t);
      }
    }
    __syncthreads();
    const AdamWCoeffs<S> c = s_coeffs;
    for (; chunk < end; ++chunk) {
      detail::update_chunk<T, M, AMSGRAD, LOWP>(table, detail::chunk_ref<kUpdatePtrs>(table, n, tensor, chunk), c,
                                                lp, s_keys, threadIdx.x, blockDim.x);
    }
  }
  if (SET || outs.steps != nullptr || outs.k != nullptr) {  // uniform over the grid
    advance_counters<SET>(n, outs, s_set.view);
  }
}

using AdamWKernel = decltype(&adamw_kernel<float, float, false, false, false>);

// The kernel instance of the default update (lp null), or of the low-precision one with moments of
// ``state_dtype``: bf16, or fp32 for 16-bit and fp64 params (fp32 params are low-precision only with
// bf16 moments); null for no such mode. SET: the launch-set instance.
template <typename T, bool SET>
AdamWKernel kernel_modes(bool amsgrad, bool low_precision, int state_dtype) {
  using S = typename detail::Elem<T>::S;
  if (!low_precision) return amsgrad ? adamw_kernel<T, S, true, false, SET> : adamw_kernel<T, S, false, false, SET>;
  if (state_dtype == kBF16) {
    return amsgrad ? adamw_kernel<T, __nv_bfloat16, true, true, SET> : adamw_kernel<T, __nv_bfloat16, false, true, SET>;
  }
  if constexpr (std::is_same_v<T, float>) {
    return nullptr;
  } else {
    return amsgrad ? adamw_kernel<T, float, true, true, SET> : adamw_kernel<T, float, false, true, SET>;
  }
}

template <bool SET>
AdamWKernel kernel_for_dtype(int dtype, bool amsgrad, bool low_precision, int state_dtype) {
  switch (dtype) {
    case kF32: return kernel_modes<float, SET>(amsgrad, low_precision, state_dtype);
    case kF16: return kernel_modes<__half, SET>(amsgrad, low_precision, state_dtype);
    case kBF16: return kernel_modes<__nv_bfloat16, SET>(amsgrad, low_precision, state_dtype);
    case kF64: return kernel_modes<double, SET>(amsgrad, low_precision, state_dtype);
    default: return nullptr;
  }
}

// The kernel instance of a launch_adamw_update(_set) call (``set``: a launch set's; null: no such dtype or mode).
AdamWKernel kernel_for(int dtype, bool amsgrad, bool low_precision, int state_dtype, bool set) {
  return set ? kernel_for_dtype<true>(dtype, amsgrad, low_precision, state_dtype)
             : kernel_for_dtype<false>(dtype, amsgrad, low_precision, state_dtype);
}

__global__ void schedule_eval_kernel(const double* __restrict__ table, const int64_t* __restrict__ ks,
                                     double* __restrict__ out, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = schedule_multiplier(table, ks[i]);
  }
}

}  // namespace

cudaError_t launch_adamw_update_set(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                                    int64_t nseg, const AdamWHyper& hyper, const StepInputs& in,
                                    const LowPrecision* lp, int state_dtype, const StepOutputs& outs, int grid,
                                    cudaStream_t stream) {
  const bool writes_outputs = outs.steps != nullptr || outs.k != nullptr || outs.norm != nullptr ||
                              outs.found_inf != nullptr || in.applied_lr != nullptr || nseg > 0;
  if (grid <= 0 || (total_chunks <= 0 && !writes_outputs)) return cudaSuccess;
  if ((outs.steps != nullptr || outs.k != nullptr || nseg > 0) && outs.arrival == nullptr) {
    return cudaErrorInvalidValue;
  }
  const AdamWKernel kernel = kernel_for(dtype, amsgrad, lp != nullptr, state_dtype, nseg > 0);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  kernel<<<grid, kThreads, 0, stream>>>(table, n, total_chunks, hyper, in, lp != nullptr ? *lp : LowPrecision{}, outs,
                                        nseg);
  return cudaGetLastError();
}

cudaError_t launch_adamw_update(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                                const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp,
                                int state_dtype, const StepOutputs& outs, int grid, cudaStream_t stream) {
  return launch_adamw_update_set(dtype, amsgrad, table, n, total_chunks, 0, hyper, in, lp, state_dtype, outs, grid,
                                 stream);
}

cudaError_t adamw_update_grid(int dtype, bool amsgrad, bool low_precision, int state_dtype, int64_t total_chunks,
                              int device, int* grid, bool set) {
  const AdamWKernel kernel = kernel_for(dtype, amsgrad, low_precision, state_dtype, set);
  if (kernel == nullptr) return cudaErrorInvalidValue;
  return occupancy_grid(reinterpret_cast<const void*>(kernel), device, total_chunks, grid);
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
