// The pointer table of the CUDA multi-tensor launches: layout constants and the host-side
// builder, free of CUDA and torch headers (bindings.cpp exports the constants; the CUDA binding
// and the host emulation used by the tests build tables with fill_table).
#pragma once

#include <cstdint>

namespace fusedlr {
namespace cuda {

// Elements handled by one chunk of the multi-tensor launch (a block processes whole chunks).
constexpr int64_t kChunk = 8192;
constexpr int kThreads = 512;
// Most blocks per SM a launch uses (its grid is at most SMs * kBlocksPerSm blocks).
constexpr int kBlocksPerSm = 2048 / kThreads;

// Device table of a launch over n tensors, int64 entries:
//   [0, n * nptr)                          pointers, tensor-major (nptr per tensor)
//   [n * nptr, n * (nptr + 1))             numels
//   [n * (nptr + 1), n * (nptr + 2) + 1)   chunk prefix: first global chunk of tensor i, then the total
// Zero-size tensors own no chunk and are never touched. All offsets are 64-bit.
constexpr int kStatsPtrs = 1;   // g
constexpr int kUpdatePtrs = 7;  // p, g, m, v, vmax, master, remainder (0 where absent)

inline int64_t table_size(int64_t n, int nptr) { return n * (nptr + 2) + 1; }
inline int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Writes the table of n tensors into ``out`` (table_size(n, nptr) entries) from ``ptrs``
// (n * nptr addresses, tensor-major) and ``numels``; returns the total number of chunks.
inline int64_t fill_table(const int64_t* ptrs, const int64_t* numels, int64_t n, int nptr, int64_t* out) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < nptr; ++j) out[i * nptr + j] = ptrs[i * nptr + j];
    out[n * nptr + i] = numels[i];
    out[n * (nptr + 1) + i] = chunks;
    chunks += num_chunks(numels[i]);
  }
  out[n * (nptr + 2)] = chunks;
  return chunks;
}

}  // namespace cuda
}  // namespace fusedlr
