// The CUDA execution model on the host, for tests without a GPU: with this header force-included
// (g++ -include cuda_shim.h) a .cu file compiles as C++, and its __global__ kernels run with a real
// grid over CPU memory. Nothing here knows the fusedlr kernels (tests/cuda_on_host.py rewrites the
// ``kernel<<<grid, block, smem, stream>>>(args)`` launch syntax into ``cudashim::Launch``).
//
// Model (cuda_shim.cpp): every CUDA thread is a fiber with its own stack; the fibers of up to
// ``resident`` blocks at a time run interleaved on one OS thread, in a random (seeded) order:
//   - __syncthreads() is a per-block barrier over all blockDim threads (each call site numbered by
//     the rewrite, so that a test can remove one at run time and check that something then fails). A barrier that can never
//     complete (some threads exited or wait elsewhere) is reported as an error, not a hang.
//   - __shfl_*_sync / __ballot_sync / __syncwarp wait for every lane of their mask (the masks must
//     agree), like the hardware since Volta.
//   - every shim primitive (atomics, __ldg, fences, barriers, warp ops) is a point where the running
//     thread may be switched out (probability ``yield_prob``), so a missing barrier or an ordering
//     race changes the result under some seed.
//   - __shared__ variables are statics that register themselves (tests/cuda_on_host.py rewrites
//     ``__shared__ T x[N];`` into ``static T x[N]; cudashim::shared_region(&x, sizeof x);``): each
//     resident block has its own copy, swapped in when one of its threads runs, and filled with
//     0xFF bytes (NaN floats) when the block starts.
//   - atomics are atomic (one OS thread); kernels see blockIdx/threadIdx/blockDim/gridDim and
//     warpSize as on the device. Dynamic shared memory (extern __shared__) is not modelled.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __constant__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace cudashim {

// What the running CUDA thread sees.
struct ThreadView {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern const ThreadView* current;

// Runs ``body`` (one call of the kernel) for every thread of the grid; returns the launch error.
cudaError_t run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body);

// Primitives of the running thread (not inline: the compiler must assume they touch memory).
void yield_point();
void block_barrier();
void barrier_at(int site);  // __syncthreads() number ``site`` of the sources (see cudashim_disable_barrier)
int block_barrier_count(int predicate);
unsigned warp_sync(unsigned mask);
unsigned active_lanes();  // lanes of the running thread's warp that have not exited
const uint64_t* warp_exchange(unsigned mask, uint64_t bits);  // the 32 lanes' values
unsigned lane_id();

// Declares a __shared__ variable of the running kernel (called by every thread passing it).
void shared_region(void* address, size_t bytes);

// ``kernel<<<grid, block, smem, stream>>>(args...)`` is ``Launch(grid, block, smem, stream).run(kernel, args...)``:
// the arguments are converted to the kernel's parameter types and copied, as by a real launch.
struct Launch {
  dim3 grid, block;
  size_t smem;
  Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    run_grid(grid, block, smem, [&] { std::apply(kernel, params); });
  }
};

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp ops move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
// Value of lane ``src`` (within the lane's segment of ``width`` lanes), as __shfl_sync returns it.
template <typename T>
T shuffle(unsigned mask, T v, int width, int (*source)(int lane, int arg, int width), int arg) {
  const uint64_t* lanes = warp_exchange(mask, to_bits(v));
  const int lane = static_cast<int>(lane_id());
  return from_bits<T>(lanes[source(lane, arg, width)]);
}
inline int src_idx(int lane, int arg, int width) { return (lane / width) * width + (arg % width); }
inline int src_up(int lane, int arg, int width) { return lane % width >= arg ? lane - arg : lane; }
inline int src_down(int lane, int arg, int width) { return lane % width + arg < width ? lane + arg : lane; }
inline int src_xor(int lane, int arg, int width) {
  const int other = lane ^ arg;
  return other / width == lane / width ? other : lane;
}

template <typename T>
T atomic_update(T* address, const std::function<T(T)>& op) {
  yield_point();
  const T old = *address;
  *address = op(old);
  yield_point();
  return old;
}

}  // namespace cudashim

#define threadIdx (::cudashim::current->thread_idx)
#define blockIdx (::cudashim::current->block_idx)
#define blockDim (::cudashim::current->block_dim)
#define gridDim (::cudashim::current->grid_dim)
#define warpSize 32

inline void __syncthreads() { ::cudashim::block_barrier(); }
inline int __syncthreads_count(int p) { return ::cudashim::block_barrier_count(p); }
inline int __syncthreads_or(int p) { return ::cudashim::block_barrier_count(p) > 0; }
inline int __syncthreads_and(int p) {
  return ::cudashim::block_barrier_count(p) ==
         static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::cudashim::warp_sync(mask); }
inline void __threadfence() { ::cudashim::yield_point(); }
inline void __threadfence_block() { ::cudashim::yield_point(); }
inline unsigned __activemask() { return ::cudashim::active_lanes(); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::cudashim::shuffle(mask, v, width, ::cudashim::src_idx, src);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cudashim::shuffle(mask, v, width, ::cudashim::src_up, static_cast<int>(delta));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::cudashim::shuffle(mask, v, width, ::cudashim::src_down, static_cast<int>(delta));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::cudashim::shuffle(mask, v, width, ::cudashim::src_xor, lane_mask);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const uint64_t* lanes = ::cudashim::warp_exchange(mask, predicate != 0);
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) out |= ((mask >> l) & 1u) && lanes[l] ? (1u << l) : 0u;
  return out;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == mask; }

template <typename T>
T __ldg(const T* p) {
  ::cudashim::yield_point();
  return *p;
}

template <typename T, typename V>
T atomicAdd(T* a, V v) {
  return ::cudashim::atomic_update<T>(a, [v](T x) { return static_cast<T>(x + v); });
}
template <typename T, typename V>
T atomicSub(T* a, V v) {
  return ::cudashim::atomic_update<T>(a, [v](T x) { return static_cast<T>(x - v); });
}
template <typename T, typename V>
T atomicExch(T* a, V v) {
  return ::cudashim::atomic_update<T>(a, [v](T) { return static_cast<T>(v); });
}
template <typename T, typename V>
T atomicMax(T* a, V v) {
  return ::cudashim::atomic_update<T>(a, [v](T x) { return x < static_cast<T>(v) ? static_cast<T>(v) : x; });
}
template <typename T, typename V>
T atomicMin(T* a, V v) {
  return ::cudashim::atomic_update<T>(a, [v](T x) { return static_cast<T>(v) < x ? static_cast<T>(v) : x; });
}
template <typename T, typename V>
T atomicOr(T* a, V v) {
  return ::cudashim::atomic_update<T>(a, [v](T x) { return static_cast<T>(x | v); });
}
template <typename T, typename V>
T atomicAnd(T* a, V v) {
  return ::cudashim::atomic_update<T>(a, [v](T x) { return static_cast<T>(x & v); });
}
template <typename T, typename V>
T atomicXor(T* a, V v) {
  return ::cudashim::atomic_update<T>(a, [v](T x) { return static_cast<T>(x ^ v); });
}
template <typename T, typename C, typename V>
T atomicCAS(T* a, C compare, V v) {
  return ::cudashim::atomic_update<T>(a, [compare, v](T x) { return x == static_cast<T>(compare) ? static_cast<T>(v) : x; });
}
inline unsigned atomicInc(unsigned* a, unsigned limit) {
  return ::cudashim::atomic_update<unsigned>(a, [limit](unsigned x) { return x >= limit ? 0u : x + 1u; });
}
inline unsigned atomicDec(unsigned* a, unsigned limit) {
  return ::cudashim::atomic_update<unsigned>(a, [limit](unsigned x) { return x == 0u || x > limit ? limit : x - 1u; });
}

// The math of device code, called unqualified as in CUDA.
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
template <typename A, typename B>
std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }

// Device intrinsics without a host definition in the toolkit's headers.
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline int __float_as_int(float x) { return ::cudashim::from_bits<int>(::cudashim::to_bits(x)); }
inline unsigned __float_as_uint(float x) { return ::cudashim::from_bits<unsigned>(::cudashim::to_bits(x)); }
inline float __int_as_float(int x) { return ::cudashim::from_bits<float>(::cudashim::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return ::cudashim::from_bits<float>(::cudashim::to_bits(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
