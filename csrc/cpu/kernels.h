// The CPU kernels of fusedlr (csrc/cpu/adamw_cpu.cpp) as plain functions: what the CPU ops run once their
// arguments are checked, and what the eager fast path (csrc/step_plan.cpp) runs without the dispatcher.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

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

// Pass 1: out[0] += sum((g * inv)^2), out[1] += count of non-finite elements, over ``grads`` (one dtype
// code ``dtype`` among kF32/kF16/kBF16/kF64; each linear, as kernel_grad(g, nullptr) gives them).
void grad_stats_kernel(int dtype, const std::vector<at::Tensor>& grads, float inv, float* out);

// Pass 2 of one bucket, in place (the step is not skipped: the caller tests ``s.skip``). ``params`` share the
// dtype code ``dtype``; ``grads`` are laid out like them (kernel_grad(g, &param)); states are float32 (float64
// for float64 params) laid out like their param; ``max_exp_avg_sqs`` is read only when ``amsgrad``;
// ``steps[i]`` is tensor i's step number of this update.
void adamw_update_kernel(int dtype, bool amsgrad, at::TensorList params, const std::vector<at::Tensor>& grads,
                         at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         const int64_t* steps, const AdamWHyper& h, const StepScalars& s);

// Pass 2 of one bucket in a low-precision mode (fusedlr/precision.py), in place, as adamw_update_kernel:
// moments of dtype code ``state_dtype`` (kBF16, or kF32 for 16-bit and float64 params), ``masters`` (float32)
// or ``remainders`` (int16) laid out like their param when ``lp.master`` says so (else empty).
void adamw_update_lp_kernel(int dtype, int state_dtype, bool amsgrad, at::TensorList params,
                            const std::vector<at::Tensor>& grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                            at::TensorList max_exp_avg_sqs, at::TensorList masters, at::TensorList remainders,
                            const int64_t* steps, const AdamWHyper& h, const StepScalars& s, const LowPrecision& lp);

}  // namespace cpu
}  // namespace fusedlr
