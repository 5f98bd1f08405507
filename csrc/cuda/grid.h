// The grid of the multi-tensor launches, sized from the occupancy of the kernel instance that runs
// (host code of the .cu files; cuda_shim.cpp supplies the runtime calls on the host).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "table.h"

namespace fusedlr {
namespace cuda {

// Into ``grid``: min(total_chunks, SMs * the blocks of ``kernel`` at kThreads threads resident on one SM
// of ``device`` (cudaOccupancyMaxActiveBlocksPerMultiprocessor), at most kBlocksPerSm, at least 1). The
// product is queried once per (kernel, device) and cached; the queries do not synchronize any stream.
inline cudaError_t occupancy_grid(const void* kernel, int device, int64_t total_chunks, int* grid) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> resident;  // blocks on the whole device
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = resident.find({kernel, device});
  if (it == resident.end()) {
    int sms = 0, per_sm = 0;
    cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
    if (err != cudaSuccess) return err;
    per_sm = per_sm < 1 ? 1 : (per_sm > kBlocksPerSm ? kBlocksPerSm : per_sm);
    it = resident.emplace(std::make_pair(kernel, device), static_cast<int64_t>(sms < 1 ? 1 : sms) * per_sm).first;
  }
  *grid = static_cast<int>(total_chunks < it->second ? (total_chunks < 1 ? 1 : total_chunks) : it->second);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fusedlr
