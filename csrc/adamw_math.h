// The AdamW math of fusedlr, shared by the CPU and CUDA kernels (no torch headers).
//
// Specification: the docstring of ``fusedlr/reference.py``. Per step, in double:
//   lr_t  = lr * sched(k)                                  (lr when there is no schedule)
//   x     = max_norm / (sqrt(stats[0]) + 1e-6)             (global-norm clip, when max_norm is set)
//   coef  = 1 if x >= 1 else x                             (NaN propagates, as in clip_grad_norm_)
//   scale = coef * inv_scale                               (each factor 1 when absent)
// per tensor, with t = its step (already incremented):
//   bias1 = 1 - beta1^t, bias2 = 1 - beta2^t               (as -expm1(t * log(beta)))
// and per element, in the state type S (float, or double for double params):
//   g = grad * scale (negated when maximize); p *= 1 - lr_t * wd; m = lerp(m, g, 1 - beta1);
//   v = beta2 * v + (1 - beta2) * g * g; vmax = max(vmax, v) (amsgrad: the denominator uses vmax);
//   p -= lr_t / bias1 * m / (sqrt(v) / sqrt(bias2) + eps).
// Nothing is written when found_inf > 0 (or, with StepInputs::skip_nonfinite, stats[1] > 0).
//
// The low-precision modes (fp32 master, 16-bit remainder, stochastic rounding, bf16 moments) load
// and store around the same per-element math (``adamw_element_lp``); their bit-level spec is the
// docstring of ``fusedlr/precision.py``.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "schedule.h"

namespace fusedlr {

// Element types the kernels support (the torch side, the CUDA launchers and tests/cuda_on_host.py).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

//: Added to the global norm before dividing (``fusedlr.control.CLIP_EPS``).
constexpr double kClipEps = 1e-6;

// Hyperparameters of one launch (one param group), plain host values.
struct AdamWHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double max_norm;  // used when has_max_norm
  bool has_max_norm;
  bool maximize;
};

// Host-side constructor shared by the CPU op, the CUDA op and the host emulation.
inline AdamWHyper make_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                             std::optional<double> max_norm, bool maximize) {
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.weight_decay = weight_decay;
  h.has_max_norm = max_norm.has_value();
  h.max_norm = max_norm.value_or(0.0);
  h.maximize = maximize;
  return h;
}

// Device-side (or, on CPU, host-side) inputs of a step: any pointer may be null when absent,
// except ``k`` and ``steps``.
struct StepInputs {
  const int64_t* k;          // int64 0-d: the schedule index
  const double* schedule;    // float64 [kind, *params], or null for a constant LR
  const float* stats;        // float32 [2]: [sum of squares, non-finite count], or null
  const float* inv_scale;    // float32 0-d, or null
  const float* found_inf;    // float32 0-d, or null
  const int64_t* steps;      // int64 [n]: per-tensor step number of this update
  const float* lr_f32;       // float32 0-d tensor LR (replaces AdamWHyper::lr), or null
  const double* lr_f64;      // float64 0-d tensor LR (replaces AdamWHyper::lr), or null
  double* applied_lr;        // float64 0-d: receives lr_t when the update is applied, or null
  const float* grad_scale;   // float32 0-d: GradScaler's scale, read when inv_scale is null (unscale_factor), or null
  bool skip_nonfinite;       // skip also when stats[1] > 0 (GradScaler's inf/NaN check from pass 1)
};

// What the last update launch of a step writes besides the tensors (each null when not wanted).
struct StepOutputs {
  int64_t* steps;         // int64 [n]: advanced by 1 when the update is applied; StepInputs::steps is then
                          // this tensor, holding the updates applied before (this update's step is steps + 1)
  int64_t* k;             // int64 0-d: the schedule index, advanced by 1 when the update is applied
  float* norm;            // float32 0-d: sqrt(stats[0]), written also when the update is skipped
  float* found_inf;       // float32 0-d: 1 when the update is skipped, else 0 (GradScaler's found_inf)
  unsigned int* arrival;  // CUDA: the blocks' arrival counter when steps or k is set, zero between launches
};

// The factor multiplying every gradient: ``*inv_scale``, else ``1 / *scale`` as GradScaler computes it
// (in float64, rounded to float32), else 1.
FUSEDLR_HD float unscale_factor(const float* inv_scale, const float* scale) {
  if (inv_scale != nullptr) return *inv_scale;
  if (scale != nullptr) return static_cast<float>(1.0 / static_cast<double>(*scale));
  return 1.0f;
}

// The group's LR: the tensor LR when one is given (read on the device), else the host value.
FUSEDLR_HD double base_lr(const AdamWHyper& h, const StepInputs& in) {
  if (in.lr_f64 != nullptr) return *in.lr_f64;
  if (in.lr_f32 != nullptr) return static_cast<double>(*in.lr_f32);
  return h.lr;
}

// Per-step scalars, in double.
struct StepScalars {
  double lr;     // lr_t = lr * sched(k)
  double scale;  // clip coefficient * inv_scale, negated when maximize
  bool skip;     // found_inf > 0 (or, with skip_nonfinite, stats[1] > 0): write nothing
};

FUSEDLR_HD StepScalars step_scalars(const AdamWHyper& h, const StepInputs& in) {
  StepScalars s;
  s.skip = (in.found_inf != nullptr && *in.found_inf > 0.0f) || (in.skip_nonfinite && in.stats[1] > 0.0f);
  const double lr = base_lr(h, in);
  s.lr = in.schedule != nullptr ? lr * schedule_multiplier(in.schedule, *in.k) : lr;
  double scale = 1.0;
  if (h.has_max_norm) {
    const double x = h.max_norm / (::sqrt(static_cast<double>(in.stats[0])) + kClipEps);
    scale = x >= 1.0 ? 1.0 : x;  // NaN -> NaN
  }
  if (in.inv_scale != nullptr || in.grad_scale != nullptr) {
    scale *= static_cast<double>(unscale_factor(in.inv_scale, in.grad_scale));
  }
  s.scale = h.maximize ? -scale : scale;
  return s;
}

// Writes ``o.norm`` and ``o.found_inf`` of a step whose scalars are ``s`` (once per step).
FUSEDLR_HD void write_step_flags(const StepInputs& in, const StepScalars& s, const StepOutputs& o) {
  if (o.norm != nullptr) *o.norm = ::sqrtf(in.stats[0]);
  if (o.found_inf != nullptr) *o.found_inf = s.skip ? 1.0f : 0.0f;
}

// ``1 - beta^t`` without cancellation.
FUSEDLR_HD double one_minus_pow(double beta, int64_t t) {
  return -::expm1(static_cast<double>(t) * ::log(beta));
}

FUSEDLR_HD float math_sqrt(float x) { return ::sqrtf(x); }
FUSEDLR_HD double math_sqrt(double x) { return ::sqrt(x); }

// Coefficients of one tensor's update, in the state type S.
template <typename S>
struct AdamWCoeffs {
  S scale;       // applied to the gradient (sign folds in maximize)
  S decay;       // 1 - lr_t * weight_decay
  S w1;          // 1 - beta1 (lerp weight)
  S beta2;
  S c2;          // 1 - beta2
  S bias2_sqrt;  // sqrt(1 - beta2^t)
  S lr_bias;     // lr_t / (1 - beta1^t)
  S eps;
};

template <typename S>
FUSEDLR_HD AdamWCoeffs<S> tensor_coeffs(const AdamWHyper& h, const StepScalars& s, int64_t step) {
  AdamWCoeffs<S> c;
  c.scale = static_cast<S>(s.scale);
  c.decay = static_cast<S>(1.0 - s.lr * h.weight_decay);
  c.w1 = static_cast<S>(1.0 - h.beta1);
  c.beta2 = static_cast<S>(h.beta2);
  c.c2 = static_cast<S>(1.0 - h.beta2);
  c.bias2_sqrt = static_cast<S>(::sqrt(one_minus_pow(h.beta2, step)));
  c.lr_bias = static_cast<S>(s.lr / one_minus_pow(h.beta1, step));
  c.eps = static_cast<S>(h.eps);
  return c;
}

// One element. ``p`` is the parameter converted to S; ``vmax`` is read and written only when AMSGRAD.
template <bool AMSGRAD, typename S>
FUSEDLR_HD void adamw_element(S& p, S g, S& m, S& v, S& vmax, const AdamWCoeffs<S>& c) {
  g = g * c.scale;
  p = p * c.decay;
  // torch.lerp(m, g, w1)
  const S diff = g - m;
  m = (c.w1 < S(0.5)) ? m + c.w1 * diff : g - diff * (S(1) - c.w1);
  v = v * c.beta2 + (c.c2 * g) * g;
  S d = v;
  if (AMSGRAD) {
    // torch.maximum: NaN propagates from either side
    vmax = (vmax > v || vmax != vmax) ? vmax : v;
    d = vmax;
  }
  const S denom = math_sqrt(d) / c.bias2_sqrt + c.eps;
  p = p - c.lr_bias * (m / denom);
}

// ---------------------------------------------------------------- low-precision modes
// Exactly ``fusedlr/precision.py`` (bits as uint32_t: the spec's arithmetic mod 2^32).

// Values of ``master``: the param is the whole state (none), or has an fp32 master in a float32
// tensor (full) or in its own bf16 bits plus an int16 remainder (remainder).
enum MasterKind : int { kNoMaster = 0, kFullMaster = 1, kRemainderMaster = 2 };

// ``fusedlr.precision.Streams``: the stored tensor an element's random bits are drawn for.
enum Stream : int { kStreamParam = 0, kStreamExpAvg = 1, kStreamExpAvgSq = 2, kStreamMaxExpAvgSq = 3 };

// The low-precision inputs of a launch (plain values; ``pids`` is a device pointer).
struct LowPrecision {
  int master;           // MasterKind
  bool stochastic;      // stochastic rounding of bf16 params without master and of bf16 moments
  uint32_t seed;        // the optimizer's seed
  const int64_t* pids;  // int64 [n]: each tensor's pid (read only when stochastic)
};

// ``hash32``: Wellons' lowbias32.
FUSEDLR_HD uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

// The (ka, kb) pair of each stream for one tensor's update (``tensor_keys`` then ``random_bits``'s keys).
struct RngKeys {
  uint32_t a[4];
  uint32_t b[4];
};

FUSEDLR_HD RngKeys rng_keys(uint32_t seed, int64_t pid, int64_t step) {
  const uint64_t t = static_cast<uint64_t>(step);
  uint32_t key = hash32(hash32(seed) ^ static_cast<uint32_t>(pid));
  key = hash32(hash32(key ^ static_cast<uint32_t>(t)) ^ static_cast<uint32_t>(t >> 32));
  RngKeys k;
  for (uint32_t s = 0; s < 4; ++s) {
    k.a[s] = hash32(key ^ s);
    k.b[s] = hash32(k.a[s] ^ 0x9E3779B9u);
  }
  return k;
}

// The 32 random bits of the element at offset ``i`` (from the tensor's first element) of ``stream``.
FUSEDLR_HD uint32_t random_bits(const RngKeys& k, int stream, int64_t i) {
  const uint64_t u = static_cast<uint64_t>(i);
  return hash32((hash32(static_cast<uint32_t>(u) ^ k.a[stream]) ^ k.b[stream]) + static_cast<uint32_t>(u >> 32));
}

FUSEDLR_HD uint32_t f32_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

FUSEDLR_HD float bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// The bf16 torch stores for a NaN float32 (c10::BFloat16 on the CPU, __float2bfloat16 on the GPU).
#ifdef __CUDA_ARCH__
constexpr uint16_t kBf16NaN = 0x7FFF;
#else
constexpr uint16_t kBf16NaN = 0x7FC0;
#endif

// float32 -> bfloat16 bits, rounded to nearest even (torch's ``x.to(torch.bfloat16)``).
FUSEDLR_HD uint16_t bf16_nearest(float x) {
  if (x != x) return kBf16NaN;
  const uint32_t u = f32_bits(x);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// ``stochastic_round_bf16``: float32 -> bfloat16 bits rounded up or down with the random bits ``r``.
FUSEDLR_HD uint16_t bf16_stochastic(float x, uint32_t r) {
  if (x != x) return bf16_nearest(x);
  return static_cast<uint16_t>((f32_bits(x) + (r >> 16)) >> 16);
}

FUSEDLR_HD float bf16_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }

// ``split_master``: the bf16 param (bits) and the int16 remainder (bits) storing ``master`` exactly.
FUSEDLR_HD void split_master(float master, uint16_t& param, uint16_t& remainder) {
  if (master != master) {
    param = bf16_nearest(master);
    remainder = 0;
    return;
  }
  const uint32_t u = f32_bits(master);
  const uint32_t lo = u & 0xFFFFu;
  param = static_cast<uint16_t>((u >> 16) + (lo >= 0x8000u ? 1u : 0u));
  remainder = static_cast<uint16_t>(lo);
}

// ``join_master``: the float32 master stored as the bf16 ``param`` and the int16 ``remainder`` (bits).
FUSEDLR_HD float join_master(uint16_t param, uint16_t remainder) {
  const uint32_t hi = (static_cast<uint32_t>(param) - (remainder >> 15)) & 0xFFFFu;
  return bits_f32((hi << 16) | remainder);
}

// A value of the math type stored into an element of type E::T (E: the backend's element traits,
// with ``load``/``store`` (nearest) and, for bfloat16, ``kBf16``, ``bits`` and ``from_bits``):
// stochastically rounded when ``sr`` and E is bfloat16, else to nearest (double through float, as torch).
template <typename E, typename S>
FUSEDLR_HD typename E::T store_rounded(S x, bool sr, const RngKeys& k, int stream, int64_t i) {
  if constexpr (E::kBf16) {
    const float f = static_cast<float>(x);
    return E::from_bits(sr ? bf16_stochastic(f, random_bits(k, stream, i)) : bf16_nearest(f));
  } else {
    return E::store(static_cast<typename E::S>(x));
  }
}

// One element of a low-precision update at offset ``i`` of its tensor: ``p``/``g`` of the param's type
// (traits P), the moments of the state type (traits M), the fp32 ``master`` (kFullMaster) or the
// ``remainder`` bits (kRemainderMaster, bf16 params), each read and written only in its mode.
// The math is ``adamw_element`` in the param's math type S; what is stored follows fusedlr.reference.
template <typename P, typename M, bool AMSGRAD>
FUSEDLR_HD void adamw_element_lp(typename P::T& p, typename P::T g, typename M::T& m, typename M::T& v,
                                 typename M::T& vmax, float& master, uint16_t& remainder,
                                 const AdamWCoeffs<typename P::S>& c, const LowPrecision& lp, const RngKeys& k,
                                 int64_t i) {
  using S = typename P::S;
  S ps = P::load(p);
  if (lp.master == kFullMaster) ps = static_cast<S>(master);
  if constexpr (P::kBf16) {
    if (lp.master == kRemainderMaster) ps = join_master(P::bits(p), remainder);
  }
  S ms = static_cast<S>(M::load(m)), vs = static_cast<S>(M::load(v));
  S ws = AMSGRAD ? static_cast<S>(M::load(vmax)) : S(0);
  adamw_element<AMSGRAD>(ps, P::load(g), ms, vs, ws, c);
  m = store_rounded<M>(ms, lp.stochastic, k, kStreamExpAvg, i);
  v = store_rounded<M>(vs, lp.stochastic, k, kStreamExpAvgSq, i);
  if (AMSGRAD) vmax = store_rounded<M>(ws, lp.stochastic, k, kStreamMaxExpAvgSq, i);
  if (lp.master == kFullMaster) {
    master = static_cast<float>(ps);
    p = P::store(static_cast<typename P::S>(ps));
  } else if (lp.master == kRemainderMaster) {
    if constexpr (P::kBf16) {
      uint16_t hi;
      split_master(static_cast<float>(ps), hi, remainder);
      p = P::from_bits(hi);
    }
  } else {
    p = store_rounded<P>(ps, lp.stochastic, k, kStreamParam, i);
  }
}

}  // namespace fusedlr
