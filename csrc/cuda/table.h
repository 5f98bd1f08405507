// The pointer table of the CUDA multi-tensor launches: layout constants and the host-side
// builder, free of CUDA and torch headers (bindings.cpp exports the constants; the CUDA binding
// and the host emulation used by the tests build tables with fill_table).
#pragma once

#include <cstdint>
#include <cstring>

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

constexpr int64_t table_size(int64_t n, int nptr) { return n * (nptr + 2) + 1; }
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

// A launch set (adamw_update_set): the update table of its n tensors (every segment's, in order) is followed
// by the set region of ``nseg`` segments, int64 entries:
//   [0, n)                                 each tensor's segment
//   [n, n + nseg * kSegmentWords)          the segments (SetSegment each)
constexpr int kSegmentWords = 12;

// One segment (one bucket, one param group) of a launch set: its tensors [first, first + its size), their
// steps tensor (indexed from ``first``), hyperparameters, tensor LR (null: ``lr``), applied-LR entry (or null)
// and pids (stochastic rounding, indexed as ``steps``).
struct SetSegment {
  int64_t first;
  int64_t* steps;
  const float* lr_f32;
  const double* lr_f64;
  double* applied_lr;
  const int64_t* pids;
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  int64_t maximize;  // 0/1
};
static_assert(sizeof(SetSegment) == kSegmentWords * sizeof(int64_t), "SetSegment is kSegmentWords int64 entries");

constexpr int64_t set_region_size(int64_t n, int64_t nseg) { return n + nseg * kSegmentWords; }

// Writes the set region of ``nseg`` segments (``sizes[s]`` tensors each, n in all) into ``out``
// (set_region_size(n, nseg) entries); each segment's ``first`` is filled here.
inline void fill_set_region(const SetSegment* segs, const int64_t* sizes, int64_t nseg, int64_t* out) {
  int64_t n = 0;
  for (int64_t s = 0; s < nseg; ++s) n += sizes[s];
  int64_t first = 0;
  for (int64_t s = 0; s < nseg; ++s) {
    for (int64_t i = 0; i < sizes[s]; ++i) out[first + i] = s;
    SetSegment seg = segs[s];
    seg.first = first;
    std::memcpy(out + n + s * kSegmentWords, &seg, sizeof(seg));
    first += sizes[s];
  }
}

}  // namespace cuda
}  // namespace fusedlr
