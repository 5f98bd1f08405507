// fusedlr._C.StepPlan: one optimizer step of every bucket of a launch plan in one call from Python
// (the eager fast path of fusedlr.AdamW.step with backend "cpu"; Python side: fusedlr/fast_step.py).
//
// Built once per plan (fusedlr.plan.Plan), it holds the params, states and step counters of every
// bucket. Each step it reads every parameter's ``.grad``, recomputes the plan signature
// (param_signature.h, what fusedlr._C.scan_grads computes) and compares it with the plan's. When
// anything differs, a gradient is one the kernels cannot read, or an input is not what the
// kernels take, it changes nothing and returns False: the general path then rebuilds the plan (or
// refuses the gradient with its message). Otherwise it runs what the ops would: pass 1 into
// ``stats`` (clipping, AMP), the step counters, pass 2 of each bucket, the norm and the schedule
// index, with the kernels of csrc/cpu/kernels.h called directly, and bumps the version counters of
// the tensors each op writes (as csrc/bindings.cpp's bump_written_versions does).
#include "step_plan.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "adamw_math.h"
#include "cpu/kernels.h"
#include "op_common.h"
#include "param_signature.h"

namespace fusedlr {
namespace {

struct PlanBucket {
  int64_t group = -1;
  int dtype = -1;
  bool amsgrad;
  std::vector<at::Tensor> params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs;
  at::Tensor steps;  // int64 [n]
  // The low-precision modes (fusedlr/precision.py), decided as check_adamw_update (csrc/op_common.h) does.
  std::vector<at::Tensor> masters, remainders;  // float32 / int16, one per param, or empty
  at::Tensor pids;                              // int64 [n] (stochastic rounding), or undefined
  LowPrecision lp{kNoMaster, false, 0u, nullptr};
  at::ScalarType state_type = at::kFloat;  // of the moments
  bool low_precision = false;
  // Per-step scratch, emptied before the call returns (gradients are not kept between steps).
  std::vector<at::Tensor> grads, update_grads, stats_grads;
};

struct StepPlan {
  std::vector<at::Tensor> params;  // every param of the plan (plan.flat)
  std::vector<int64_t> signature;  // kSigWords per param
  std::vector<int64_t> bucket_of;  // bucket of each param (-1: none)
  std::vector<PlanBucket> buckets;
  int64_t n_groups = 0;
};

// One group's hyperparameters for this step, and its tensor LR (may be undefined).
struct GroupInput {
  bool used = false;
  AdamWHyper hyper{};
  at::Tensor lr_tensor;
};

struct StepPlanObject {
  PyObject_HEAD
  StepPlan* plan;
};

void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
}

void bump_all(const std::vector<at::Tensor>& ts) {
  for (const at::Tensor& t : ts) bump(t);
}

// ``o`` as a tensor (None: undefined); false when it is neither.
bool tensor_or_none(PyObject* o, at::Tensor& out) {
  if (o == Py_None) {
    out = at::Tensor();
    return true;
  }
  if (!THPVariable_Check(o)) return false;
  out = THPVariable_Unpack(o);
  return true;
}

bool tensor_list(PyObject* o, std::vector<at::Tensor>& out) {
  PyObject* seq = PySequence_Fast(o, "fusedlr._C.StepPlan: expected a list of tensors");
  if (seq == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  out.clear();
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, i);
    if (!THPVariable_Check(item)) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_TypeError, "fusedlr._C.StepPlan: expected a list of tensors");
      return false;
    }
    out.push_back(THPVariable_Unpack(item));
  }
  Py_DECREF(seq);
  return true;
}

// A CPU tensor of ``dtype`` holding at least ``numel`` elements, contiguous (undefined passes when optional).
bool cpu_scalar_ok(const at::Tensor& t, at::ScalarType dtype, int64_t numel, bool exact) {
  if (!t.defined()) return true;
  return t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
         (exact ? t.numel() == numel : t.numel() >= numel);
}

// Why the plan's tensors cannot go to the CPU kernels without a check per step (nullptr: they can).
const char* bucket_reason(const PlanBucket& b) {
  if (!b.steps.device().is_cpu() || b.steps.scalar_type() != at::kLong || b.steps.dim() != 1 ||
      b.steps.numel() != static_cast<int64_t>(b.params.size()) || !b.steps.is_contiguous()) {
    return "steps is not a contiguous int64 CPU tensor [n]";
  }
  const size_t n = b.params.size();
  if ((!b.masters.empty() && (b.masters.size() != n || (b.dtype != kBF16 && b.dtype != kF16))) ||
      (!b.remainders.empty() && (b.remainders.size() != n || b.dtype != kBF16)) ||
      (!b.masters.empty() && !b.remainders.empty())) {
    return "the masters or remainders do not match the parameters";
  }
  if (b.lp.stochastic && !(b.pids.defined() && b.pids.device().is_cpu() && b.pids.scalar_type() == at::kLong &&
                           b.pids.dim() == 1 && b.pids.numel() == static_cast<int64_t>(n) && b.pids.is_contiguous())) {
    return "stochastic rounding needs pids, a contiguous int64 CPU tensor [n]";
  }
  for (size_t j = 0; j < n; ++j) {
    const at::Tensor& p = b.params[j];
    if (!p.device().is_cpu()) return "a parameter is not on the CPU";
    if (dtype_code(p.scalar_type()) != b.dtype) return "the parameters of a bucket differ in dtype";
    std::vector<std::pair<const at::Tensor*, at::ScalarType>> states = {{&b.exp_avgs[j], b.state_type},
                                                                        {&b.exp_avg_sqs[j], b.state_type}};
    if (b.amsgrad) states.emplace_back(&b.max_exp_avg_sqs[j], b.state_type);
    if (!b.masters.empty()) states.emplace_back(&b.masters[j], at::kFloat);
    if (!b.remainders.empty()) states.emplace_back(&b.remainders[j], at::kShort);
    for (const auto& [s, type] : states) {
      if (s->scalar_type() != type || !s->device().is_cpu() || !linear(*s) || !same_layout(*s, p)) {
        return "a state is not laid out like its parameter";
      }
    }
  }
  return nullptr;
}

// The kernel a bucket takes (csrc/op_common.h's kernel_mode, as the op decides it); bucket_reason then
// checks every tensor against it, and the caller sets ``lp.pids`` once pids is checked.
void decide_precision(PlanBucket& b) {
  const KernelMode mode =
      kernel_mode(b.dtype, b.exp_avgs[0].scalar_type(), !b.masters.empty(), !b.remainders.empty(), b.lp.stochastic);
  b.state_type = mode.state_type;
  b.lp.master = mode.master;
  b.low_precision = mode.low_precision;
}

// ---------------------------------------------------------------- construction
// StepPlan(params, signature, buckets, n_groups): ``params`` and ``signature`` of the plan (fusedlr.plan.Plan.flat,
// .signature from scan_grads); ``buckets``: (group, indices into params, exp_avgs, exp_avg_sqs,
// max_exp_avg_sqs or None, steps, precision) each, ``precision`` None or (masters or None, remainders or None,
// pids, seed, stochastic) (fusedlr.precision.BucketPrecision). Raises ValueError when the fast path cannot run
// this plan.
int step_plan_init(PyObject* self_obj, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"params", "signature", "buckets", "n_groups", nullptr};
  PyObject *params_obj, *sig_obj, *buckets_obj;
  Py_ssize_t n_groups;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OSOn", const_cast<char**>(kwlist), &params_obj, &sig_obj,
                                   &buckets_obj, &n_groups)) {
    return -1;
  }
  auto* self = reinterpret_cast<StepPlanObject*>(self_obj);
  try {
    auto plan = std::make_unique<StepPlan>();
    if (!tensor_list(params_obj, plan->params)) return -1;
    const size_t n = plan->params.size();
    if (static_cast<size_t>(PyBytes_GET_SIZE(sig_obj)) != n * kSigWords * sizeof(int64_t)) {
      PyErr_SetString(PyExc_ValueError, "fusedlr._C.StepPlan: the signature does not describe these parameters");
      return -1;
    }
    plan->signature.resize(n * kSigWords);
    std::memcpy(plan->signature.data(), PyBytes_AS_STRING(sig_obj), n * kSigWords * sizeof(int64_t));
    plan->bucket_of.assign(n, -1);
    plan->n_groups = n_groups;
    PyObject* seq = PySequence_Fast(buckets_obj, "fusedlr._C.StepPlan: buckets must be a list");
    if (seq == nullptr) return -1;
    const Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t bi = 0; bi < nb; ++bi) {
      PyObject *idx_obj, *m_obj, *v_obj, *vmax_obj, *steps_obj, *prec_obj;
      Py_ssize_t group;
      if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, bi), "nOOOOOO", &group, &idx_obj, &m_obj, &v_obj, &vmax_obj,
                            &steps_obj, &prec_obj)) {
        Py_DECREF(seq);
        return -1;
      }
      PlanBucket b;
      b.group = group;
      b.amsgrad = vmax_obj != Py_None;
      bool ok = tensor_list(m_obj, b.exp_avgs) && tensor_list(v_obj, b.exp_avg_sqs) &&
                (!b.amsgrad || tensor_list(vmax_obj, b.max_exp_avg_sqs)) && THPVariable_Check(steps_obj);
      if (ok && prec_obj != Py_None) {
        PyObject *masters_obj, *remainders_obj, *pids_obj;
        unsigned long long seed;
        int stochastic;
        ok = PyArg_ParseTuple(prec_obj, "OOOKp", &masters_obj, &remainders_obj, &pids_obj, &seed, &stochastic) &&
             (masters_obj == Py_None || tensor_list(masters_obj, b.masters)) &&
             (remainders_obj == Py_None || tensor_list(remainders_obj, b.remainders)) &&
             tensor_or_none(pids_obj, b.pids);
        b.lp.seed = static_cast<uint32_t>(seed);
        b.lp.stochastic = stochastic != 0;
      }
      PyObject* idx = ok ? PySequence_Fast(idx_obj, "fusedlr._C.StepPlan: indices must be a list") : nullptr;
      if (idx == nullptr) {
        if (ok) PyErr_SetString(PyExc_TypeError, "fusedlr._C.StepPlan: a bucket is (group, indices, exp_avgs, "
                                                 "exp_avg_sqs, max_exp_avg_sqs, steps)");
        Py_DECREF(seq);
        return -1;
      }
      b.steps = THPVariable_Unpack(steps_obj);
      const Py_ssize_t m = PySequence_Fast_GET_SIZE(idx);
      const char* reason = nullptr;
      if (group < 0 || group >= n_groups) reason = "a bucket's group index is out of range";
      if (static_cast<size_t>(m) != b.exp_avgs.size() || static_cast<size_t>(m) != b.exp_avg_sqs.size() ||
          (b.amsgrad && static_cast<size_t>(m) != b.max_exp_avg_sqs.size())) {
        reason = "a bucket's lists differ in length";
      }
      Py_ssize_t last = -1;
      for (Py_ssize_t j = 0; j < m && reason == nullptr; ++j) {
        const Py_ssize_t i = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(idx, j));
        if (i < 0 || static_cast<size_t>(i) >= n || plan->bucket_of[i] >= 0 || (j > 0 && i <= last)) {
          reason = "a bucket's indices are not increasing indices of params";
          break;
        }
        const int64_t word = plan->signature[i * kSigWords + 2];
        if (!signature_has_grad(word) || signature_grad_code(word) != signature_param_code(word) ||
            signature_param_code(word) < 0) {
          reason = "a bucket's gradients have another dtype than its parameters";  // the reference runs it
        }
        last = i;
        plan->bucket_of[i] = static_cast<int64_t>(plan->buckets.size());
        b.params.push_back(plan->params[i]);
        b.dtype = signature_param_code(word);
      }
      Py_DECREF(idx);
      if (PyErr_Occurred()) {
        Py_DECREF(seq);
        return -1;
      }
      if (reason == nullptr && m == 0) reason = "a bucket is empty";
      if (reason == nullptr) {
        decide_precision(b);
        reason = bucket_reason(b);
      }
      if (reason != nullptr) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "fusedlr._C.StepPlan: %s", reason);
        return -1;
      }
      b.lp.pids = b.lp.stochastic ? b.pids.data_ptr<int64_t>() : nullptr;  // checked by bucket_reason
      b.grads.reserve(m);
      plan->buckets.push_back(std::move(b));
    }
    Py_DECREF(seq);
    for (size_t i = 0; i < n; ++i) {
      if (plan->bucket_of[i] < 0 && signature_has_grad(plan->signature[i * kSigWords + 2])) {
        PyErr_SetString(PyExc_ValueError, "fusedlr._C.StepPlan: a parameter with a gradient is in no bucket");
        return -1;
      }
    }
    delete self->plan;
    self->plan = plan.release();
    return 0;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return -1;
  }
}

// ---------------------------------------------------------------- one step
// Per-step inputs as the ops take them (see fusedlr.optimizer.AdamW.step).
struct StepArgs {
  std::vector<GroupInput> groups;
  at::Tensor k, schedule, inv_scale, found_inf, stats, found_inf_out, applied_lr, norm;
  std::optional<double> max_norm;
  bool advance_k = false;
};

// Parses the hyperparameter tuple of each group: (lr, lr_tensor or None, beta1, beta2, eps, weight_decay,
// maximize), or None for a group without bucket. Returns false with a Python error set, or sets ``stale``.
bool parse_groups(const StepPlan& plan, PyObject* hypers, StepArgs& a, bool& stale) {
  PyObject* seq = PySequence_Fast(hypers, "fusedlr._C.StepPlan.step: hypers must be a tuple");
  if (seq == nullptr) return false;
  if (PySequence_Fast_GET_SIZE(seq) != plan.n_groups) {
    Py_DECREF(seq);
    stale = true;
    return true;
  }
  a.groups.assign(plan.n_groups, GroupInput{});
  for (Py_ssize_t gi = 0; gi < plan.n_groups; ++gi) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, gi);
    if (item == Py_None) continue;
    double lr, beta1, beta2, eps, wd;
    PyObject* lr_obj;
    int maximize;
    if (!PyArg_ParseTuple(item, "dOddddp", &lr, &lr_obj, &beta1, &beta2, &eps, &wd, &maximize)) {
      Py_DECREF(seq);
      return false;
    }
    GroupInput& g = a.groups[gi];
    g.used = true;
    g.hyper = make_hyper(lr, beta1, beta2, eps, wd, a.max_norm, maximize != 0);
    if (!tensor_or_none(lr_obj, g.lr_tensor)) {
      Py_DECREF(seq);
      PyErr_SetString(PyExc_TypeError, "fusedlr._C.StepPlan.step: a tensor LR must be a tensor or None");
      return false;
    }
    if (g.lr_tensor.defined() && !(g.lr_tensor.device().is_cpu() && g.lr_tensor.numel() == 1 &&
                                   (g.lr_tensor.scalar_type() == at::kFloat || g.lr_tensor.scalar_type() == at::kDouble))) {
      stale = true;  // the op refuses it: the general path raises its message
    }
  }
  Py_DECREF(seq);
  for (const PlanBucket& b : plan.buckets) {
    if (!a.groups[b.group].used) stale = true;
  }
  return true;
}

// Reads every gradient and checks it against the plan (nothing is written). False: stale.
bool collect_grads(StepPlan& plan, bool with_stats) {
  const size_t n = plan.params.size();
  int64_t words[kSigWords];
  std::vector<char> copy_update(plan.buckets.size(), 0), copy_stats(plan.buckets.size(), 0);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = plan.params[i];
    const at::Tensor& g = p.grad();
    const int64_t* expected = &plan.signature[i * kSigWords];
    if (!param_signature(p, g, words) || words[0] != expected[0] || words[1] != expected[1] ||
        words[2] != expected[2]) {
      return false;
    }
    if (!g.defined()) continue;
    const int64_t bi = plan.bucket_of[i];
    PlanBucket& b = plan.buckets[bi];
    const size_t j = b.grads.size();
    if (!linear(p) || !same_layout(b.exp_avgs[j], p)) return false;  // p.data = a tensor of another layout
    const bool lin = linear(g);
    copy_update[bi] |= !lin || !same_layout(g, p);
    copy_stats[bi] |= !lin;
    b.grads.push_back(g);
  }
  for (size_t bi = 0; bi < plan.buckets.size(); ++bi) {
    PlanBucket& b = plan.buckets[bi];
    if (copy_update[bi]) {
      for (size_t j = 0; j < b.grads.size(); ++j) b.update_grads.push_back(kernel_grad(b.grads[j], &b.params[j]));
    }
    if (copy_stats[bi] && with_stats) {
      for (const at::Tensor& g : b.grads) b.stats_grads.push_back(kernel_grad(g, nullptr));
    }
  }
  return true;
}

void clear_scratch(StepPlan& plan) {
  for (PlanBucket& b : plan.buckets) {
    b.grads.clear();
    b.update_grads.clear();
    b.stats_grads.clear();
  }
}

// Everything the step writes, in the order of the general path.
void run_step(StepPlan& plan, const StepArgs& a) {
  float* stats = a.stats.defined() ? a.stats.data_ptr<float>() : nullptr;
  if (stats != nullptr) {
    stats[0] = 0.0f;
    stats[1] = 0.0f;
    const float inv = a.inv_scale.defined() ? *a.inv_scale.data_ptr<float>() : 1.0f;
    for (PlanBucket& b : plan.buckets) {
      cpu::grad_stats_kernel(b.dtype, b.stats_grads.empty() ? b.grads : b.stats_grads, inv, stats);
      bump(a.stats);
    }
  }
  const float* found_inf = a.found_inf.defined() ? a.found_inf.data_ptr<float>() : nullptr;
  if (a.found_inf_out.defined()) {  // GradScaler's found_inf, from pass 1
    float* out = a.found_inf_out.data_ptr<float>();
    *out = stats[1] > 0.0f ? 1.0f : 0.0f;
    found_inf = out;
  }
  const int64_t applied = found_inf == nullptr ? 1 : (*found_inf <= 0.0f ? 1 : 0);
  double* applied_lr = a.applied_lr.data_ptr<double>();
  for (PlanBucket& b : plan.buckets) {
    int64_t* steps = b.steps.data_ptr<int64_t>();
    for (size_t j = 0; j < b.params.size(); ++j) steps[j] += applied;
    bump(b.steps);
    const GroupInput& g = a.groups[b.group];
    StepInputs in{};
    in.k = a.k.data_ptr<int64_t>();
    in.schedule = a.schedule.defined() ? a.schedule.data_ptr<double>() : nullptr;
    in.stats = stats;
    in.inv_scale = a.inv_scale.defined() ? a.inv_scale.data_ptr<float>() : nullptr;
    in.found_inf = found_inf;
    in.steps = steps;
    if (g.lr_tensor.defined()) {
      if (g.lr_tensor.scalar_type() == at::kDouble) {
        in.lr_f64 = g.lr_tensor.data_ptr<double>();
      } else {
        in.lr_f32 = g.lr_tensor.data_ptr<float>();
      }
    }
    const StepScalars s = step_scalars(g.hyper, in);
    if (!s.skip) {
      applied_lr[b.group] = s.lr;
      const std::vector<at::Tensor>& grads = b.update_grads.empty() ? b.grads : b.update_grads;
      if (b.low_precision) {
        cpu::adamw_update_lp_kernel(b.dtype, dtype_code(b.state_type), b.amsgrad, b.params, grads, b.exp_avgs,
                                    b.exp_avg_sqs, b.max_exp_avg_sqs, b.masters, b.remainders, steps, g.hyper, s,
                                    b.lp);
      } else {
        cpu::adamw_update_kernel(b.dtype, b.amsgrad, b.params, grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs,
                                 steps, g.hyper, s);
      }
    }
    bump_all(b.params);
    bump_all(b.exp_avgs);
    bump_all(b.exp_avg_sqs);
    bump_all(b.max_exp_avg_sqs);
    bump_all(b.masters);
    bump_all(b.remainders);
    bump(a.applied_lr);
  }
  if (a.advance_k) {
    *a.k.data_ptr<int64_t>() += applied;
    bump(a.k);
  }
}

// step(hypers, k, schedule, max_norm, inv_scale, found_inf, stats, found_inf_out, applied_lr, norm, advance_k)
// -> bool. ``stats`` (float32 [2], zeroed here): run pass 1 into it. ``found_inf_out`` (float32 0-d):
// receive GradScaler's found_inf from pass 1 and skip on it. ``norm`` (float32 0-d): receives
// sqrt(stats[0]) from torch's sqrt, as the general path computes it (std::sqrt rounds differently from
// torch's float32 sqrt on the CPU). ``advance_k``: add the number of applied updates to ``k``. False:
// stale, nothing was written.
PyObject* step_plan_step(PyObject* self_obj, PyObject* args) {
  auto* self = reinterpret_cast<StepPlanObject*>(self_obj);
  if (self->plan == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "fusedlr._C.StepPlan was not initialised");
    return nullptr;
  }
  StepPlan& plan = *self->plan;
  PyObject *hypers, *k, *schedule, *max_norm, *inv_scale, *found_inf, *stats, *found_inf_out, *applied_lr, *norm;
  int advance_k;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOp", &hypers, &k, &schedule, &max_norm, &inv_scale, &found_inf, &stats,
                        &found_inf_out, &applied_lr, &norm, &advance_k)) {
    return nullptr;
  }
  try {
    StepArgs a;
    a.advance_k = advance_k != 0;
    if (max_norm != Py_None) {
      a.max_norm = PyFloat_AsDouble(max_norm);
      if (PyErr_Occurred()) return nullptr;
    }
    if (!tensor_or_none(k, a.k) || !tensor_or_none(schedule, a.schedule) || !tensor_or_none(inv_scale, a.inv_scale) ||
        !tensor_or_none(found_inf, a.found_inf) || !tensor_or_none(stats, a.stats) ||
        !tensor_or_none(found_inf_out, a.found_inf_out) || !tensor_or_none(applied_lr, a.applied_lr) ||
        !tensor_or_none(norm, a.norm)) {
      PyErr_SetString(PyExc_TypeError, "fusedlr._C.StepPlan.step: expected tensors or None");
      return nullptr;
    }
    bool stale = !a.k.defined() || !a.applied_lr.defined() || !cpu_scalar_ok(a.k, at::kLong, 1, true) ||
                 !cpu_scalar_ok(a.schedule, at::kDouble, 1, false) || (a.schedule.defined() && a.schedule.dim() != 1) ||
                 !cpu_scalar_ok(a.inv_scale, at::kFloat, 1, true) || !cpu_scalar_ok(a.found_inf, at::kFloat, 1, true) ||
                 !cpu_scalar_ok(a.stats, at::kFloat, 2, false) || !cpu_scalar_ok(a.found_inf_out, at::kFloat, 1, true) ||
                 !cpu_scalar_ok(a.applied_lr, at::kDouble, plan.n_groups, false) ||
                 !cpu_scalar_ok(a.norm, at::kFloat, 1, true) ||
                 ((a.max_norm.has_value() || a.found_inf_out.defined() || a.norm.defined()) && !a.stats.defined()) ||
                 (a.found_inf_out.defined() && a.found_inf.defined());
    if (!stale && !parse_groups(plan, hypers, a, stale)) return nullptr;
    stale = stale || !collect_grads(plan, a.stats.defined());
    std::string error;
    if (!stale) {
      Py_BEGIN_ALLOW_THREADS
      try {
        run_step(plan, a);
      } catch (const std::exception& e) {
        error = e.what();
      }
      Py_END_ALLOW_THREADS
    }
    clear_scratch(plan);
    if (error.empty() && !stale && a.norm.defined()) at::sqrt_out(a.norm, a.stats.select(0, 0));
    if (!error.empty()) {
      PyErr_SetString(PyExc_RuntimeError, error.c_str());
      return nullptr;
    }
    return PyBool_FromLong(!stale);
  } catch (const std::exception& e) {
    clear_scratch(plan);
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

void step_plan_dealloc(PyObject* self_obj) {
  auto* self = reinterpret_cast<StepPlanObject*>(self_obj);
  delete self->plan;
  self->plan = nullptr;
  Py_TYPE(self_obj)->tp_free(self_obj);
}

PyObject* step_plan_new(PyTypeObject* type, PyObject* /*args*/, PyObject* /*kwargs*/) {
  PyObject* self = type->tp_alloc(type, 0);
  if (self != nullptr) reinterpret_cast<StepPlanObject*>(self)->plan = nullptr;
  return self;
}

PyObject* step_plan_reduce(PyObject* /*self*/, PyObject* /*args*/) {
  PyErr_SetString(PyExc_TypeError, "fusedlr._C.StepPlan cannot be pickled or copied (it is a cache)");
  return nullptr;
}

PyMethodDef step_plan_methods[] = {
    {"step", step_plan_step, METH_VARARGS,
     "step(hypers, k, schedule, max_norm, inv_scale, found_inf, stats, found_inf_out, applied_lr, norm, advance_k) "
     "-> bool: one step of every bucket; False (nothing written) when the plan is stale."},
    {"__reduce__", step_plan_reduce, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject step_plan_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

}  // namespace

int add_step_plan_type(PyObject* module) {
  step_plan_type.tp_name = "fusedlr._C.StepPlan";
  step_plan_type.tp_basicsize = sizeof(StepPlanObject);
  step_plan_type.tp_flags = Py_TPFLAGS_DEFAULT;
  step_plan_type.tp_doc =
      "StepPlan(params, signature, buckets, n_groups): the eager fast path of fusedlr.AdamW.step on the CPU "
      "for one launch plan (see fusedlr/fast_step.py).";
  step_plan_type.tp_new = step_plan_new;
  step_plan_type.tp_init = step_plan_init;
  step_plan_type.tp_dealloc = step_plan_dealloc;
  step_plan_type.tp_methods = step_plan_methods;
  if (PyType_Ready(&step_plan_type) < 0) return -1;
  Py_INCREF(&step_plan_type);
  if (PyModule_AddObject(module, "StepPlan", reinterpret_cast<PyObject*>(&step_plan_type)) < 0) {
    Py_DECREF(&step_plan_type);
    return -1;
  }
  return 0;
}

}  // namespace fusedlr
