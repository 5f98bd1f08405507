// The per-chunk work of the fusedlr CUDA kernels, as __host__ __device__ functions (plain CUDA,
// no torch headers): the kernels (grad_stats.cu, adamw_update.cu) run them with one CUDA thread
// per ``tid``; the tests also run the kernels themselves on the CPU against a CUDA shim
// (csrc/cuda/testing/cuda_shim.h, tests/cuda_on_host.py).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../adamw_math.h"
#include "table.h"

namespace fusedlr {
namespace cuda {
namespace detail {

// Element type T in memory <-> math type S in registers (float, or double for double); the
// element traits of adamw_element_lp (bfloat16 also gives its bits).
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using T = float;
  using S = float;
  static constexpr bool kBf16 = false;
  static FUSEDLR_HD float load(float x) { return x; }
  static FUSEDLR_HD float store(float x) { return x; }
};
template <>
struct Elem<double> {
  using T = double;
  using S = double;
  static constexpr bool kBf16 = false;
  static FUSEDLR_HD double load(double x) { return x; }
  static FUSEDLR_HD double store(double x) { return x; }
};
template <>
struct Elem<__half> {
  using T = __half;
  using S = float;
  static constexpr bool kBf16 = false;
  static FUSEDLR_HD float load(__half x) { return __half2float(x); }
  static FUSEDLR_HD __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  using T = __nv_bfloat16;
  using S = float;
  static constexpr bool kBf16 = true;
  static FUSEDLR_HD float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static FUSEDLR_HD __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
  static FUSEDLR_HD uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  static FUSEDLR_HD __nv_bfloat16 from_bits(uint16_t b) { return __ushort_as_bfloat16(b); }
};

// N consecutive elements, loaded and stored as one (or two) vector accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
FUSEDLR_HD bool pack_aligned(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N)) == 0;
}

// The tensor owning global chunk c: the last i with prefix[i] <= c (prefix[0] = 0 <= c < prefix[n]),
// which skips tensors without chunks (zero-size tensors).
FUSEDLR_HD int64_t find_tensor(const int64_t* __restrict__ prefix, int64_t n, int64_t c) {
  int64_t lo = 0, hi = n;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (prefix[mid] <= c) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// The tensor owning chunk c, given the tensor ``t`` owning an earlier chunk: walks forward past the
// tensors that end at or before c (zero-size ones included).
FUSEDLR_HD int64_t next_tensor(const int64_t* __restrict__ prefix, int64_t t, int64_t c) {
  while (prefix[t + 1] <= c) ++t;
  return t;
}

// Where one chunk lies: its tensor, its first element within the tensor and its length.
struct ChunkRef {
  int64_t tensor;
  int64_t start;
  int len;
};

// A run of consecutive chunks of one tensor: its elements [start, start + len).
struct Span {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

// The chunks of block ``b`` of ``grid``: [b * total / grid, (b + 1) * total / grid), a contiguous,
// balanced split (block sizes differ by at most one chunk; all 64-bit).
struct ChunkRange {
  int64_t first;
  int64_t last;
};
FUSEDLR_HD ChunkRange block_chunks(int64_t total, int64_t grid, int64_t b) {
  return ChunkRange{b * total / grid, (b + 1) * total / grid};
}

// The chunks [first, last) of a table of NPTR pointers per tensor, tensor by tensor, in table order:
// one binary search at construction, then ``next`` walks forward (tensors without chunks in the range,
// zero-size ones included, are skipped) and gives the span of each tensor holding some of them.
template <int NPTR>
class SpanWalk {
 public:
  FUSEDLR_HD SpanWalk(const int64_t* __restrict__ table, int64_t n, ChunkRange range)
      : numels_(table + n * NPTR), prefix_(table + n * (NPTR + 1)), chunk_(range.first), last_(range.last),
        tensor_(find_tensor(prefix_, n, range.first)) {}

  // The next tensor's span (false when the range is done).
  FUSEDLR_HD bool next(Span& s) {
    if (chunk_ >= last_) return false;
    tensor_ = next_tensor(prefix_, tensor_, chunk_);  // prefix_[n] = total > chunk_ stops it
    const int64_t end = prefix_[tensor_ + 1] < last_ ? prefix_[tensor_ + 1] : last_;
    s.tensor = tensor_;
    s.start = (chunk_ - prefix_[tensor_]) * kChunk;
    const int64_t stop = (end - prefix_[tensor_]) * kChunk;
    s.len = (stop < numels_[tensor_] ? stop : numels_[tensor_]) - s.start;
    chunk_ = end;
    return true;
  }

 private:
  const int64_t* numels_;
  const int64_t* prefix_;
  int64_t chunk_, last_, tensor_;
};

// Chunk ``chunk`` of a table of NPTR pointers per tensor, owned by tensor ``t``.
template <int NPTR>
FUSEDLR_HD ChunkRef chunk_ref(const int64_t* __restrict__ table, int64_t n, int64_t t, int64_t chunk) {
  const int64_t start = (chunk - table[n * (NPTR + 1) + t]) * kChunk;
  const int64_t left = table[n * NPTR + t] - start;
  return ChunkRef{t, start, static_cast<int>(left < kChunk ? left : kChunk)};
}

template <typename T>
FUSEDLR_HD T* table_ptr(const int64_t* __restrict__ table, int nptr, int64_t tensor, int which) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[tensor * nptr + which]));
}

// ---------------------------------------------------------------- pass 1
template <typename T>
FUSEDLR_HD void stats_element(T x, float inv, float& sum, unsigned int& count) {
  const typename Elem<T>::S xs = Elem<T>::load(x);  // exact; the non-finite test is on the grad itself
  count += isfinite(xs) ? 0u : 1u;
  const float f = static_cast<float>(xs) * inv;  // g.to(float32) * inv_scale
  sum += f * f;
}

// 16-byte loads a thread of pass 1 issues before using any (64 bytes in flight per thread).
constexpr int kStatsLoads = 4;

// Thread ``tid`` of ``nthreads``: its share of span ``s``, accumulated into sum/count. When the span
// is 16-byte aligned, thread tid takes the 16-byte packs q = tid (mod nthreads): kStatsLoads of them
// (q, q + nthreads, ...) loaded at once, then summed in that order element by element; the packs left
// one by one; then the elements past the last whole pack, j = tid (mod nthreads). Otherwise only the
// last loop runs. The order is fixed by (span, tid, nthreads).
template <typename T>
FUSEDLR_HD void stats_span(const int64_t* __restrict__ table, const Span& s, float inv, int tid, int nthreads,
                           float& sum, unsigned int& count) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte access
  constexpr int U = kStatsLoads;
  const T* g = table_ptr<const T>(table, kStatsPtrs, s.tensor, 0) + s.start;
  int64_t tail = 0;
  if (pack_aligned<T, V>(g)) {
    const int64_t packs = s.len / V;
    const Pack<T, V>* gp = reinterpret_cast<const Pack<T, V>*>(g);
    int64_t q = tid;
    for (; q + (U - 1) * static_cast<int64_t>(nthreads) < packs; q += U * static_cast<int64_t>(nthreads)) {
      Pack<T, V> x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) x[u] = gp[q + u * static_cast<int64_t>(nthreads)];
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int l = 0; l < V; ++l) stats_element(x[u].v[l], inv, sum, count);
      }
    }
    for (; q < packs; q += nthreads) {
      const Pack<T, V> x = gp[q];
#pragma unroll
      for (int l = 0; l < V; ++l) stats_element(x.v[l], inv, sum, count);
    }
    tail = packs * V;
  }
  for (int64_t j = tail + tid; j < s.len; j += nthreads) stats_element(g[j], inv, sum, count);
}

// ---------------------------------------------------------------- pass 2
constexpr int kUpdateVec = 4;        // elements per vector access of the update
constexpr int kLowPrecisionVec = 8;  // of the low-precision update (but fp64): 16 bytes of its 16-bit tensors

// One element: param/grad T, moments M; the fp32 ``master`` and the ``remainder`` bits (low-precision
// modes only, LOWP) of the element at offset ``i`` of its tensor.
template <typename T, typename M, bool AMSGRAD, bool LOWP>
FUSEDLR_HD void update_element(T& p, T g, M& m, M& v, M& vmax, float& master, uint16_t& remainder,
                               const AdamWCoeffs<typename Elem<T>::S>& c, const LowPrecision& lp, const RngKeys& k,
                               int64_t i) {
  if constexpr (LOWP) {
    adamw_element_lp<Elem<T>, Elem<M>, AMSGRAD>(p, g, m, v, vmax, master, remainder, c, lp, k, i);
  } else {
    typename Elem<T>::S ps = Elem<T>::load(p);
    adamw_element<AMSGRAD>(ps, Elem<T>::load(g), m, v, vmax, c);
    p = Elem<T>::store(ps);
  }
}

// Thread ``tid`` of ``nthreads``: its share of the update of chunk ``r`` with coefficients ``c``. Without
// LOWP the moments M are of the math type and ``lp``/``k`` are unused; with it, the table's pointers 5
// and 6 are the masters or the remainders of ``lp.master``, ``k`` the tensor's random-bit keys.
template <typename T, typename M, bool AMSGRAD, bool LOWP>
FUSEDLR_HD void update_chunk(const int64_t* __restrict__ table, const ChunkRef& r,
                             const AdamWCoeffs<typename Elem<T>::S>& c, const LowPrecision& lp, const RngKeys& k,
                             int tid, int nthreads) {
  // fp64: registers (its default update: one 16-byte access per array and iteration, to fit 128 of them)
  constexpr int V = sizeof(T) == 8 ? (LOWP ? kUpdateVec : 2) : (LOWP ? kLowPrecisionVec : kUpdateVec);
  T* p = table_ptr<T>(table, kUpdatePtrs, r.tensor, 0) + r.start;
  const T* g = table_ptr<const T>(table, kUpdatePtrs, r.tensor, 1) + r.start;
  M* m = table_ptr<M>(table, kUpdatePtrs, r.tensor, 2) + r.start;
  M* v = table_ptr<M>(table, kUpdatePtrs, r.tensor, 3) + r.start;
  M* vmax = AMSGRAD ? table_ptr<M>(table, kUpdatePtrs, r.tensor, 4) + r.start : nullptr;
  float* master = LOWP && lp.master == kFullMaster ? table_ptr<float>(table, kUpdatePtrs, r.tensor, 5) + r.start
                                                   : nullptr;
  uint16_t* rem = LOWP && lp.master == kRemainderMaster
                      ? table_ptr<uint16_t>(table, kUpdatePtrs, r.tensor, 6) + r.start
                      : nullptr;

  int tail = 0;
  const bool aligned = pack_aligned<T, V>(p) && pack_aligned<T, V>(g) && pack_aligned<M, V>(m) &&
                       pack_aligned<M, V>(v) && (!AMSGRAD || pack_aligned<M, V>(vmax)) &&
                       (!LOWP || ((master == nullptr || pack_aligned<float, V>(master)) &&
                                  (rem == nullptr || pack_aligned<uint16_t, V>(rem))));
  if (aligned) {
    const int packs = r.len / V;
    for (int q = tid; q < packs; q += nthreads) {
      Pack<T, V> pp = reinterpret_cast<const Pack<T, V>*>(p)[q];
      const Pack<T, V> gp = reinterpret_cast<const Pack<T, V>*>(g)[q];
      Pack<M, V> mp = reinterpret_cast<const Pack<M, V>*>(m)[q];
      Pack<M, V> vp = reinterpret_cast<const Pack<M, V>*>(v)[q];
      Pack<M, V> wp;
      Pack<float, V> fp;
      Pack<uint16_t, V> rp;
      if (AMSGRAD) wp = reinterpret_cast<const Pack<M, V>*>(vmax)[q];
      if (LOWP && master != nullptr) fp = reinterpret_cast<const Pack<float, V>*>(master)[q];
      if (LOWP && rem != nullptr) rp = reinterpret_cast<const Pack<uint16_t, V>*>(rem)[q];
#pragma unroll
      for (int l = 0; l < V; ++l) {
        update_element<T, M, AMSGRAD, LOWP>(pp.v[l], gp.v[l], mp.v[l], vp.v[l], wp.v[l], fp.v[l], rp.v[l], c, lp, k,
                                            r.start + static_cast<int64_t>(q) * V + l);
      }
      reinterpret_cast<Pack<T, V>*>(p)[q] = pp;
      reinterpret_cast<Pack<M, V>*>(m)[q] = mp;
      reinterpret_cast<Pack<M, V>*>(v)[q] = vp;
      if (AMSGRAD) reinterpret_cast<Pack<M, V>*>(vmax)[q] = wp;
      if (LOWP && master != nullptr) reinterpret_cast<Pack<float, V>*>(master)[q] = fp;
      if (LOWP && rem != nullptr) reinterpret_cast<Pack<uint16_t, V>*>(rem)[q] = rp;
    }
    tail = packs * V;
  }
  for (int j = tail + tid; j < r.len; j += nthreads) {
    T pj = p[j];
    M mj = m[j], vj = v[j];
    M wj = AMSGRAD ? vmax[j] : M{};
    float fj = LOWP && master != nullptr ? master[j] : 0.0f;
    uint16_t rj = LOWP && rem != nullptr ? rem[j] : 0;
    update_element<T, M, AMSGRAD, LOWP>(pj, g[j], mj, vj, wj, fj, rj, c, lp, k, r.start + j);
    p[j] = pj;
    m[j] = mj;
    v[j] = vj;
    if (AMSGRAD) vmax[j] = wj;
    if (LOWP && master != nullptr) master[j] = fj;
    if (LOWP && rem != nullptr) rem[j] = rj;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace fusedlr
