// Argument checking shared by the CPU and CUDA implementations of the fusedlr ops (torch side).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "adamw_math.h"

namespace fusedlr {

inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default: return -1;
  }
}

// Same shape, and the same strides on every dimension of size > 1.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// A tensor the kernels may walk linearly from data_ptr() over numel() elements.
inline bool linear(const at::Tensor& t) { return t.is_contiguous() || t.is_non_overlapping_and_dense(); }

inline void check_scalar(const std::optional<at::Tensor>& t, const char* name, at::ScalarType dtype,
                         const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == dtype, "fusedlr: ", name, " must be ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->numel() == 1, "fusedlr: ", name, " must hold one element, got ", t->numel());
  TORCH_CHECK(t->device() == device, "fusedlr: ", name, " is on ", t->device(), ", expected ", device);
}

// Gradients as the kernels read them: linear, and laid out like ``like`` when given (a copy
// otherwise; gradients are only read, so copying them is harmless).
inline at::Tensor kernel_grad(const at::Tensor& g, const at::Tensor* like) {
  if (like != nullptr) {
    if (linear(g) && same_layout(g, *like)) return g;
    at::Tensor out = at::empty_like(*like, g.options());
    out.copy_(g);
    return out;
  }
  return linear(g) ? g : g.contiguous();
}

// Checks every argument of ``grad_stats``; returns the dtype code of the gradients.
inline void check_schedule_eval(const at::Tensor& table, const at::Tensor& ks) {
  TORCH_CHECK(table.scalar_type() == at::kDouble && table.dim() == 1 && table.numel() >= 1,
              "fusedlr.schedule_eval: table must be a float64 [kind, *params] tensor");
  TORCH_CHECK(ks.scalar_type() == at::kLong, "fusedlr.schedule_eval: ks must be int64");
}

inline int check_grad_stats(at::TensorList grads, const std::optional<at::Tensor>& inv_scale, const at::Tensor& out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() >= 2 && out.is_contiguous(),
              "fusedlr.grad_stats: out must be a contiguous float32 tensor of 2 elements");
  check_scalar(inv_scale, "inv_scale", at::kFloat, out.device());
  int code = grads.empty() ? kF32 : dtype_code(grads[0].scalar_type());
  for (const auto& g : grads) {
    TORCH_CHECK(g.device() == out.device(), "fusedlr.grad_stats: gradient on ", g.device(), ", out on ", out.device());
    TORCH_CHECK(dtype_code(g.scalar_type()) == code && code >= 0,
                "fusedlr.grad_stats: gradients must share one dtype among float32/float16/bfloat16/float64, got ",
                g.scalar_type(), " and ", grads[0].scalar_type());
  }
  return code;
}

struct CheckedUpdate {
  int dtype;                     // of params and grads
  int state_dtype;               // of the moments: float32 (float64 for float64 params), or bfloat16 / float32
  bool amsgrad;
  int master;                    // MasterKind
  bool low_precision;            // a master, moments in another dtype than the math's, or bf16 params rounded stochastically
  std::vector<at::Tensor> grads;  // as the kernel reads them (laid out like the params)
};

// The tensors of the low-precision modes (fusedlr/precision.py), as the op receives them.
struct PrecisionArgs {
  at::TensorList masters;             // float32, one per param (master_weights=True), or empty
  at::TensorList remainders;          // int16, one per bf16 param (master_weights="remainder"), or empty
  const std::optional<at::Tensor>& pids;  // int64 [n]: each param's pid (needed when stochastic)
  bool stochastic;
};

// Which update the kernels run for a bucket of dtype code ``dtype`` whose first moment has dtype
// ``first_state`` (the one decision of check_adamw_update and of the CPU fast path, csrc/step_plan.cpp):
// the moments' dtype (``first_state`` when bfloat16 or float32, else the math type), the master kind, and
// whether the low-precision kernel runs (a master, moments in another dtype than the math's, or bf16
// params rounded stochastically; stochastic rounding alone, of nothing bf16, is the default update).
struct KernelMode {
  at::ScalarType state_type;
  int master;  // MasterKind
  bool low_precision;
};

inline KernelMode kernel_mode(int dtype, at::ScalarType first_state, bool has_masters, bool has_remainders,
                              bool stochastic) {
  const at::ScalarType math_type = dtype == kF64 ? at::kDouble : at::kFloat;
  KernelMode mode;
  mode.state_type = first_state == at::kBFloat16 || first_state == at::kFloat ? first_state : math_type;
  mode.master = has_masters ? kFullMaster : (has_remainders ? kRemainderMaster : kNoMaster);
  mode.low_precision =
      mode.master != kNoMaster || mode.state_type != math_type || (stochastic && dtype == kBF16);
  return mode;
}

// Checks every argument of ``adamw_update``: one device, one param dtype (grads the same), states
// of one dtype (float32, float64 for float64 params; or bfloat16, or float32 for float64 params)
// and masters/remainders laid out like their parameter, which must be linear (contiguous or
// non-overlapping and dense): the kernels update in place, nothing is copied.
inline CheckedUpdate check_adamw_update(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                        const at::Tensor& steps, const at::Tensor& k,
                                        const std::optional<at::Tensor>& schedule,
                                        const std::optional<at::Tensor>& stats, std::optional<double> max_norm,
                                        const std::optional<at::Tensor>& inv_scale,
                                        const std::optional<at::Tensor>& found_inf, const PrecisionArgs& prec) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "fusedlr.adamw_update: params, grads, exp_avgs and exp_avg_sqs must have the same length");
  TORCH_CHECK(max_exp_avg_sqs.empty() || max_exp_avg_sqs.size() == n,
              "fusedlr.adamw_update: max_exp_avg_sqs must be empty (no amsgrad) or as long as params");
  const at::Device device = steps.device();
  TORCH_CHECK(steps.scalar_type() == at::kLong && steps.dim() == 1 && steps.numel() == static_cast<int64_t>(n) &&
                  steps.is_contiguous(),
              "fusedlr.adamw_update: steps must be a contiguous int64 tensor [n]");
  TORCH_CHECK(k.scalar_type() == at::kLong && k.numel() == 1 && k.device() == device,
              "fusedlr.adamw_update: k must be a one-element int64 tensor on ", device);
  if (schedule.has_value()) {
    TORCH_CHECK(schedule->scalar_type() == at::kDouble && schedule->dim() == 1 && schedule->numel() >= 1 &&
                    schedule->is_contiguous() && schedule->device() == device,
                "fusedlr.adamw_update: schedule must be a contiguous float64 [kind, *params] tensor on ", device);
  }
  if (stats.has_value()) {
    TORCH_CHECK(stats->scalar_type() == at::kFloat && stats->numel() >= 2 && stats->is_contiguous() &&
                    stats->device() == device,
                "fusedlr.adamw_update: stats must be a contiguous float32 tensor [2] on ", device);
  }
  TORCH_CHECK(!max_norm.has_value() || stats.has_value(), "fusedlr.adamw_update: max_norm needs stats");
  check_scalar(inv_scale, "inv_scale", at::kFloat, device);
  check_scalar(found_inf, "found_inf", at::kFloat, device);

  CheckedUpdate out;
  out.amsgrad = !max_exp_avg_sqs.empty();
  out.dtype = n == 0 ? kF32 : dtype_code(params[0].scalar_type());
  TORCH_CHECK(out.dtype >= 0, "fusedlr.adamw_update: params must be float32/float16/bfloat16/float64, got ",
              params[0].scalar_type());
  const at::ScalarType first = n == 0 ? (out.dtype == kF64 ? at::kDouble : at::kFloat) : exp_avgs[0].scalar_type();
  const KernelMode mode =
      kernel_mode(out.dtype, first, !prec.masters.empty(), !prec.remainders.empty(), prec.stochastic);
  const at::ScalarType state_type = mode.state_type;
  out.state_dtype = dtype_code(state_type);
  out.master = mode.master;
  out.low_precision = mode.low_precision;
  TORCH_CHECK(prec.masters.empty() || prec.remainders.empty(),
              "fusedlr.adamw_update: pass masters or remainders, not both");
  TORCH_CHECK(prec.masters.empty() || prec.masters.size() == n,
              "fusedlr.adamw_update: masters must be empty or as long as params");
  TORCH_CHECK(prec.remainders.empty() || prec.remainders.size() == n,
              "fusedlr.adamw_update: remainders must be empty or as long as params");
  TORCH_CHECK(out.master == kNoMaster || n == 0 || out.dtype == kBF16 ||
                  (out.master == kFullMaster && out.dtype == kF16),
              "fusedlr.adamw_update: masters need bfloat16/float16 params, remainders bfloat16 params, got ",
              params[0].scalar_type());
  if (prec.stochastic) {
    TORCH_CHECK(prec.pids.has_value() && prec.pids->scalar_type() == at::kLong && prec.pids->dim() == 1 &&
                    prec.pids->numel() == static_cast<int64_t>(n) && prec.pids->is_contiguous() &&
                    prec.pids->device() == device,
                "fusedlr.adamw_update: stochastic rounding needs pids, a contiguous int64 tensor [n] on ", device);
  }
  out.grads.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "fusedlr.adamw_update: params must share one dtype, got ",
                p.scalar_type(), " and ", params[0].scalar_type());
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "fusedlr.adamw_update: grad dtype ",
                grads[i].scalar_type(), " differs from its param's ", p.scalar_type());
    TORCH_CHECK(linear(p), "fusedlr.adamw_update: param ", i,
                " is not contiguous (nor non-overlapping and dense); the compiled kernels update in place "
                "and cannot handle it: use backend='torch'");
    std::vector<const at::Tensor*> states = {&exp_avgs[i], &exp_avg_sqs[i]};
    if (out.amsgrad) states.push_back(&max_exp_avg_sqs[i]);
    for (const at::Tensor* s : states) {
      TORCH_CHECK(s->scalar_type() == state_type, "fusedlr.adamw_update: state of param ", i, " must be ",
                  state_type, ", got ", s->scalar_type());
      TORCH_CHECK(linear(*s) && same_layout(*s, p), "fusedlr.adamw_update: state of param ", i,
                  " must have the shape and strides of its parameter (and be dense); use backend='torch'");
    }
    for (const at::Tensor* t : {&p, &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->device() == device, "fusedlr.adamw_update: tensor on ", t->device(), ", expected ", device);
    }
    if (out.amsgrad) TORCH_CHECK(max_exp_avg_sqs[i].device() == device, "fusedlr.adamw_update: wrong device");
    if (out.master != kNoMaster) {
      const bool full = out.master == kFullMaster;
      const at::Tensor& mt = full ? prec.masters[i] : prec.remainders[i];
      TORCH_CHECK(mt.scalar_type() == (full ? at::kFloat : at::kShort) && mt.device() == device && linear(mt) &&
                      same_layout(mt, p),
                  "fusedlr.adamw_update: the ", full ? "float32 master" : "int16 remainder", " of param ", i,
                  " must have its shape and strides (and be dense) on ", device);
    }
    TORCH_CHECK(grads[i].sizes() == p.sizes(), "fusedlr.adamw_update: grad shape ", grads[i].sizes(),
                " differs from param ", p.sizes());
    out.grads.push_back(kernel_grad(grads[i], &p));
  }
  return out;
}

// The tensor LR and the applied-LR output of ``adamw_update`` (entry ``lr_index`` of the float64 tensor
// ``applied_lr``), checked and stored into ``in``.
inline void set_lr_inputs(const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& applied_lr,
                          int64_t lr_index, const at::Device& device, StepInputs& in) {
  if (lr_tensor.has_value()) {
    TORCH_CHECK(lr_tensor->numel() == 1 && lr_tensor->device() == device &&
                    (lr_tensor->scalar_type() == at::kFloat || lr_tensor->scalar_type() == at::kDouble),
                "fusedlr.adamw_update: lr_tensor must be a one-element float32/float64 tensor on ", device);
    if (lr_tensor->scalar_type() == at::kDouble) {
      in.lr_f64 = lr_tensor->data_ptr<double>();
    } else {
      in.lr_f32 = lr_tensor->data_ptr<float>();
    }
  }
  if (applied_lr.has_value()) {
    TORCH_CHECK(applied_lr->scalar_type() == at::kDouble && applied_lr->is_contiguous() &&
                    applied_lr->device() == device && lr_index >= 0 && lr_index < applied_lr->numel(),
                "fusedlr.adamw_update: applied_lr must be a contiguous float64 tensor on ", device,
                " with an entry lr_index=", lr_index);
    in.applied_lr = applied_lr->data_ptr<double>() + lr_index;
  } else {
    in.applied_lr = nullptr;
  }
}

// GradScaler's ``scale`` (the kernels compute its inverse, see unscale_factor) and the inf check from
// pass 1 (``skip_nonfinite``) of ``grad_stats``/``adamw_update``, checked.
inline void check_scale(const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& inv_scale,
                        const at::Device& device) {
  check_scalar(scale, "scale", at::kFloat, device);
  TORCH_CHECK(!(scale.has_value() && inv_scale.has_value()), "fusedlr: pass inv_scale or scale, not both");
}

// The step-level outputs of a folded ``adamw_update`` (see its schema in csrc/bindings.cpp), checked; the
// arrival counter is left null (the CUDA binding sets it).
inline StepOutputs step_outputs(bool advance, bool advance_k, const at::Tensor& steps, const at::Tensor& k,
                                const std::optional<at::Tensor>& stats, const std::optional<at::Tensor>& norm_out,
                                const std::optional<at::Tensor>& found_inf_out, bool skip_nonfinite) {
  const at::Device device = steps.device();
  TORCH_CHECK(!skip_nonfinite || stats.has_value(), "fusedlr.adamw_update: skip_nonfinite needs stats");
  TORCH_CHECK(!norm_out.has_value() || stats.has_value(), "fusedlr.adamw_update: norm_out needs stats");
  check_scalar(norm_out, "norm_out", at::kFloat, device);
  check_scalar(found_inf_out, "found_inf_out", at::kFloat, device);
  StepOutputs out{};
  out.steps = advance ? steps.data_ptr<int64_t>() : nullptr;
  out.k = advance_k ? k.data_ptr<int64_t>() : nullptr;
  out.norm = norm_out.has_value() ? norm_out->data_ptr<float>() : nullptr;
  out.found_inf = found_inf_out.has_value() ? found_inf_out->data_ptr<float>() : nullptr;
  return out;
}

// Segment s of a launch set's list (``adamw_update_set``/``grad_stats_set``): its tensors [start, start + len), or
// the empty list when ``list`` is (an unused per-param list).
inline at::TensorList segment(at::TensorList list, int64_t start, int64_t len) {
  return list.empty() ? list : list.slice(static_cast<size_t>(start), static_cast<size_t>(len));
}

// The segment sizes of a launch set over ``n`` tensors, checked (each a bucket: at least one tensor).
inline void check_sizes(at::IntArrayRef sizes, size_t n, const char* op) {
  TORCH_CHECK(!sizes.empty(), "fusedlr.", op, ": a launch set needs at least one segment");
  int64_t total = 0;
  for (const int64_t len : sizes) {
    TORCH_CHECK(len > 0, "fusedlr.", op, ": every segment size must be positive, got ", sizes);
    total += len;
  }
  TORCH_CHECK(static_cast<size_t>(total) == n, "fusedlr.", op, ": the segment sizes ", sizes, " sum to ", total,
              ", not to the ", n, " tensors");
}

// ``adamw_update_set``'s segments over ``n`` params (check_sizes) and its per-segment arguments: one entry each.
inline void check_update_set(at::IntArrayRef sizes, size_t n, at::IntArrayRef groups, at::ArrayRef<double> lr,
                             at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps,
                             at::ArrayRef<double> weight_decay, at::IntArrayRef maximize, size_t n_lr_tensors,
                             at::TensorList steps, at::TensorList pids) {
  check_sizes(sizes, n, "adamw_update_set");
  const size_t m = sizes.size();
  TORCH_CHECK(groups.size() == m && lr.size() == m && beta1.size() == m && beta2.size() == m && eps.size() == m &&
                  weight_decay.size() == m && maximize.size() == m && n_lr_tensors == m && steps.size() == m &&
                  (pids.empty() || pids.size() == m),
              "fusedlr.adamw_update_set: groups, the hyperparameters, lr_tensors, steps (and pids when given) "
              "must hold one entry per segment (", m, ")");
}

template <typename T>
inline const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace fusedlr
