// The CPU kernels of fusedlr (csrc/cpu/adamw_cpu.cpp) as plain functions: what the CPU ops run once their
// arguments are checked, and what the eager fast path (csrc/step_plan.cpp) runs without the dispatcher.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../adamw_math.h"

namespace fusedlr {
namespace cpu {

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

}  // namespace cpu
}  // namespace fusedlr
