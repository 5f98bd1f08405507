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
// Nothing is written when found_inf > 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>

#include "schedule.h"

namespace fusedlr {

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
};

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
  bool skip;     // found_inf > 0: write nothing
};

FUSEDLR_HD StepScalars step_scalars(const AdamWHyper& h, const StepInputs& in) {
  StepScalars s;
  s.skip = in.found_inf != nullptr && *in.found_inf > 0.0f;
  const double lr = base_lr(h, in);
  s.lr = in.schedule != nullptr ? lr * schedule_multiplier(in.schedule, *in.k) : lr;
  double scale = 1.0;
  if (h.has_max_norm) {
    const double x = h.max_norm / (::sqrt(static_cast<double>(in.stats[0])) + kClipEps);
    scale = x >= 1.0 ? 1.0 : x;  // NaN -> NaN
  }
  if (in.inv_scale != nullptr) scale *= static_cast<double>(*in.inv_scale);
  s.scale = h.maximize ? -scale : scale;
  return s;
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

}  // namespace fusedlr
