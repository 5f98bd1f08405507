// The device-side operations of the CUDA fast path (csrc/step_plan.cpp, fusedlr/fast_step.py), as a table
// of function pointers free of CUDA and torch headers: the CUDA build fills it from the host launchers of
// launch.h (csrc/cuda/launchers.cpp, exported as fusedlr._C.CUDA_LAUNCHERS), and the tests' host build of
// the kernels (csrc/cuda/testing/kernels_on_host.cpp) exports one whose streams are null and whose upload is
// a memcpy, so that the whole fast path runs on the CPU with the real kernels.
//
// Every function returns 0 (cudaSuccess) or an error code (a cudaError_t, or another code of the table) that
// ``error_string`` names, on the calling thread; ``stream`` is a
// cudaStream_t. Pointers are device pointers unless named host.
#pragma once

#include <cstdint>

#include "../adamw_math.h"

namespace fusedlr {
namespace cuda {

struct Launchers {
  // launch.h's launch_grad_stats / launch_adamw_update / launch_adamw_update_set / grad_stats_grid /
  // adamw_update_grid (``set``: the grid of launch_adamw_update_set with nseg > 0).
  int (*grad_stats)(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
                    const float* scale, bool reset, float* out, float* workspace, int grid, void* stream);
  int (*adamw_update)(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                      const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp, int state_dtype,
                      const StepOutputs& outs, int grid, void* stream);
  int (*adamw_update_set)(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks, int64_t nseg,
                          const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp, int state_dtype,
                          const StepOutputs& outs, int grid, void* stream);
  int (*grad_stats_grid)(int dtype, int64_t total_chunks, int device, int* grid);
  int (*adamw_update_grid)(int dtype, bool amsgrad, bool low_precision, int state_dtype, int64_t total_chunks,
                           int device, bool set, int* grid);
  // The current stream of ``device`` (what the ops launch on).
  void* (*current_stream)(int device);
  // Copies ``bytes`` from the host buffer ``host`` to ``dst`` on ``device``, ordered on ``stream`` and
  // without a host-device sync (CUDA: through a fresh pinned buffer, as bindings_cuda.cpp's upload_table);
  // ``host`` may be rewritten as soon as it returns.
  int (*upload)(void* dst, const void* host, int64_t bytes, int device, void* stream);
  // The message of an error code.
  const char* (*error_string)(int error);
};

}  // namespace cuda
}  // namespace fusedlr
