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

// Element type T in memory <-> math type S in registers (float, or double for double).
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using S = float;
  static FUSEDLR_HD float load(float x) { return x; }
  static FUSEDLR_HD float store(float x) { return x; }
};
template <>
struct Elem<double> {
  using S = double;
  static FUSEDLR_HD double load(double x) { return x; }
  static FUSEDLR_HD double store(double x) { return x; }
};
template <>
struct Elem<__half> {
  using S = float;
  static FUSEDLR_HD float load(__half x) { return __half2float(x); }
  static FUSEDLR_HD __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Elem<__nv_bfloat16> {
  using S = float;
  static FUSEDLR_HD float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static FUSEDLR_HD __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
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

// Where one chunk lies: its tensor, its first element within the tensor and its length.
struct ChunkRef {
  int64_t tensor;
  int64_t start;
  int len;
};

template <int NPTR>
FUSEDLR_HD ChunkRef locate(const int64_t* __restrict__ table, int64_t n, int64_t chunk) {
  const int64_t* numels = table + n * NPTR;
  const int64_t* prefix = table + n * (NPTR + 1);
  ChunkRef r;
  r.tensor = find_tensor(prefix, n, chunk);
  r.start = (chunk - prefix[r.tensor]) * kChunk;
  const int64_t left = numels[r.tensor] - r.start;
  r.len = static_cast<int>(left < kChunk ? left : kChunk);
  return r;
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

// Thread ``tid`` of ``nthreads``: its share of chunk ``r``, accumulated into sum/count.
template <typename T>
FUSEDLR_HD void stats_chunk(const int64_t* __restrict__ table, const ChunkRef& r, float inv, int tid, int nthreads,
                            float& sum, unsigned int& count) {
  constexpr int V = 16 / sizeof(T);  // elements per 16-byte access
  const T* g = table_ptr<const T>(table, kStatsPtrs, r.tensor, 0) + r.start;
  int tail = 0;
  if (pack_aligned<T, V>(g)) {
    const int packs = r.len / V;
    const Pack<T, V>* gp = reinterpret_cast<const Pack<T, V>*>(g);
    for (int q = tid; q < packs; q += nthreads) {
      const Pack<T, V> x = gp[q];
#pragma unroll
      for (int l = 0; l < V; ++l) stats_element(x.v[l], inv, sum, count);
    }
    tail = packs * V;
  }
  for (int j = tail + tid; j < r.len; j += nthreads) stats_element(g[j], inv, sum, count);
}

// ---------------------------------------------------------------- pass 2
constexpr int kUpdateVec = 4;  // elements per vector access of the update

// Thread ``tid`` of ``nthreads``: its share of the update of chunk ``r`` with coefficients ``c``.
template <typename T, bool AMSGRAD>
FUSEDLR_HD void update_chunk(const int64_t* __restrict__ table, const ChunkRef& r,
                             const AdamWCoeffs<typename Elem<T>::S>& c, int tid, int nthreads) {
  using S = typename Elem<T>::S;
  constexpr int V = kUpdateVec;
  T* p = table_ptr<T>(table, kUpdatePtrs, r.tensor, 0) + r.start;
  const T* g = table_ptr<const T>(table, kUpdatePtrs, r.tensor, 1) + r.start;
  S* m = table_ptr<S>(table, kUpdatePtrs, r.tensor, 2) + r.start;
  S* v = table_ptr<S>(table, kUpdatePtrs, r.tensor, 3) + r.start;
  S* vmax = AMSGRAD ? table_ptr<S>(table, kUpdatePtrs, r.tensor, 4) + r.start : nullptr;

  int tail = 0;
  const bool aligned = pack_aligned<T, V>(p) && pack_aligned<T, V>(g) && pack_aligned<S, V>(m) &&
                       pack_aligned<S, V>(v) && (!AMSGRAD || pack_aligned<S, V>(vmax));
  if (aligned) {
    const int packs = r.len / V;
    for (int q = tid; q < packs; q += nthreads) {
      Pack<T, V> pp = reinterpret_cast<const Pack<T, V>*>(p)[q];
      const Pack<T, V> gp = reinterpret_cast<const Pack<T, V>*>(g)[q];
      Pack<S, V> mp = reinterpret_cast<const Pack<S, V>*>(m)[q];
      Pack<S, V> vp = reinterpret_cast<const Pack<S, V>*>(v)[q];
      Pack<S, V> wp;
      if (AMSGRAD) wp = reinterpret_cast<const Pack<S, V>*>(vmax)[q];
#pragma unroll
      for (int l = 0; l < V; ++l) {
        S pj = Elem<T>::load(pp.v[l]);
        adamw_element<AMSGRAD>(pj, Elem<T>::load(gp.v[l]), mp.v[l], vp.v[l], wp.v[l], c);
        pp.v[l] = Elem<T>::store(pj);
      }
      reinterpret_cast<Pack<T, V>*>(p)[q] = pp;
      reinterpret_cast<Pack<S, V>*>(m)[q] = mp;
      reinterpret_cast<Pack<S, V>*>(v)[q] = vp;
      if (AMSGRAD) reinterpret_cast<Pack<S, V>*>(vmax)[q] = wp;
    }
    tail = packs * V;
  }
  for (int j = tail + tid; j < r.len; j += nthreads) {
    S pj = Elem<T>::load(p[j]);
    S mj = m[j], vj = v[j];
    S wj = AMSGRAD ? vmax[j] : S(0);
    adamw_element<AMSGRAD>(pj, Elem<T>::load(g[j]), mj, vj, wj, c);
    p[j] = Elem<T>::store(pj);
    m[j] = mj;
    v[j] = vj;
    if (AMSGRAD) vmax[j] = wj;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace fusedlr
