// CPU kernels of fusedlr (backend="cpu") and their op registrations.
//
// Work is split into (tensor, chunk) items run by OpenMP; the inner loops are plain loops over
// contiguous memory that the compiler vectorises. Pass 1 (grad_stats) accumulates per item in
// double and sums the items in a fixed order, so its result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../adamw_math.h"
#include "../op_common.h"
#include "kernels.h"

namespace fusedlr {
namespace cpu {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item

template <typename T>
struct Math {
  using type = float;
};
template <>
struct Math<double> {
  using type = double;
};

template <typename T>
inline typename Math<T>::type to_math(T x) {
  return static_cast<typename Math<T>::type>(x);
}

// Element traits of the low-precision update (adamw_element_lp): T in memory <-> its math type.
template <typename X>
struct Elem {
  using T = X;
  using S = typename Math<X>::type;
  static constexpr bool kBf16 = std::is_same_v<X, c10::BFloat16>;
  static S load(T x) { return static_cast<S>(x); }
  static T store(S x) { return static_cast<T>(x); }
  static uint16_t bits(T x) { return x.x; }
  static T from_bits(uint16_t b) { return T(b, T::from_bits()); }
};

template <typename T>
inline bool nonfinite(T x) {
  return !std::isfinite(static_cast<typename Math<T>::type>(x));  // exact for half/bfloat16
}

struct Item {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

// Calls ``body(item)`` for every (tensor, chunk) item of ``n`` tensors of ``numel(i)`` elements, in order.
template <typename N, typename F>
void items_in_order(size_t n, const N& numel, const F& body) {
  for (size_t i = 0; i < n; ++i) {
    const int64_t len = numel(i);
    for (int64_t s = 0; s < len; s += kChunk) body(Item{static_cast<int64_t>(i), s, std::min(kChunk, len - s)});
  }
}

template <typename N>
std::vector<Item> make_items(size_t n, const N& numel) {
  std::vector<Item> items;
  items.reserve(n);
  items_in_order(n, numel, [&](const Item& w) { items.push_back(w); });
  return items;
}

// Threads for a launch of ``n`` tensors of ``numel(i)`` elements: 1 below kParallelMin elements.
template <typename N>
int num_threads(size_t n, const N& numel) {
  int64_t total = 0;
  for (size_t i = 0; i < n; ++i) total += numel(i);
#ifdef _OPENMP
  if (total < kParallelMin || omp_in_parallel()) return 1;
  return std::max(1, at::get_num_threads());
#else
  (void)total;
  return 1;
#endif
}

// Runs ``body(item, prep)`` for every item of ``n`` tensors of ``numel(i)`` elements, ``prep`` being
// ``prepare(i)`` of the item's tensor (a ``P``), called in tensor order: on the calling thread item by item,
// or, when the launch is large enough, for every tensor first and then the items in parallel.
template <typename P, typename N, typename Prep, typename F>
void for_each_item(size_t n, const N& numel, Prep&& prepare, const F& body) {
  const int nt = num_threads(n, numel);
  if (nt <= 1) {
    P prep{};
    int64_t prepared = -1;
    items_in_order(n, numel, [&](const Item& w) {
      if (w.tensor != prepared) {
        prep = prepare(w.tensor);
        prepared = w.tensor;
      }
      body(w, prep);
    });
    return;
  }
  std::vector<P> preps;
  preps.reserve(n);
  for (size_t i = 0; i < n; ++i) preps.push_back(prepare(static_cast<int64_t>(i)));
  const std::vector<Item> items = make_items(n, numel);
  const int64_t m = static_cast<int64_t>(items.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t it = 0; it < m; ++it) body(items[it], preps[items[it].tensor]);
}

// ---------------------------------------------------------------- pass 1
// Sums in a fixed order: the tail from 0.0, then each of the 16 lanes added to it. A gradient shorter than the
// lanes skips them (adding their zeros would not change the bits): the steps of many tiny tensors.
template <typename T>
void stats_item(const T* __restrict__ g, int64_t len, float inv, double* sum_out, int64_t* count_out) {
  constexpr int kLanes = 16;
  const int64_t body = len - len % kLanes;
  double s = 0.0;
  int64_t c = 0;
  for (int64_t j = body; j < len; ++j) {
    const float x = static_cast<float>(g[j]) * inv;
    s += static_cast<double>(x * x);
    c += nonfinite(g[j]) ? 1 : 0;
  }
  if (body > 0) {
    double acc[kLanes] = {};
    int64_t cnt[kLanes] = {};
    for (int64_t j = 0; j < body; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float x = static_cast<float>(g[j + l]) * inv;
        acc[l] += static_cast<double>(x * x);
        cnt[l] += nonfinite(g[j + l]) ? 1 : 0;
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      s += acc[l];
      c += cnt[l];
    }
  }
  *sum_out = s;
  *count_out = c;
}

// The items' sums are added in item order, on one thread as on many: the result does not depend on the
// thread count.
template <typename T>
void grad_stats_impl(const GradRef* grads, size_t n, float inv, float* out) {
  const auto numel = [grads](size_t i) { return grads[i].numel; };
  const auto item_stats = [&](const Item& w, double* sum, int64_t* count) {
    stats_item<T>(static_cast<const T*>(grads[w.tensor].data) + w.start, w.len, inv, sum, count);
  };
  double s = 0.0;
  int64_t c = 0;
  const int nt = num_threads(n, numel);
  if (nt <= 1) {
    items_in_order(n, numel, [&](const Item& w) {
      double si;
      int64_t ci;
      item_stats(w, &si, &ci);
      s += si;
      c += ci;
    });
  } else {
    const std::vector<Item> items = make_items(n, numel);
    const int64_t m = static_cast<int64_t>(items.size());
    std::vector<double> sums(m);
    std::vector<int64_t> counts(m);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t it = 0; it < m; ++it) item_stats(items[it], &sums[it], &counts[it]);
    for (int64_t it = 0; it < m; ++it) {
      s += sums[it];
      c += counts[it];
    }
  }
  out[0] += static_cast<float>(s);
  out[1] += static_cast<float>(c);
}

// ---------------------------------------------------------------- pass 2
// tensor_coeffs of tensor after tensor, recomputed only when the step number changes (the tensors of a
// bucket mostly share theirs).
template <typename S>
class CoeffCache {
 public:
  CoeffCache(const AdamWHyper& h, const StepScalars& s, const int64_t* steps) : h_(h), s_(s), steps_(steps) {}

  const AdamWCoeffs<S>& operator()(int64_t i) {
    if (!valid_ || steps_[i] != step_) {
      coeffs_ = tensor_coeffs<S>(h_, s_, steps_[i]);
      step_ = steps_[i];
      valid_ = true;
    }
    return coeffs_;
  }

 private:
  const AdamWHyper& h_;
  const StepScalars& s_;
  const int64_t* steps_;
  AdamWCoeffs<S> coeffs_{};
  int64_t step_ = 0;
  bool valid_ = false;
};

template <typename T, bool AMSGRAD>
void update_item(T* __restrict__ p, const T* __restrict__ g, typename Math<T>::type* __restrict__ m,
                 typename Math<T>::type* __restrict__ v, typename Math<T>::type* __restrict__ vmax, int64_t len,
                 const AdamWCoeffs<typename Math<T>::type>& c) {
  using S = typename Math<T>::type;
  const AdamWCoeffs<S> cc = c;  // local copy: no aliasing with the arrays
  for (int64_t j = 0; j < len; ++j) {
    S pj = to_math(p[j]);
    S mj = m[j];
    S vj = v[j];
    S vmj = AMSGRAD ? vmax[j] : S(0);
    adamw_element<AMSGRAD>(pj, to_math(g[j]), mj, vj, vmj, cc);
    p[j] = static_cast<T>(pj);
    m[j] = mj;
    v[j] = vj;
    if (AMSGRAD) vmax[j] = vmj;
  }
}

template <typename T, bool AMSGRAD>
void adamw_impl(const UpdateSlot* slots, size_t n, const int64_t* steps, const AdamWHyper& h, const StepScalars& s) {
  using S = typename Math<T>::type;
  CoeffCache<S> coeffs(h, s, steps);
  for_each_item<AdamWCoeffs<S>>(
      n, [slots](size_t i) { return slots[i].numel; }, coeffs,
      [slots](const Item& w, const AdamWCoeffs<S>& c) {
        const UpdateSlot& t = slots[w.tensor];
        const int64_t o = w.start;
        S* vmax = AMSGRAD ? static_cast<S*>(t.vmax) + o : nullptr;
        update_item<T, AMSGRAD>(static_cast<T*>(t.p) + o, static_cast<const T*>(t.g) + o, static_cast<S*>(t.m) + o,
                                static_cast<S*>(t.v) + o, vmax, w.len, c);
      });
}

// What a low-precision update needs per tensor besides its slot.
template <typename S>
struct LpPrep {
  AdamWCoeffs<S> coeffs;
  RngKeys keys;
};

// Elements [start, start + len) of one tensor: param/grad T, moments M (see adamw_element_lp).
template <typename T, typename M, bool AMSGRAD>
void update_item_lp(const UpdateSlot& t, int64_t start, int64_t len, const LpPrep<typename Math<T>::type>& prep,
                    const LowPrecision& lp) {
  T* p = static_cast<T*>(t.p) + start;
  const T* g = static_cast<const T*>(t.g) + start;
  M* m = static_cast<M*>(t.m) + start;
  M* v = static_cast<M*>(t.v) + start;
  M* vmax = AMSGRAD ? static_cast<M*>(t.vmax) + start : nullptr;
  float* master = lp.master == kFullMaster ? t.master + start : nullptr;
  uint16_t* remainder = lp.master == kRemainderMaster ? t.remainder + start : nullptr;
  for (int64_t j = 0; j < len; ++j) {
    M w = AMSGRAD ? vmax[j] : M(0);
    float mj = master != nullptr ? master[j] : 0.0f;
    uint16_t rj = remainder != nullptr ? remainder[j] : 0;
    adamw_element_lp<Elem<T>, Elem<M>, AMSGRAD>(p[j], g[j], m[j], v[j], w, mj, rj, prep.coeffs, lp, prep.keys,
                                                start + j);
    if (AMSGRAD) vmax[j] = w;
    if (master != nullptr) master[j] = mj;
    if (remainder != nullptr) remainder[j] = rj;
  }
}

template <typename T, typename M, bool AMSGRAD>
void adamw_impl_lp(const UpdateSlot* slots, size_t n, const int64_t* steps, const AdamWHyper& h, const StepScalars& s,
                   const LowPrecision& lp) {
  using S = typename Math<T>::type;
  CoeffCache<S> coeffs(h, s, steps);
  for_each_item<LpPrep<S>>(
      n, [slots](size_t i) { return slots[i].numel; },
      [&](int64_t i) {
        return LpPrep<S>{coeffs(i), lp.stochastic ? rng_keys(lp.seed, lp.pids[i], steps[i]) : RngKeys{}};
      },
      [slots, &lp](const Item& w, const LpPrep<S>& prep) {
        update_item_lp<T, M, AMSGRAD>(slots[w.tensor], w.start, w.len, prep, lp);
      });
}

template <typename T, typename M>
void adamw_dispatch_lp(bool amsgrad, const UpdateSlot* slots, size_t n, const int64_t* steps, const AdamWHyper& h,
                       const StepScalars& s, const LowPrecision& lp) {
  if (amsgrad) {
    adamw_impl_lp<T, M, true>(slots, n, steps, h, s, lp);
  } else {
    adamw_impl_lp<T, M, false>(slots, n, steps, h, s, lp);
  }
}

// The low-precision update, on the param dtype and the moments': bfloat16, or float32 for 16-bit and
// float64 params (float32 params are low-precision only with bfloat16 moments, see check_adamw_update).
template <typename T>
void adamw_dispatch_states(int state_dtype, bool amsgrad, const UpdateSlot* slots, size_t n, const int64_t* steps,
                           const AdamWHyper& h, const StepScalars& s, const LowPrecision& lp) {
  if (state_dtype == kBF16) {
    adamw_dispatch_lp<T, c10::BFloat16>(amsgrad, slots, n, steps, h, s, lp);
    return;
  }
  if constexpr (!std::is_same_v<T, float>) {
    adamw_dispatch_lp<T, float>(amsgrad, slots, n, steps, h, s, lp);
  }
}

}  // namespace

void grad_stats_kernel(int dtype, const GradRef* grads, size_t n, float inv, float* out) {
  dispatch_dtype(dtype, [&](auto tag) { grad_stats_impl<typename decltype(tag)::type>(grads, n, inv, out); });
}

void adamw_update_kernel(int dtype, bool amsgrad, const UpdateSlot* slots, size_t n, const int64_t* steps,
                         const AdamWHyper& h, const StepScalars& s) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (amsgrad) {
      adamw_impl<T, true>(slots, n, steps, h, s);
    } else {
      adamw_impl<T, false>(slots, n, steps, h, s);
    }
  });
}

void adamw_update_lp_kernel(int dtype, int state_dtype, bool amsgrad, const UpdateSlot* slots, size_t n,
                            const int64_t* steps, const AdamWHyper& h, const StepScalars& s, const LowPrecision& lp) {
  dispatch_dtype(dtype, [&](auto tag) {
    adamw_dispatch_states<typename decltype(tag)::type>(state_dtype, amsgrad, slots, n, steps, h, s, lp);
  });
}

namespace {

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "fusedlr (CPU kernel): ", what, " must be on the CPU, got ", t.device());
}

// The slots of a checked launch (``vmaxs``, ``masters``, ``remainders``: empty when it has none).
std::vector<UpdateSlot> update_slots(at::TensorList params, const std::vector<at::Tensor>& grads, at::TensorList exp_avgs,
                                     at::TensorList exp_avg_sqs, at::TensorList vmaxs, at::TensorList masters,
                                     at::TensorList remainders) {
  std::vector<UpdateSlot> slots(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    UpdateSlot& t = slots[i];
    t.p = params[i].data_ptr();
    t.g = grads[i].const_data_ptr();
    t.m = exp_avgs[i].data_ptr();
    t.v = exp_avg_sqs[i].data_ptr();
    t.vmax = vmaxs.empty() ? nullptr : vmaxs[i].data_ptr();
    t.master = masters.empty() ? nullptr : masters[i].data_ptr<float>();
    t.remainder = remainders.empty() ? nullptr : static_cast<uint16_t*>(remainders[i].data_ptr());
    t.numel = params[i].numel();
  }
  return slots;
}

// ---------------------------------------------------------------- ops
void grad_stats_cpu(at::TensorList grads, const std::optional<at::Tensor>& inv_scale, const at::Tensor& out,
                    const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& table_host,
                    const std::optional<at::Tensor>& workspace, const std::optional<at::Tensor>& scale,
                    bool reset) {
  (void)table;
  (void)table_host;
  (void)workspace;
  check_cpu(out, "out");
  const int code = check_grad_stats(grads, inv_scale, out);
  check_scale(scale, inv_scale, out.device());
  std::vector<at::Tensor> gs;
  std::vector<GradRef> refs;
  gs.reserve(grads.size());
  refs.reserve(grads.size());
  for (const auto& g : grads) {
    gs.push_back(kernel_grad(g, nullptr));
    refs.push_back({gs.back().const_data_ptr(), gs.back().numel()});
  }
  const float inv = unscale_factor(opt_ptr<float>(inv_scale), opt_ptr<float>(scale));
  float* o = out.data_ptr<float>();
  if (reset) {
    o[0] = 0.0f;
    o[1] = 0.0f;
  }
  grad_stats_kernel(code, refs.data(), refs.size(), inv, o);
}

void adamw_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                      at::TensorList max_exp_avg_sqs, const at::Tensor& steps, const at::Tensor& k,
                      const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& stats,
                      std::optional<double> max_norm, const std::optional<at::Tensor>& inv_scale,
                      const std::optional<at::Tensor>& found_inf, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bool maximize, at::TensorList masters, at::TensorList remainders,
                      const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& table_host,
                      const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& applied_lr,
                      const std::optional<at::Tensor>& pids, int64_t seed, bool stochastic, int64_t lr_index,
                      const std::optional<at::Tensor>& scale, bool skip_nonfinite, bool advance, bool advance_k,
                      const std::optional<at::Tensor>& norm_out, const std::optional<at::Tensor>& found_inf_out,
                      const std::optional<at::Tensor>& workspace) {
  (void)table;
  (void)table_host;
  (void)workspace;
  check_cpu(steps, "steps");
  CheckedUpdate chk = check_adamw_update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, k, schedule,
                                         stats, max_norm, inv_scale, found_inf,
                                         PrecisionArgs{masters, remainders, pids, stochastic});
  const AdamWHyper h = make_hyper(lr, beta1, beta2, eps, weight_decay, max_norm, maximize);
  StepInputs in{};
  in.k = k.data_ptr<int64_t>();
  in.schedule = opt_ptr<double>(schedule);
  in.stats = opt_ptr<float>(stats);
  in.inv_scale = opt_ptr<float>(inv_scale);
  in.found_inf = opt_ptr<float>(found_inf);
  in.steps = steps.data_ptr<int64_t>();
  set_lr_inputs(lr_tensor, applied_lr, lr_index, steps.device(), in);
  check_scale(scale, inv_scale, steps.device());
  in.grad_scale = opt_ptr<float>(scale);
  in.skip_nonfinite = skip_nonfinite;
  const StepOutputs out = step_outputs(advance, advance_k, steps, k, stats, norm_out, found_inf_out, skip_nonfinite);
  const StepScalars s = step_scalars(h, in);
  write_step_flags(in, s, out);
  if (s.skip) return;
  if (in.applied_lr != nullptr) *in.applied_lr = s.lr;
  if (out.steps != nullptr) {  // from here on, steps hold this update's step numbers (the kernels read them)
    for (size_t i = 0; i < params.size(); ++i) out.steps[i] += 1;
  }
  if (out.k != nullptr) *out.k += 1;  // read only by step_scalars
  if (params.empty()) return;
  const std::vector<UpdateSlot> slots =
      update_slots(params, chk.grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, remainders);
  if (chk.low_precision) {
    const LowPrecision lp{chk.master, stochastic, static_cast<uint32_t>(seed), opt_ptr<int64_t>(pids)};
    adamw_update_lp_kernel(chk.dtype, chk.state_dtype, chk.amsgrad, slots.data(), slots.size(), in.steps, h, s, lp);
    return;
  }
  adamw_update_kernel(chk.dtype, chk.amsgrad, slots.data(), slots.size(), in.steps, h, s);
}

void check_per_param(at::TensorList list, size_t n, const char* what) {
  TORCH_CHECK(list.empty() || list.size() == n, "fusedlr.adamw_update_set: ", what, " must be empty or hold ", n,
              " tensors, got ", list.size());
}

// One op, the buckets of a launch set in turn, each as grad_stats would reduce it (the float32 sums in the
// order of one grad_stats call per bucket, as the eager fast path adds them).
void grad_stats_set_cpu(at::TensorList grads, at::IntArrayRef sizes, const at::Tensor& out,
                        const std::optional<at::Tensor>& scale, bool reset) {
  check_sizes(sizes, grads.size(), "grad_stats_set");
  int64_t start = 0;
  for (size_t s = 0; s < sizes.size(); ++s) {
    grad_stats_cpu(grads.slice(start, sizes[s]), std::nullopt, out, std::nullopt, std::nullopt, std::nullopt, scale,
                   reset && s == 0);
    start += sizes[s];
  }
}

// One op, the folded update of each bucket of a launch set in turn (the kernels of adamw_update_cpu with the
// segment's hyperparameters); the step-level outputs come from the last segment, as from the last of the
// per-bucket calls it replaces.
void adamw_update_set_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                          at::TensorList remainders, at::TensorList steps, const at::Tensor& k,
                          const at::Tensor& applied_lr, at::IntArrayRef sizes, at::IntArrayRef groups,
                          at::ArrayRef<double> lr, at::ArrayRef<double> beta1, at::ArrayRef<double> beta2,
                          at::ArrayRef<double> eps, at::ArrayRef<double> weight_decay, at::IntArrayRef maximize,
                          const c10::List<std::optional<at::Tensor>>& lr_tensors, at::TensorList pids,
                          const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& stats,
                          std::optional<double> max_norm, const std::optional<at::Tensor>& found_inf,
                          const std::optional<at::Tensor>& scale, bool skip_nonfinite, bool advance_k,
                          const std::optional<at::Tensor>& norm_out, const std::optional<at::Tensor>& found_inf_out,
                          int64_t seed, bool stochastic) {
  const size_t n = params.size(), m = sizes.size();
  check_update_set(sizes, n, groups, lr, beta1, beta2, eps, weight_decay, maximize, lr_tensors.size(), steps, pids);
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "fusedlr.adamw_update_set: grads and moments must hold one tensor per param");
  check_per_param(max_exp_avg_sqs, n, "max_exp_avg_sqs");
  check_per_param(masters, n, "masters");
  check_per_param(remainders, n, "remainders");
  int64_t start = 0;
  for (size_t s = 0; s < m; ++s) {
    const bool last = s + 1 == m;
    const int64_t len = sizes[s];
    adamw_update_cpu(segment(params, start, len), segment(grads, start, len), segment(exp_avgs, start, len),
                     segment(exp_avg_sqs, start, len), segment(max_exp_avg_sqs, start, len), steps[s], k, schedule,
                     stats, max_norm, std::nullopt, found_inf, lr[s], beta1[s], beta2[s], eps[s], weight_decay[s],
                     maximize[s] != 0, segment(masters, start, len), segment(remainders, start, len), std::nullopt,
                     std::nullopt, lr_tensors.get(s), applied_lr,
                     pids.empty() ? std::nullopt : std::optional<at::Tensor>(pids[s]), seed, stochastic, groups[s],
                     scale, skip_nonfinite, true, last && advance_k, last ? norm_out : std::nullopt,
                     last ? found_inf_out : std::nullopt, std::nullopt);
    start += len;
  }
}

at::Tensor schedule_eval_cpu(const at::Tensor& table, const at::Tensor& ks) {
  check_schedule_eval(table, ks);
  check_cpu(table, "table");
  check_cpu(ks, "ks");
  const at::Tensor t = table.contiguous();
  const at::Tensor kc = ks.contiguous();
  at::Tensor out = at::empty(ks.sizes(), ks.options().dtype(at::kDouble));
  const double* tp = t.data_ptr<double>();
  const int64_t* kp = kc.data_ptr<int64_t>();
  double* op = out.data_ptr<double>();
  for (int64_t i = 0; i < kc.numel(); ++i) op[i] = schedule_multiplier(tp, kp[i]);
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace fusedlr

TORCH_LIBRARY_IMPL(fusedlr, CPU, m) {
  m.impl("grad_stats", &fusedlr::cpu::grad_stats_cpu);
  m.impl("adamw_update", &fusedlr::cpu::adamw_update_cpu);
  m.impl("schedule_eval", &fusedlr::cpu::schedule_eval_cpu);
  m.impl("grad_stats_set", &fusedlr::cpu::grad_stats_set_cpu);
  m.impl("adamw_update_set", &fusedlr::cpu::adamw_update_set_cpu);
}
