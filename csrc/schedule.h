// The LR schedule multiplier sched(k), written once for the C++ and CUDA kernels.
//
// Evaluates the encoding ``[kind, *params]`` of ``fusedlr/schedules.py`` (``Schedule.as_tensor()``;
// see ``Kind`` there for the parameter layouts and ``evaluate()`` for the formulas, which are the
// specification) for the update index ``k`` (updates applied before this one; the first is k=0).
// Everything is computed in double; only the branch selected for ``k`` is evaluated.
// Plain C++ / CUDA: no torch headers, so it compiles with g++ and with nvcc.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDLR_HD __host__ __device__ __forceinline__
#else
#define FUSEDLR_HD inline
#endif

namespace fusedlr {

// Mirrors ``fusedlr.schedules.Kind``.
enum ScheduleKind : int {
  kConstant = 0,
  kConstantWithWarmup = 1,
  kLinear = 2,
  kCosine = 3,
  kCosineWithRestarts = 4,
  kPolynomial = 5,
  kInverseSqrt = 6,
  kCosineWarmupWithMinLr = 7,
  kWarmupStableDecay = 8,
  kStep = 9,
  kMultistep = 10,
  kExponential = 11,
  kOnecycle = 12,
  kCosineAnnealing = 13,
  kCosineWarmRestarts = 14,
  kLinearFactor = 15,
  kConstantFactor = 16,
  kPolynomialDecay = 17,
  kCyclic = 18,
  kFactor = 19,
  kSequential = 20,
  kProduct = 21,
};

// ``fusedlr.schedules.CHILD_STRIDE``: table entries of each child of a composite schedule.
constexpr int kChildStride = 20;

constexpr double kPi = 3.141592653589793;  // math.pi

namespace sched_detail {

// Python's ``max(1.0, x)``.
FUSEDLR_HD double max1(double x) { return x > 1.0 ? x : 1.0; }

// ``torch.clamp(x, min=0.0)``: NaN stays NaN.
FUSEDLR_HD double clamp0(double x) { return x < 0.0 ? 0.0 : x; }

// ``_warmup``.
FUSEDLR_HD double warmup(double k, double w) { return k / max1(w); }

// ``_ramp``: the warmup-stable-decay ramp shapes (0 linear, 1 cosine, 2 1-sqrt).
FUSEDLR_HD double ramp(double progress, int shape, double num_cycles, bool rising) {
  if (shape == 0) return rising ? progress : 1.0 - progress;
  if (shape == 1) {
    if (rising) return 0.5 * (1.0 - ::cos(kPi * progress));
    return 0.5 * (1.0 + ::cos(kPi * num_cycles * 2.0 * progress));
  }
  return 1.0 - ::sqrt(rising ? (1.0 - progress) : progress);
}

// ``_anneal`` (OneCycleLR).
FUSEDLR_HD double anneal(double start, double end, double pct, bool linear) {
  if (linear) return (end - start) * pct + start;
  return end + (start - end) / 2.0 * (::cos(kPi * pct) + 1.0);
}

// ``torch.remainder(x, 1.0)``: Python-style modulo, result in [0, 1).
FUSEDLR_HD double remainder1(double x) { return x - ::floor(x); }

// The first update of warm-restart cycle n (an integer; rounded where pow is inexact).
FUSEDLR_HD double cycle_start(double t0, double t_mult, double n) {
  return ::round(t0 * (::pow(t_mult, n) - 1.0) / (t_mult - 1.0));
}

// ``_restarts``: the cosine value of CosineAnnealingWarmRestarts (T_0, T_mult, eta_min_ratio) at k.
FUSEDLR_HD double warm_restarts(const double* p, double k) {
  const double t0 = p[0], t_mult = p[1], eta = p[2];
  double t_cur, t_i;
  if (t_mult == 1.0) {
    t_cur = k - t0 * ::floor(k / t0);
    t_i = t0;
  } else {
    double n = ::floor(::log(k / t0 * (t_mult - 1.0) + 1.0) / ::log(t_mult));
    if (cycle_start(t0, t_mult, n) > k) n -= 1.0;
    if (cycle_start(t0, t_mult, n + 1.0) <= k) n += 1.0;
    t_cur = k - cycle_start(t0, t_mult, n);
    t_i = cycle_start(t0, t_mult, n + 1.0) - cycle_start(t0, t_mult, n);
  }
  return eta + (1.0 - eta) * (1.0 + ::cos(kPi * t_cur / t_i)) / 2.0;
}

// ``_cyclic``: torch CyclicLR relative to base_lr.
FUSEDLR_HD double cyclic(const double* p, double k) {
  const double base = p[0], peak = p[1], up = p[2], total = p[3], mode = p[4], gamma = p[5];
  const double ratio = up / total;
  const double cycle = ::floor(1.0 + k / total);
  const double x = 1.0 + k / total - cycle;
  const double factor = x <= ratio ? x / ratio : (x - 1.0) / (ratio - 1.0);
  const double scale = mode == 0.0 ? 1.0 : (mode == 1.0 ? ::pow(0.5, cycle - 1.0) : ::pow(gamma, k));
  return base + (peak - base) * factor * scale;
}

// One leaf (non-composite) schedule of ``table = [kind, *params]`` at update index k.
// An unknown kind gives NaN (the Python side only ever encodes valid kinds).
FUSEDLR_HD double leaf_multiplier(const double* table, double k) {
  const int kind = static_cast<int>(table[0]);
  const double* p = table + 1;
  switch (kind) {
    case kConstant:
      return 1.0;
    case kFactor:
      return p[0];
    case kCosineAnnealing:
      return p[1] + (1.0 - p[1]) * (1.0 + ::cos(kPi * k / p[0])) / 2.0;
    case kCosineWarmRestarts:
      return warm_restarts(p, k);
    case kLinearFactor:
      return p[0] + (p[1] - p[0]) * (k < p[2] ? k : p[2]) / p[2];
    case kConstantFactor:
      return p[0] + (k >= p[1] ? 1.0 : 0.0) * (1.0 - p[0]);
    case kPolynomialDecay:
      return ::pow(1.0 - (k < p[0] ? k : p[0]) / p[0], p[1]);
    case kCyclic:
      return cyclic(p, k);
    case kConstantWithWarmup:
      return k < p[0] ? warmup(k, p[0]) : 1.0;
    case kExponential:
      return ::pow(p[0], k);
    case kStep:
      return ::pow(p[1], ::floor(k / p[0]));
    case kMultistep: {
      const int n = static_cast<int>(p[1]);
      double passed = 0.0;
      for (int i = 0; i < n; ++i) passed += (k >= p[2 + i]) ? 1.0 : 0.0;
      return ::pow(p[0], passed);
    }
    case kOnecycle: {
      const bool linear = p[0] != 0.0;
      const int n = static_cast<int>(p[1]);
      if (n <= 0) return 0.0;
      const double last_end = p[2 + 3 * (n - 1)];
      const double kc = k > last_end ? last_end : k;  // past the last phase: hold the final value
      double start_step = 0.0;
      for (int i = 0; i < n; ++i) {
        const double end_step = p[2 + 3 * i], lo = p[3 + 3 * i], hi = p[4 + 3 * i];
        if (i == n - 1 || kc <= end_step) return anneal(lo, hi, (kc - start_step) / (end_step - start_step), linear);
        start_step = end_step;
      }
      return 0.0;
    }
    case kInverseSqrt: {
      const double w = p[0], timescale = p[1];
      return k < w ? warmup(k, w) : 1.0 / ::sqrt((k + (timescale - w)) / timescale);
    }
    case kWarmupStableDecay: {
      const double w = p[0], stable = p[1], decay = p[2], floor_ = p[5], cycles = p[6];
      if (k < w) {
        const double warm = ramp(k / max1(w), static_cast<int>(p[3]), cycles, true);
        return clamp0(warm * (1.0 - floor_) + floor_);
      }
      if (k < w + stable) return 1.0;
      if (k < w + stable + decay) {
        const double dec = ramp((k - w - stable) / max1(decay), static_cast<int>(p[4]), cycles, false);
        return clamp0(dec * (1.0 - floor_) + floor_);
      }
      return floor_;
    }
    case kLinear:
    case kCosine:
    case kCosineWithRestarts:
    case kPolynomial:
    case kCosineWarmupWithMinLr:
      break;
    default:
      return NAN;
  }
  // Warmup then decay: (warmup, total, ...).
  const double w = p[0], total = p[1];
  if (k < w) {
    if (kind == kCosineWarmupWithMinLr) {
      const double warmup_rate = p[4];
      if (warmup_rate < 0.0) return (k + 1.0) / max1(w);
      return warmup_rate + (1.0 - warmup_rate) * k / max1(w - 1.0);
    }
    return warmup(k, w);
  }
  switch (kind) {
    case kLinear:
      return clamp0((total - k) / max1(total - w));
    case kCosine: {
      const double progress = (k - w) / max1(total - w);
      const double factor = 0.5 * (1.0 + ::cos(kPi * p[2] * 2.0 * progress));
      return clamp0(factor * (1.0 - p[3]) + p[3]);
    }
    case kCosineWithRestarts: {
      const double progress = (k - w) / max1(total - w);
      if (progress >= 1.0) return 0.0;
      const double factor = 0.5 * (1.0 + ::cos(kPi * remainder1(p[2] * progress)));
      return clamp0(factor);
    }
    case kPolynomial: {
      const double end_ratio = p[2], power = p[3];
      const double remaining = clamp0(1.0 - (k - w) / max1(total - w));
      return (1.0 - end_ratio) * ::pow(remaining, power) + end_ratio;
    }
    default: {  // kCosineWarmupWithMinLr
      const double cycles = p[2], floor_ = p[3];
      const double progress = (k - w + 1.0) / max1(total - w);
      const double factor = 0.5 * (1.0 + ::cos(kPi * cycles * 2.0 * progress));
      return clamp0(factor * (1.0 - floor_) + floor_);
    }
  }
}

}  // namespace sched_detail

// The multiplier ``sched(k)`` of the schedule encoded in ``table = [kind, *params]``.
// Composites (``[kind, n, start_0 .. start_{n-1}, n children of kChildStride entries]``) evaluate
// their children: SEQUENTIAL the last child whose start is <= k, at k - start; PRODUCT all of them.
FUSEDLR_HD double schedule_multiplier(const double* table, int64_t step) {
  using sched_detail::leaf_multiplier;
  const double k = static_cast<double>(step);
  const int kind = static_cast<int>(table[0]);
  if (kind != kSequential && kind != kProduct) return leaf_multiplier(table, k);
  const int n = static_cast<int>(table[1]);
  const double* starts = table + 2;
  const double* children = table + 2 + n;
  if (kind == kProduct) {
    double out = 1.0;
    for (int i = 0; i < n; ++i) out *= leaf_multiplier(children + i * kChildStride, k);
    return out;
  }
  int i = 0;
  while (i + 1 < n && k >= starts[i + 1]) ++i;
  return leaf_multiplier(children + i * kChildStride, k - starts[i]);
}

}  // namespace fusedlr
