// The Launchers table of the CUDA build (csrc/cuda/launchers.h): launch.h's host launchers, the current
// stream of c10, and the table upload of bindings_cuda.cpp (a fresh pinned buffer from the caching host
// allocator, copied asynchronously on the stream: no host-device sync).
#include "launchers.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <exception>
#include <string>

#include "launch.h"

namespace fusedlr {
namespace cuda {
namespace {

int grad_stats(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
               const float* scale, bool reset, float* out, float* workspace, int grid, void* stream) {
  return launch_grad_stats(dtype, table, n, total_chunks, inv_scale, scale, reset, out, workspace, grid,
                           static_cast<cudaStream_t>(stream));
}

int adamw_update(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                 const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp, int state_dtype,
                 const StepOutputs& outs, int grid, void* stream) {
  return launch_adamw_update(dtype, amsgrad, table, n, total_chunks, hyper, in, lp, state_dtype, outs, grid,
                             static_cast<cudaStream_t>(stream));
}

int adamw_update_set(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks, int64_t nseg,
                     const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp, int state_dtype,
                     const StepOutputs& outs, int grid, void* stream) {
  return launch_adamw_update_set(dtype, amsgrad, table, n, total_chunks, nseg, hyper, in, lp, state_dtype, outs, grid,
                                 static_cast<cudaStream_t>(stream));
}

int stats_grid(int dtype, int64_t total_chunks, int device, int* grid) {
  return grad_stats_grid(dtype, total_chunks, device, grid);
}

int update_grid(int dtype, bool amsgrad, bool low_precision, int state_dtype, int64_t total_chunks, int device,
                bool set, int* grid) {
  return adamw_update_grid(dtype, amsgrad, low_precision, state_dtype, total_chunks, device, grid, set);
}

void* current_stream(int device) { return c10::cuda::getCurrentCUDAStream(device).stream(); }

// The error code of a failed upload (not a cudaError_t), whose message is upload_error.
constexpr int kUploadFailed = -1;
thread_local std::string upload_error;

int upload(void* dst, const void* host, int64_t bytes, int device, void* stream) {
  try {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    TORCH_CHECK(c10::cuda::getCurrentCUDAStream(device).stream() == static_cast<cudaStream_t>(stream),
                "fusedlr: a table upload on another stream than the current one");
    at::Tensor pinned = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(pinned.data_ptr(), host, static_cast<size_t>(bytes));
    at::Tensor target = at::from_blob(dst, {bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
    target.copy_(pinned, /*non_blocking=*/true);  // cudaMemcpyAsync on the current stream; the pinned block is
                                                  // recycled only after the copy (the host allocator's event)
    return cudaSuccess;
  } catch (const std::exception& e) {
    upload_error = e.what();
    return kUploadFailed;
  }
}

const char* error_string(int error) {
  return error == kUploadFailed ? upload_error.c_str() : cudaGetErrorString(static_cast<cudaError_t>(error));
}

const Launchers kLaunchers{grad_stats,  adamw_update,   adamw_update_set, stats_grid,
                           update_grid, current_stream, upload,           error_string};

}  // namespace

const Launchers* device_launchers() { return &kLaunchers; }

}  // namespace cuda
}  // namespace fusedlr
