// The CPU kernels of fusedlr (csrc/cpu/adamw_cpu.cpp) as plain functions: what the CPU ops run once their
// arguments are checked, and what the eager fast path (csrc/step_plan.cpp) runs without the dispatcher.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>

#include "../adamw_math.h"

namespace fusedlr {
namespace cpu {

// The element type a dtype code stands for, as a value: ``f(DtypeTag<T>{})``.
template <typename T>
struct DtypeTag {
  using type = T;
};

// Calls ``f(DtypeTag<T>{})`` with T the element type of dtype code ``dtype`` (adamw_math.h: kF32, kF16,
// kBF16; any other code: double, as the checks of the ops leave only kF64). The one dtype switch of the
// CPU kernels.
template <typename F>
decltype(auto) dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: return f(DtypeTag<float>{});
    case kF16: return f(DtypeTag<c10::Half>{});
    case kBF16: return f(DtypeTag<c10::BFloat16>{});
    default: return f(DtypeTag<double>{});
  }
}

// Below this many elements in a launch, the kernels run on the calling thread (no OpenMP region).
constexpr int64_t kParallelMin = 32768;

// One gradient as pass 1 reads it: ``numel`` elements from ``data`` (linear, as kernel_grad(g, nullptr) gives it).
struct GradRef {
  const void* data;
  int64_t numel;
};

// The tensors of one parameter in pass 2, as pointers to their first element: the gradient laid out like the
// param (kernel_grad(g, &param)), the states laid out like it; ``vmax``, ``master`` and ``remainder`` are null
// where the launch has none.
struct UpdateSlot {
  void* p;
  const void* g;
  void* m;
  void* v;
  void* vmax;
  float* master;
  uint16_t* remainder;
  int64_t numel;
};

// Pass 1: out[0] += sum((g * inv)^2), out[1] += count of non-finite elements, over ``n`` gradients of one dtype
// code ``dtype`` among kF32/kF16/kBF16/kF64.
void grad_stats_kernel(int dtype, const GradRef* grads, size_t n, float inv, float* out);

// Pass 2 of one bucket of ``n`` params, in place (the step is not skipped: the caller tests ``s.skip``). The
// params share the dtype code ``dtype``; states are float32 (float64 for float64 params); ``vmax`` is read only
// when ``amsgrad``; ``steps[i]`` is tensor i's step number of this update.
void adamw_update_kernel(int dtype, bool amsgrad, const UpdateSlot* slots, size_t n, const int64_t* steps,
                         const AdamWHyper& h, const StepScalars& s);

// Pass 2 of one bucket in a low-precision mode (fusedlr/precision.py), in place, as adamw_update_kernel:
// moments of dtype code ``state_dtype`` (kBF16, or kF32 for 16-bit and float64 params), ``master`` (float32)
// or ``remainder`` (int16) of each slot read when ``lp.master`` says so.
void adamw_update_lp_kernel(int dtype, int state_dtype, bool amsgrad, const UpdateSlot* slots, size_t n,
                            const int64_t* steps, const AdamWHyper& h, const StepScalars& s, const LowPrecision& lp);

}  // namespace cpu
}  // namespace fusedlr
