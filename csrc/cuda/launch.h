// Host-side launchers of the fusedlr CUDA kernels: raw pointers and a stream, no torch types,
// so the .cu files compile with plain nvcc (tests/test_extension.py does) and the torch binding
// (csrc/cuda/bindings_cuda.cpp) calls them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../adamw_math.h"
#include "table.h"

namespace fusedlr {
namespace cuda {

// dtype codes: fusedlr::DType (0 float32, 1 float16, 2 bfloat16, 3 float64).

// Pass 1: out[0] += sum((g * f)^2) (float32 accumulation), out[1] += non-finite count, bitwise
// reproducible for a given grid; f = unscale_factor(inv_scale, scale) (each may be null). reset: out =
// instead of +=, also with no chunk (then a memset). grid: number of blocks (<= total_chunks).
// workspace: float32 [2 * grid + 1], zero before the first launch (each launch leaves it ready for the next).
cudaError_t launch_grad_stats(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
                              const float* scale, bool reset, float* out, float* workspace, int grid,
                              cudaStream_t stream);

// Pass 2: the fused AdamW update of every tensor of the table. ``in`` holds device pointers
// (k, steps required; others null when absent). Nothing is written when the step is skipped
// (*found_inf > 0, or stats[1] > 0 with in.skip_nonfinite) but ``outs.norm``/``outs.found_inf``.
// ``lp``: null for the default update, else the low-precision modes (moments of ``state_dtype``,
// bfloat16 or float32; the table's masters or remainders per ``lp->master``; ``lp->pids`` on the device).
// ``outs``: the step's counters and outputs (adamw_math.h; ``outs.arrival`` an unsigned int zero before
// the first launch and left zero, needed with ``outs.steps`` or ``outs.k``). A launch with outputs to
// write runs with no chunk too (give it grid 1).
cudaError_t launch_adamw_update(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                                const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp,
                                int state_dtype, const StepOutputs& outs, int grid, cudaStream_t stream);

// Pass 2 of a launch set: launch_adamw_update over the tensors of ``nseg`` segments (one bucket each), whose
// table is followed by the set region (table.h, fill_set_region): each segment's steps, hyperparameters, tensor
// LR, applied-LR entry and pids (``in.steps``, ``in.lr_*``, ``in.applied_lr``, ``lp->pids``, ``outs.steps``
// unused); ``hyper``'s max_norm and the rest of ``in`` and ``outs`` are the step's. It advances every segment's
// steps (``outs.arrival`` needed). nseg 0: launch_adamw_update.
cudaError_t launch_adamw_update_set(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                                    int64_t nseg, const AdamWHyper& hyper, const StepInputs& in,
                                    const LowPrecision* lp, int state_dtype, const StepOutputs& outs, int grid,
                                    cudaStream_t stream);

// The grid of launch_grad_stats / launch_adamw_update (same dtype and modes; ``low_precision``: lp not
// null; ``set``: of launch_adamw_update_set with nseg > 0, whose kernel instances have their own occupancy)
// over ``total_chunks`` chunks on ``device`` (the current device) into ``grid``: min(total_chunks,
// SMs * the kernel instance's resident blocks per SM from its occupancy at kThreads threads), at most
// SMs * kBlocksPerSm. Queried once per (kernel instance, device), then cached; no stream sync.
cudaError_t grad_stats_grid(int dtype, int64_t total_chunks, int device, int* grid);
cudaError_t adamw_update_grid(int dtype, bool amsgrad, bool low_precision, int state_dtype, int64_t total_chunks,
                              int device, int* grid, bool set = false);

// The architectures the kernels were compiled for (nvcc's __CUDA_ARCH_LIST__, e.g. 800 for
// sm_80): writes up to ``capacity`` of them into ``out`` and returns how many there are.
int compiled_archs(int* out, int capacity);

// out[i] = schedule_multiplier(table, ks[i]) for i < count (device pointers).
cudaError_t launch_schedule_eval(const double* table, const int64_t* ks, double* out, int64_t count,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace fusedlr
