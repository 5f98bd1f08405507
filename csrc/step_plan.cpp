// fusedlr._C.StepPlan: one optimizer step of every bucket of a launch plan in one call from Python
// (the eager fast path of fusedlr.AdamW.step with backend "cpu" or "cuda"; Python side: fusedlr/fast_step.py).
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
//
// On CUDA (a plan built with the address of a csrc/cuda/launchers.h table; method ``launch``) the same walk
// writes the gradients' pointers into the host mirrors of the op path's cached device tables, uploads a table
// only when it changed (async, ordered on the current stream), and launches what the op path's folded step
// launches (AdamW._prepare_folded): pass 1 per gradient dtype, then one update per launch set (a set of several
// buckets through adamw_update_set, on the op path's set table), the last one writing the step's outputs. The
// launchers may be the host emulation of the kernels (tests/cuda_on_host.py), on CPU tensors.
//
// Host cost (the step of many tiny tensors): one walk over the parameters reads each gradient and
// checks it, mostly by comparing it with what the plan recorded of its parameter (unchanged), keeping
// raw pointers for the kernels in scratch vectors that keep their capacity (no handle copies, no
// allocation per step); the GIL is held throughout for launches below cpu::kParallelMin elements.
#include "step_plan.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
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
#include "cuda/launchers.h"
#include "cuda/table.h"
#include "op_common.h"
#include "param_signature.h"

namespace fusedlr {
#ifdef FUSEDLR_WITH_CUDA
namespace cuda {
const Launchers* device_launchers();  // csrc/cuda/launchers.cpp
}  // namespace cuda
#endif

namespace {

// A device pointer table of the CUDA fast path: the table the kernels read (on the plan's device), its host mirror
// (int64 CPU) holding what was last uploaded, both shared with the op path (fusedlr/extension/cuda.py caches them),
// and the launch's chunks and grid (fixed by the numels).
struct DeviceTable {
  at::Tensor table, host;
  int64_t total_chunks = 0;
  int grid = 0;
};

struct PlanBucket {
  int64_t group = -1;
  at::Device device{at::kCPU};  // of every tensor of the bucket
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
  caffe2::TypeMeta param_type;  // of the params and of their gradients
  // Per-step scratch, emptied before the call returns (gradients are not kept between steps); the vectors
  // keep their capacity. One entry per param: its gradient as pass 1 reads it, its tensors as pass 2 writes
  // them; ``grad_copies`` holds the copies of gradients the kernels cannot read as they are.
  std::vector<cpu::GradRef> stats_grads;
  std::vector<cpu::UpdateSlot> slots;
  std::vector<at::Tensor> grad_copies;
};

// One pass-1 launch of the CUDA fast path: the gradients of ``buckets`` (in order), all of dtype code ``dtype``,
// as the op path's grad_stats_set launches them (one per gradient dtype); ``workspace``: float32 zeros.
struct StatsRun {
  int dtype = -1;
  std::vector<size_t> buckets;
  DeviceTable stats;
  at::Tensor workspace;
};

// One pass-2 launch of the CUDA fast path: the buckets of one launch set (fusedlr.optimizer.AdamW._launch_sets),
// launched as the op path does (fusedlr/extension/cuda.py's prepare_update_set): a set of one bucket by
// adamw_update on the bucket's table, a larger one by adamw_update_set on the set's table (csrc/cuda/table.h:
// the update table of every bucket's tensors in order, then the set region); ``arrival``: int32 [1], zero.
struct UpdateSet {
  std::vector<size_t> buckets;
  DeviceTable update;
  at::Tensor arrival;
};

struct StepPlan {
  std::vector<at::Tensor> params;  // every param of the plan (plan.flat)
  std::vector<int64_t> signature;  // kSigWords per param
  std::vector<int64_t> bucket_of;  // bucket of each param (-1: none)
  std::vector<int64_t> layout_of;  // offset in ``layouts`` of each param in a bucket (-1: none)
  std::vector<int64_t> layouts;    // (dim, sizes, strides) of those params when the plan was built
  std::vector<PlanBucket> buckets;
  int64_t n_groups = 0;
  int64_t numel = 0;  // elements of the params in buckets
  at::Device device{at::kCPU};                  // of the buckets
  const cuda::Launchers* launchers = nullptr;  // the CUDA fast path's launches (null: the CPU kernels)
  std::vector<StatsRun> runs;                     // CUDA fast path: pass 1
  std::vector<UpdateSet> sets;                    // CUDA fast path: pass 2
  std::vector<int64_t> table_scratch;             // CUDA fast path: a table as built this step
  std::vector<const cpu::GradRef*> run_grads;     // CUDA fast path: the gradients of a pass-1 launch
  std::vector<const cpu::UpdateSlot*> set_slots;  // CUDA fast path: the tensors of a pass-2 launch
  std::vector<cuda::SetSegment> segments;         // CUDA fast path: the segments of a launch set
  std::vector<int64_t> segment_sizes;             // CUDA fast path: their numbers of tensors
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

// torch::autograd::impl::bump_version, inline (the step bumps a few counters per param).
void bump(const at::Tensor& t) {
  if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

// The version counters of what an update writes for param ``j`` of ``b``: the param, its moments, and its master
// or remainder where the bucket keeps them (both the CPU step and the CUDA launch).
void bump_written(const PlanBucket& b, size_t j) {
  bump(b.params[j]);
  bump(b.exp_avgs[j]);
  bump(b.exp_avg_sqs[j]);
  if (b.amsgrad) bump(b.max_exp_avg_sqs[j]);
  if (!b.masters.empty()) bump(b.masters[j]);
  if (!b.remainders.empty()) bump(b.remainders[j]);
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

// A tensor on ``device`` of ``dtype`` holding at least ``numel`` elements, contiguous (undefined passes when optional).
bool scalar_ok(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, int64_t numel, bool exact) {
  if (!t.defined()) return true;
  return t.device() == device && t.scalar_type() == dtype && t.is_contiguous() &&
         (exact ? t.numel() == numel : t.numel() >= numel);
}

// Why param ``j`` of ``b`` and its states cannot go to the kernels as they are (nullptr: they can).
const char* param_reason(const PlanBucket& b, size_t j) {
  const at::Tensor& p = b.params[j];
  if (p.device() != b.device) return "a parameter is not on the plan's device";
  if (dtype_code(p.scalar_type()) != b.dtype) return "the parameters of a bucket differ in dtype";
  if (p.layout() != at::kStrided || !linear(p)) return "a parameter is not dense";
  std::pair<const at::Tensor*, at::ScalarType> states[5] = {{&b.exp_avgs[j], b.state_type},
                                                           {&b.exp_avg_sqs[j], b.state_type}};
  int n = 2;
  if (b.amsgrad) states[n++] = {&b.max_exp_avg_sqs[j], b.state_type};
  if (!b.masters.empty()) states[n++] = {&b.masters[j], at::kFloat};
  if (!b.remainders.empty()) states[n++] = {&b.remainders[j], at::kShort};
  for (int k = 0; k < n; ++k) {
    const auto& [s, type] = states[k];
    if (s->scalar_type() != type || s->device() != b.device || s->layout() != at::kStrided || !linear(*s) ||
        !same_layout(*s, p)) {
      return "a state is not laid out like its parameter";
    }
  }
  return nullptr;
}

// Why the plan's tensors cannot go to the kernels without a check per step (nullptr: they can).
const char* bucket_reason(const PlanBucket& b) {
  if (b.steps.device() != b.device || b.steps.scalar_type() != at::kLong || b.steps.dim() != 1 ||
      b.steps.numel() != static_cast<int64_t>(b.params.size()) || !b.steps.is_contiguous()) {
    return "steps is not a contiguous int64 tensor [n] on the parameters' device";
  }
  const size_t n = b.params.size();
  if ((!b.masters.empty() && (b.masters.size() != n || (b.dtype != kBF16 && b.dtype != kF16))) ||
      (!b.remainders.empty() && (b.remainders.size() != n || b.dtype != kBF16)) ||
      (!b.masters.empty() && !b.remainders.empty())) {
    return "the masters or remainders do not match the parameters";
  }
  if (b.lp.stochastic && !(b.pids.defined() && b.pids.device() == b.device && b.pids.scalar_type() == at::kLong &&
                           b.pids.dim() == 1 && b.pids.numel() == static_cast<int64_t>(n) && b.pids.is_contiguous())) {
    return "stochastic rounding needs pids, a contiguous int64 tensor [n] on the parameters' device";
  }
  for (size_t j = 0; j < n; ++j) {
    if (const char* reason = param_reason(b, j)) return reason;
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
// The device index the launchers take (the emulation's CPU tensors: 0).
int device_index(const at::Device& device) { return device.is_cuda() ? device.index() : 0; }

// Whether ``t`` is a contiguous tensor of ``dtype`` on ``device`` with ``numel`` elements (at least, unless ``exact``).
bool buffer_ok(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, int64_t numel, bool exact) {
  return t.defined() && scalar_ok(t, device, dtype, numel, exact);
}

// A DeviceTable of ``n`` tensors of ``nptr`` pointers over ``numels`` (followed by ``extra`` entries: a set region)
// from (table, host mirror); nullptr, or why not.
const char* device_table(PyObject* table_obj, PyObject* host_obj, const at::Device& device, int nptr,
                         const std::vector<int64_t>& numels, int64_t extra, DeviceTable& out) {
  if (!THPVariable_Check(table_obj) || !THPVariable_Check(host_obj)) return "a table is not a tensor";
  out.table = THPVariable_Unpack(table_obj);
  out.host = THPVariable_Unpack(host_obj);
  const int64_t size = cuda::table_size(static_cast<int64_t>(numels.size()), nptr) + extra;
  if (!buffer_ok(out.table, device, at::kLong, size, true) || !buffer_ok(out.host, at::kCPU, at::kLong, size, true)) {
    return "a table or its host mirror is not a contiguous int64 tensor of the table's size";
  }
  out.total_chunks = 0;
  for (int64_t numel : numels) out.total_chunks += cuda::num_chunks(numel);
  return nullptr;
}

// The buckets listed by ``idx_obj`` (indices into plan.buckets), each counted in ``covered`` (a bucket in two
// launches is refused), into ``out`` with their numels; nullptr, or why not.
const char* bucket_indices(PyObject* idx_obj, const StepPlan& plan, std::vector<int>& covered,
                           std::vector<size_t>& out, std::vector<int64_t>& numels) {
  PyObject* idx = PySequence_Fast(idx_obj, "");
  if (idx == nullptr) {
    PyErr_Clear();
    return "a launch's buckets are not a list";
  }
  const char* reason = nullptr;
  for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(idx) && reason == nullptr; ++j) {
    const Py_ssize_t bi = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(idx, j));
    if (bi < 0 || static_cast<size_t>(bi) >= plan.buckets.size() || covered[bi]++) {
      PyErr_Clear();
      reason = "a launch's buckets are not buckets of the plan, each in one launch";
      break;
    }
    out.push_back(static_cast<size_t>(bi));
    for (const at::Tensor& p : plan.buckets[bi].params) numels.push_back(p.numel());
  }
  Py_DECREF(idx);
  if (reason == nullptr && out.empty()) reason = "a launch has no bucket";
  return reason;
}

// Whether buckets ``a`` and ``b`` take the same update kernel instance (fusedlr.extension._common.launch_key).
bool same_kernel(const PlanBucket& a, const PlanBucket& b) {
  return a.dtype == b.dtype && a.amsgrad == b.amsgrad && a.low_precision == b.low_precision &&
         a.state_type == b.state_type && a.lp.master == b.lp.master && a.lp.stochastic == b.lp.stochastic &&
         a.lp.seed == b.lp.seed;
}

// The launches of one pass from ``launches`` (a list of (indices of buckets, table, host mirror, buffer) each):
// ``parse(indices, numels, table, host, buffer)`` checks one and keeps it (nullptr, or why not); every bucket
// must be in exactly one launch.
template <typename Parse>
const char* parse_launches(PyObject* launches, StepPlan& plan, const char* what, Parse parse) {
  PyObject* seq = PySequence_Fast(launches, "");
  if (seq == nullptr) {
    PyErr_Clear();
    return "the launches of a pass are not a list";
  }
  std::vector<int> covered(plan.buckets.size(), 0);
  const char* reason = nullptr;
  const c10::DeviceGuard guard(plan.device);  // the occupancy query reads the current device
  for (Py_ssize_t r = 0; r < PySequence_Fast_GET_SIZE(seq) && reason == nullptr; ++r) {
    PyObject *idx_obj, *table_obj, *host_obj, *buffer_obj;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, r), "OOOO", &idx_obj, &table_obj, &host_obj, &buffer_obj)) {
      PyErr_Clear();
      reason = what;
      break;
    }
    std::vector<size_t> buckets;
    std::vector<int64_t> numels;
    reason = bucket_indices(idx_obj, plan, covered, buckets, numels);
    if (reason == nullptr) reason = parse(std::move(buckets), numels, table_obj, host_obj, buffer_obj);
  }
  Py_DECREF(seq);
  for (size_t bi = 0; bi < covered.size() && reason == nullptr; ++bi) {
    if (covered[bi] != 1) reason = "a bucket is in no launch";
  }
  return reason;
}

// The pass-1 launches from ``runs``: (indices of buckets of one dtype, table, host mirror, workspace) each.
const char* stats_runs(PyObject* runs, StepPlan& plan) {
  return parse_launches(
      runs, plan, "a run is not (buckets, table, host mirror, workspace)",
      [&](std::vector<size_t> buckets, const std::vector<int64_t>& numels, PyObject* table_obj, PyObject* host_obj,
          PyObject* ws_obj) -> const char* {
        StatsRun run;
        run.dtype = plan.buckets[buckets[0]].dtype;
        for (size_t bi : buckets) {
          if (plan.buckets[bi].dtype != run.dtype) return "a run's buckets differ in dtype";
        }
        run.buckets = std::move(buckets);
        if (const char* r = device_table(table_obj, host_obj, plan.device, cuda::kStatsPtrs, numels, 0, run.stats)) {
          return r;
        }
        if (plan.launchers->grad_stats_grid(run.dtype, run.stats.total_chunks, device_index(plan.device),
                                            &run.stats.grid) != 0) {
          return "sizing the grid of grad_stats failed";
        }
        if (!(THPVariable_Check(ws_obj) && buffer_ok(run.workspace = THPVariable_Unpack(ws_obj), plan.device,
                                                     at::kFloat, 2 * static_cast<int64_t>(run.stats.grid) + 1,
                                                     false))) {
          return "a run's workspace is not a contiguous float32 tensor of 2 * grid + 1 elements on the device";
        }
        plan.runs.push_back(std::move(run));
        return nullptr;
      });
}

// The pass-2 launches from ``sets``: (indices of the buckets of one launch set, table, host mirror, arrival
// counter) each, in the op path's order; a set of several buckets has the set region in its table.
const char* update_sets(PyObject* sets, StepPlan& plan) {
  return parse_launches(
      sets, plan, "a launch set is not (buckets, table, host mirror, arrival)",
      [&](std::vector<size_t> buckets, const std::vector<int64_t>& numels, PyObject* table_obj, PyObject* host_obj,
          PyObject* arrival_obj) -> const char* {
        const PlanBucket& first = plan.buckets[buckets[0]];
        for (size_t bi : buckets) {
          if (!same_kernel(plan.buckets[bi], first)) return "a launch set's buckets take different kernels";
        }
        const int64_t nseg = buckets.size() > 1 ? static_cast<int64_t>(buckets.size()) : 0;
        UpdateSet set;
        set.buckets = std::move(buckets);
        const int64_t extra = nseg > 0 ? cuda::set_region_size(static_cast<int64_t>(numels.size()), nseg) : 0;
        if (const char* r = device_table(table_obj, host_obj, plan.device, cuda::kUpdatePtrs, numels, extra,
                                         set.update)) {
          return r;
        }
        if (!THPVariable_Check(arrival_obj) ||
            !buffer_ok(set.arrival = THPVariable_Unpack(arrival_obj), plan.device, at::kInt, 1, false)) {
          return "a launch set's arrival counter is not a contiguous int32 tensor on the device";
        }
        if (plan.launchers->adamw_update_grid(first.dtype, first.amsgrad, first.low_precision,
                                              dtype_code(first.state_type), set.update.total_chunks,
                                              device_index(plan.device), nseg > 0, &set.update.grid) != 0) {
          return "sizing the grid of adamw_update failed";
        }
        plan.sets.push_back(std::move(set));
        return nullptr;
      });
}

// StepPlan(params, signature, buckets, n_groups, launchers=0, runs=None, sets=None): ``params`` and ``signature`` of
// the plan (fusedlr.plan.Plan.flat, .signature from scan_grads); ``buckets``: (group, indices into params, exp_avgs,
// exp_avg_sqs, max_exp_avg_sqs or None, steps, precision) each, ``precision`` None or (masters or None, remainders or
// None, pids, seed, stochastic) (fusedlr.precision.BucketPrecision). ``launchers``: 0 for the CPU kernels (method
// ``step``), else the address of a csrc/cuda/launchers.h table (method ``launch``): then ``runs`` are the pass-1
// launches (stats_runs) and ``sets`` the pass-2 ones (update_sets). Raises ValueError when the fast path cannot run
// this plan.
int step_plan_init(PyObject* self_obj, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"params", "signature", "buckets", "n_groups", "launchers", "runs", "sets", nullptr};
  PyObject *params_obj, *sig_obj, *buckets_obj, *runs_obj = Py_None, *sets_obj = Py_None;
  Py_ssize_t n_groups;
  unsigned long long launchers = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OSOn|KOO", const_cast<char**>(kwlist), &params_obj, &sig_obj,
                                   &buckets_obj, &n_groups, &launchers, &runs_obj, &sets_obj)) {
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
    plan->launchers = reinterpret_cast<const cuda::Launchers*>(static_cast<uintptr_t>(launchers));
    PyObject* seq = PySequence_Fast(buckets_obj, "fusedlr._C.StepPlan: buckets must be a list");
    if (seq == nullptr) return -1;
    const Py_ssize_t nb = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t bi = 0; bi < nb; ++bi) {
      PyObject *idx_obj, *m_obj, *v_obj, *vmax_obj, *steps_obj, *prec_obj;
      Py_ssize_t group;
      if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, bi), "nOOOOOO", &group, &idx_obj, &m_obj, &v_obj,
                            &vmax_obj, &steps_obj, &prec_obj)) {
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
        b.device = b.params[0].device();
        if (plan->buckets.empty()) plan->device = b.device;
        if (b.device != plan->device) reason = "the buckets are on different devices";
        if (plan->launchers == nullptr && !b.device.is_cpu()) reason = "a parameter is not on the CPU";
      }
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
      b.param_type = b.params[0].dtype();
      b.stats_grads.reserve(m);
      b.slots.reserve(m);
      plan->buckets.push_back(std::move(b));
    }
    Py_DECREF(seq);
    if (plan->launchers != nullptr) {
      const char* reason = runs_obj == Py_None || sets_obj == Py_None ? "a device plan needs its runs and sets"
                                                                      : stats_runs(runs_obj, *plan);
      if (reason == nullptr) reason = update_sets(sets_obj, *plan);
      if (reason != nullptr) {
        PyErr_Format(PyExc_ValueError, "fusedlr._C.StepPlan: %s", reason);
        return -1;
      }
    }
    plan->layout_of.assign(n, -1);
    for (size_t i = 0; i < n; ++i) {
      if (plan->bucket_of[i] < 0 && signature_has_grad(plan->signature[i * kSigWords + 2])) {
        PyErr_SetString(PyExc_ValueError, "fusedlr._C.StepPlan: a parameter with a gradient is in no bucket");
        return -1;
      }
      if (plan->bucket_of[i] < 0) continue;
      const at::Tensor& p = plan->params[i];
      plan->layout_of[i] = static_cast<int64_t>(plan->layouts.size());
      plan->layouts.push_back(p.dim());
      plan->layouts.insert(plan->layouts.end(), p.sizes().begin(), p.sizes().end());
      plan->layouts.insert(plan->layouts.end(), p.strides().begin(), p.strides().end());
      plan->numel += p.numel();
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
  at::Tensor scale;  // launch: GradScaler's scale (the kernels invert it), or undefined
  std::optional<double> max_norm;
  bool advance_k = false;       // step
  bool skip_nonfinite = false;  // launch: skip also when stats[1] > 0
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
    if (g.lr_tensor.defined() && !(g.lr_tensor.device() == plan.device && g.lr_tensor.numel() == 1 &&
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

// Whether ``t`` has the sizes and strides at ``layout`` (dim, sizes, strides; ``t`` strided).
bool has_layout(const c10::TensorImpl& t, const int64_t* layout) {
  const int64_t d = layout[0];
  if (t.dim() != d) return false;
  const c10::IntArrayRef sizes = t.sizes(), strides = t.strides();
  for (int64_t k = 0; k < d; ++k) {
    if (sizes[k] != layout[1 + k] || strides[k] != layout[1 + d + k]) return false;
  }
  return true;
}

bool state_unchanged(const at::Tensor& s, caffe2::TypeMeta type, const at::Device& device, const int64_t* layout) {
  const c10::TensorImpl& t = *s.unsafeGetTensorImpl();
  return t.dtype() == type && t.device() == device && t.layout() == at::kStrided && has_layout(t, layout);
}

// The common case of a step, decided without param_signature: param ``j`` of ``b`` is still the tensor the plan
// was built for (data ``expected[0]``, dtype, device, sizes and strides ``layout``), its states keep their dtype
// and its layout, and ``g`` is a dense gradient of its dtype, device, sizes and strides. Then the full check
// (param_signature, param_reason) passes and the kernels read ``g`` as it is; when false, the full check decides.
bool unchanged(const PlanBucket& b, size_t j, const c10::TensorImpl& p, const c10::TensorImpl& g,
               const int64_t* layout, const int64_t* expected) {
  const at::Device& dev = b.device;
  if (p.dtype() != b.param_type || p.device() != dev || p.layout() != at::kStrided || !has_layout(p, layout) ||
      !p.has_storage() || reinterpret_cast<int64_t>(p.data()) != expected[0]) {
    return false;
  }
  if (g.dtype() != b.param_type || g.device() != dev || g.layout() != at::kStrided || !has_layout(g, layout)) {
    return false;
  }
  const caffe2::TypeMeta state = caffe2::TypeMeta::fromScalarType(b.state_type);
  return state_unchanged(b.exp_avgs[j], state, dev, layout) && state_unchanged(b.exp_avg_sqs[j], state, dev, layout) &&
         (!b.amsgrad || state_unchanged(b.max_exp_avg_sqs[j], state, dev, layout)) &&
         (b.masters.empty() || state_unchanged(b.masters[j], caffe2::TypeMeta::Make<float>(), dev, layout)) &&
         (b.remainders.empty() || state_unchanged(b.remainders[j], caffe2::TypeMeta::Make<int16_t>(), dev, layout));
}

void* data_of(const std::vector<at::Tensor>& ts, size_t j) {
  return ts.empty() ? nullptr : ts[j].unsafeGetTensorImpl()->mutable_data();
}

// Reads every gradient and checks it against the plan (nothing is written), filling each bucket's scratch
// (``stats_grads`` only ``with_stats``). False: stale.
bool collect_grads(StepPlan& plan, bool with_stats) {
  const size_t n = plan.params.size();
  int64_t words[kSigWords];
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = plan.params[i];
    c10::TensorImpl& p = *param.unsafeGetTensorImpl();
    const at::Tensor& g = p.grad();  // not at::Tensor::grad(), which asks the dispatcher whether p is a leaf
    const int64_t* expected = &plan.signature[i * kSigWords];
    const int64_t bi = plan.bucket_of[i];
    if (bi < 0 || !g.defined()) {  // no gradient expected (a bucket's param without one fails the check)
      if (!param_signature(param, g, words) || words[0] != expected[0] || words[1] != expected[1] ||
          words[2] != expected[2]) {
        return false;
      }
      continue;
    }
    PlanBucket& b = plan.buckets[bi];
    const size_t j = b.slots.size();
    const void* update_grad = nullptr;
    const void* stats_grad = nullptr;
    if (unchanged(b, j, p, *g.unsafeGetTensorImpl(), &plan.layouts[plan.layout_of[i]], expected)) {
      update_grad = stats_grad = g.unsafeGetTensorImpl()->data();
    } else {
      if (!param_signature(param, g, words) || words[0] != expected[0] || words[1] != expected[1] ||
          words[2] != expected[2] || param_reason(b, j) != nullptr) {
        return false;  // e.g. p.data = a tensor of another layout
      }
      const bool lin = linear(g);
      update_grad = stats_grad = g.const_data_ptr();
      if (!lin || !same_layout(g, param)) {
        b.grad_copies.push_back(kernel_grad(g, &param));
        update_grad = b.grad_copies.back().const_data_ptr();
      }
      if (!lin && with_stats) {
        b.grad_copies.push_back(kernel_grad(g, nullptr));
        stats_grad = b.grad_copies.back().const_data_ptr();
      }
    }
    const int64_t numel = p.numel();
    if (with_stats) b.stats_grads.push_back({stats_grad, numel});
    b.slots.push_back({p.mutable_data(), update_grad, data_of(b.exp_avgs, j), data_of(b.exp_avg_sqs, j),
                       b.amsgrad ? data_of(b.max_exp_avg_sqs, j) : nullptr, static_cast<float*>(data_of(b.masters, j)),
                       static_cast<uint16_t*>(data_of(b.remainders, j)), numel});
  }
  return true;
}

void clear_scratch(StepPlan& plan) {
  for (PlanBucket& b : plan.buckets) {
    b.stats_grads.clear();
    b.slots.clear();
    b.grad_copies.clear();
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
      cpu::grad_stats_kernel(b.dtype, b.stats_grads.data(), b.stats_grads.size(), inv, stats);
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
    const size_t n = b.params.size();
    for (size_t j = 0; j < n; ++j) steps[j] += applied;
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
      if (b.low_precision) {
        cpu::adamw_update_lp_kernel(b.dtype, dtype_code(b.state_type), b.amsgrad, b.slots.data(), n, steps, g.hyper,
                                    s, b.lp);
      } else {
        cpu::adamw_update_kernel(b.dtype, b.amsgrad, b.slots.data(), n, steps, g.hyper, s);
      }
    }
    for (size_t j = 0; j < n; ++j) bump_written(b, j);
    bump(a.applied_lr);
  }
  if (a.advance_k) {
    *a.k.data_ptr<int64_t>() += applied;
    bump(a.k);
  }
}

// The arguments of ``step`` and ``launch``: (hypers, k, schedule, max_norm, inv_scale (launch: scale), found_inf,
// stats, found_inf_out, applied_lr, norm, advance_k (launch: skip_nonfinite)), checked against the plan (on its
// device). Returns the plan, or nullptr with a Python error set; sets ``stale`` when an input is not what the
// kernels take (the general path then runs, or raises its message).
StepPlan* parse_step_args(PyObject* self_obj, PyObject* args, bool launch, StepArgs& a, bool& stale) {
  StepPlan* plan = reinterpret_cast<StepPlanObject*>(self_obj)->plan;
  if (plan == nullptr || (plan->launchers != nullptr) != launch) {
    PyErr_SetString(PyExc_RuntimeError, plan == nullptr ? "fusedlr._C.StepPlan was not initialised"
                                                        : "fusedlr._C.StepPlan: step() runs CPU plans, launch() "
                                                          "plans with launchers");
    return nullptr;
  }
  PyObject *hypers, *k, *schedule, *max_norm, *inv_scale, *found_inf, *stats, *found_inf_out, *applied_lr, *norm;
  int flag;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOp", &hypers, &k, &schedule, &max_norm, &inv_scale, &found_inf, &stats,
                        &found_inf_out, &applied_lr, &norm, &flag)) {
    return nullptr;
  }
  (launch ? a.skip_nonfinite : a.advance_k) = flag != 0;
  if (max_norm != Py_None) {
    a.max_norm = PyFloat_AsDouble(max_norm);
    if (PyErr_Occurred()) return nullptr;
  }
  if (!tensor_or_none(k, a.k) || !tensor_or_none(schedule, a.schedule) ||
      !tensor_or_none(inv_scale, launch ? a.scale : a.inv_scale) || !tensor_or_none(found_inf, a.found_inf) ||
      !tensor_or_none(stats, a.stats) || !tensor_or_none(found_inf_out, a.found_inf_out) ||
      !tensor_or_none(applied_lr, a.applied_lr) || !tensor_or_none(norm, a.norm)) {
    PyErr_SetString(PyExc_TypeError, "fusedlr._C.StepPlan: expected tensors or None");
    return nullptr;
  }
  const at::Device& dev = plan->device;
  stale = !a.k.defined() || !a.applied_lr.defined() || !scalar_ok(a.k, dev, at::kLong, 1, true) ||
          !scalar_ok(a.schedule, dev, at::kDouble, 1, false) || (a.schedule.defined() && a.schedule.dim() != 1) ||
          !scalar_ok(a.inv_scale, dev, at::kFloat, 1, true) || !scalar_ok(a.scale, dev, at::kFloat, 1, true) ||
          !scalar_ok(a.found_inf, dev, at::kFloat, 1, true) || !scalar_ok(a.stats, dev, at::kFloat, 2, false) ||
          !scalar_ok(a.found_inf_out, dev, at::kFloat, 1, true) ||
          !scalar_ok(a.applied_lr, dev, at::kDouble, plan->n_groups, false) ||
          !scalar_ok(a.norm, dev, at::kFloat, 1, true) ||
          ((a.max_norm.has_value() || a.found_inf_out.defined() || a.norm.defined() || a.skip_nonfinite) &&
           !a.stats.defined()) ||
          (a.found_inf_out.defined() && a.found_inf.defined());
  if (!stale && !parse_groups(*plan, hypers, a, stale)) return nullptr;
  return plan;
}

// step(hypers, k, schedule, max_norm, inv_scale, found_inf, stats, found_inf_out, applied_lr, norm, advance_k)
// -> bool, on a CPU plan. ``stats`` (float32 [2], zeroed here): run pass 1 into it. ``found_inf_out`` (float32 0-d):
// receive GradScaler's found_inf from pass 1 and skip on it. ``norm`` (float32 0-d): receives
// sqrtf(stats[0]), as the op's folded update writes it (torch's float32 sqrt on the CPU may round 1 ulp
// lower, so the unfolded path can differ by that). ``advance_k``: add the number of applied updates to ``k``. False:
// stale, nothing was written.
PyObject* step_plan_step(PyObject* self_obj, PyObject* args) {
  StepArgs a;
  bool stale = false;
  StepPlan* parsed = parse_step_args(self_obj, args, false, a, stale);
  if (parsed == nullptr) return nullptr;
  StepPlan& plan = *parsed;
  try {
    stale = stale || !collect_grads(plan, a.stats.defined());
    std::string error;
    if (!stale && plan.numel < cpu::kParallelMin) {
      run_step(plan, a);  // too short to hand the GIL over (exceptions go to the handler below)
    } else if (!stale) {
      Py_BEGIN_ALLOW_THREADS
      try {
        run_step(plan, a);
      } catch (const std::exception& e) {
        error = e.what();
      }
      Py_END_ALLOW_THREADS
    }
    clear_scratch(plan);
    if (error.empty() && !stale && a.norm.defined()) {  // as the op's write_step_flags (adamw_math.h)
      *a.norm.data_ptr<float>() = ::sqrtf(*a.stats.data_ptr<float>());
      bump(a.norm);
    }
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

// ---------------------------------------------------------------- one step on the device (CUDA fast path)
void check_device(const cuda::Launchers& l, int err, const char* what) {
  TORCH_CHECK(err == 0, "fusedlr: CUDA error in ", what, ": ", l.error_string(err));
}

// Makes ``t``'s device table hold the table in ``plan.table_scratch``: compared with the host mirror, uploaded
// (and mirrored) only when it differs, as bindings_cuda.cpp's upload_table. Returns the device table.
const int64_t* sync_table(StepPlan& plan, DeviceTable& t, void* stream) {
  const std::vector<int64_t>& h = plan.table_scratch;
  const size_t bytes = h.size() * sizeof(int64_t);
  int64_t* host = t.host.data_ptr<int64_t>();
  if (std::memcmp(host, h.data(), bytes) != 0) {
    check_device(*plan.launchers,
                 plan.launchers->upload(t.table.data_ptr(), h.data(), static_cast<int64_t>(bytes),
                                        device_index(plan.device), stream),
                 "(uploading a pointer table)");
    std::memcpy(host, h.data(), bytes);
    bump(t.host);
    bump(t.table);
  }
  return t.table.data_ptr<int64_t>();
}

// Into ``plan.table_scratch``: the table (csrc/cuda/table.h) of ``n`` tensors with ``nptr`` pointers each, from
// ``ptr(i, j)`` (pointer j of tensor i) and ``numel(i)``.
template <typename Ptr, typename Numel>
void build_table(StepPlan& plan, int64_t n, int nptr, Ptr ptr, Numel numel) {
  std::vector<int64_t>& h = plan.table_scratch;
  h.resize(cuda::table_size(n, nptr));
  int64_t chunks = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < nptr; ++j) h[i * nptr + j] = reinterpret_cast<int64_t>(ptr(i, j));
    h[n * nptr + i] = numel(i);
    h[n * (nptr + 1) + i] = chunks;
    chunks += cuda::num_chunks(numel(i));
  }
  h[n * (nptr + 2)] = chunks;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

// The tensor LR of group ``g`` into ``in`` (none: the hyperparameters' lr).
void set_lr(const GroupInput& g, StepInputs& in) {
  if (!g.lr_tensor.defined()) return;
  if (g.lr_tensor.scalar_type() == at::kDouble) {
    in.lr_f64 = g.lr_tensor.data_ptr<double>();
  } else {
    in.lr_f32 = g.lr_tensor.data_ptr<float>();
  }
}

// Appends the set region of launch set ``set`` (csrc/cuda/table.h) to ``plan.table_scratch``: one segment per bucket
// with its steps, group's hyperparameters, tensor LR, applied-LR entry and pids, as bindings_cuda.cpp's
// adamw_update_set_cuda writes it (so that the op path finds the table it would build).
void set_region(StepPlan& plan, const UpdateSet& set, const StepArgs& a) {
  plan.segments.clear();
  plan.segment_sizes.clear();
  for (size_t bi : set.buckets) {
    const PlanBucket& b = plan.buckets[bi];
    const GroupInput& g = a.groups[b.group];
    StepInputs in{};
    set_lr(g, in);
    plan.segments.push_back(cuda::SetSegment{0, b.steps.data_ptr<int64_t>(), in.lr_f32, in.lr_f64,
                                             a.applied_lr.data_ptr<double>() + b.group,
                                             b.lp.stochastic ? b.pids.data_ptr<int64_t>() : nullptr, g.hyper.lr,
                                             g.hyper.beta1, g.hyper.beta2, g.hyper.eps, g.hyper.weight_decay,
                                             g.hyper.maximize ? 1 : 0});
    plan.segment_sizes.push_back(static_cast<int64_t>(b.slots.size()));
  }
  std::vector<int64_t>& h = plan.table_scratch;
  const size_t base = h.size();
  const int64_t n = static_cast<int64_t>(plan.set_slots.size());
  const int64_t nseg = static_cast<int64_t>(set.buckets.size());
  h.resize(base + cuda::set_region_size(n, nseg));
  cuda::fill_set_region(plan.segments.data(), plan.segment_sizes.data(), nseg, h.data() + base);
}

// Everything a folded step of the op path launches (fusedlr.optimizer.AdamW._prepare_folded on backend cuda):
// pass 1 of each run into ``stats`` (the first resetting it) when stats are wanted, then the folded update of
// each launch set, the last one advancing ``k`` and writing the norm and found_inf; tables uploaded when they
// changed.
void run_launch(StepPlan& plan, const StepArgs& a) {
  const cuda::Launchers& l = *plan.launchers;
  const c10::DeviceGuard guard(plan.device);  // launches go to the current device (as the ops' CUDAGuard)
  const int device = device_index(plan.device);
  void* stream = l.current_stream(device);
  const float* scale = ptr_or_null<const float>(a.scale);
  float* stats = ptr_or_null<float>(a.stats);
  if (stats != nullptr) {
    for (size_t r = 0; r < plan.runs.size(); ++r) {
      StatsRun& run = plan.runs[r];
      int64_t n = 0;
      for (size_t bi : run.buckets) n += static_cast<int64_t>(plan.buckets[bi].stats_grads.size());
      if (run.stats.total_chunks == 0) {  // as the op: a memset when it resets, no table
        check_device(l, l.grad_stats(run.dtype, nullptr, n, 0, nullptr, nullptr, r == 0, stats, nullptr, 0, stream),
                     "grad_stats");
      } else {
        std::vector<const cpu::GradRef*>& refs = plan.run_grads;
        refs.clear();
        for (size_t bi : run.buckets) {
          for (const cpu::GradRef& g : plan.buckets[bi].stats_grads) refs.push_back(&g);
        }
        build_table(plan, n, cuda::kStatsPtrs, [&](int64_t i, int) { return refs[i]->data; },
                    [&](int64_t i) { return refs[i]->numel; });
        const int64_t* table = sync_table(plan, run.stats, stream);
        check_device(l, l.grad_stats(run.dtype, table, n, run.stats.total_chunks, nullptr, scale, r == 0, stats,
                                     run.workspace.data_ptr<float>(), run.stats.grid, stream),
                     "grad_stats");
        bump(run.workspace);
      }
      bump(a.stats);
    }
  }
  for (size_t si = 0; si < plan.sets.size(); ++si) {
    UpdateSet& set = plan.sets[si];
    const bool last = si + 1 == plan.sets.size();
    const PlanBucket& first = plan.buckets[set.buckets[0]];
    std::vector<const cpu::UpdateSlot*>& slots = plan.set_slots;
    slots.clear();
    for (size_t bi : set.buckets) {
      for (const cpu::UpdateSlot& s : plan.buckets[bi].slots) slots.push_back(&s);
    }
    const int64_t n = static_cast<int64_t>(slots.size());
    build_table(
        plan, n, cuda::kUpdatePtrs,
        [&](int64_t i, int j) -> const void* {
          const cpu::UpdateSlot& s = *slots[i];
          const void* ptrs[cuda::kUpdatePtrs] = {s.p, s.g, s.m, s.v, s.vmax, s.master, s.remainder};
          return ptrs[j];
        },
        [&](int64_t i) { return slots[i]->numel; });
    const bool is_set = set.buckets.size() > 1;
    if (is_set) set_region(plan, set, a);
    const int64_t* table = sync_table(plan, set.update, stream);
    const GroupInput& g = a.groups[first.group];
    StepInputs in{};
    in.k = a.k.data_ptr<int64_t>();
    in.schedule = ptr_or_null<const double>(a.schedule);
    in.stats = stats;
    in.found_inf = ptr_or_null<const float>(a.found_inf);
    in.grad_scale = scale;
    in.skip_nonfinite = a.skip_nonfinite;
    StepOutputs outs{};
    outs.k = last ? a.k.data_ptr<int64_t>() : nullptr;
    outs.norm = last ? ptr_or_null<float>(a.norm) : nullptr;
    outs.found_inf = last ? ptr_or_null<float>(a.found_inf_out) : nullptr;
    outs.arrival = reinterpret_cast<unsigned int*>(set.arrival.data_ptr<int32_t>());
    if (is_set) {  // steps, LRs and pids are the segments' (the set region)
      LowPrecision lp = first.lp;
      lp.pids = nullptr;
      check_device(l, l.adamw_update_set(first.dtype, first.amsgrad, table, n, set.update.total_chunks,
                                         static_cast<int64_t>(set.buckets.size()), g.hyper, in,
                                         first.low_precision ? &lp : nullptr, dtype_code(first.state_type), outs,
                                         set.update.grid, stream),
                   "adamw_update_set");
    } else {
      in.steps = first.steps.data_ptr<int64_t>();
      set_lr(g, in);
      in.applied_lr = a.applied_lr.data_ptr<double>() + first.group;
      outs.steps = first.steps.data_ptr<int64_t>();
      check_device(l, l.adamw_update(first.dtype, first.amsgrad, table, n, set.update.total_chunks, g.hyper, in,
                                     first.low_precision ? &first.lp : nullptr, dtype_code(first.state_type), outs,
                                     set.update.grid, stream),
                   "adamw_update");
    }
    for (size_t bi : set.buckets) {  // what the op's schema marks as written
      const PlanBucket& b = plan.buckets[bi];
      for (size_t j = 0; j < b.params.size(); ++j) bump_written(b, j);
      bump(b.steps);
    }
    bump(a.k);
    bump(a.applied_lr);
    bump(set.arrival);
    if (last) {
      bump(a.norm);
      bump(a.found_inf_out);
    }
  }
}

// launch(hypers, k, schedule, max_norm, scale, found_inf, stats, found_inf_out, applied_lr, norm, skip_nonfinite)
// -> bool, on a plan with launchers: one folded step of every bucket on the current stream, as the op path's
// (fusedlr.control.FoldedUpdate: GradScaler's ``scale``, ``skip_nonfinite``, ``k`` advanced and ``norm`` and
// ``found_inf_out`` written by the last update); ``stats`` (float32 [2]) receives pass 1 (skipped when None).
// No host-device sync; never call it while a CUDA graph is being captured (a table upload then would be replayed
// from a recycled buffer). False: stale, nothing was written or launched.
PyObject* step_plan_launch(PyObject* self_obj, PyObject* args) {
  StepArgs a;
  bool stale = false;
  StepPlan* parsed = parse_step_args(self_obj, args, true, a, stale);
  if (parsed == nullptr) return nullptr;
  StepPlan& plan = *parsed;
  try {
    stale = stale || !collect_grads(plan, a.stats.defined());
    if (!stale) run_launch(plan, a);
    clear_scratch(plan);
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
    {"launch", step_plan_launch, METH_VARARGS,
     "launch(hypers, k, schedule, max_norm, scale, found_inf, stats, found_inf_out, applied_lr, norm, "
     "skip_nonfinite) -> bool: one folded step of every bucket through the plan's launchers; False (nothing "
     "written) when the plan is stale."},
    {"__reduce__", step_plan_reduce, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject step_plan_type = {PyVarObject_HEAD_INIT(nullptr, 0)};

}  // namespace

int add_step_plan_type(PyObject* module) {
  step_plan_type.tp_name = "fusedlr._C.StepPlan";
  step_plan_type.tp_basicsize = sizeof(StepPlanObject);
  step_plan_type.tp_flags = Py_TPFLAGS_DEFAULT;
  step_plan_type.tp_doc =
      "StepPlan(params, signature, buckets, n_groups, launchers=0, runs=None, sets=None): the eager fast path of "
      "fusedlr.AdamW.step on the CPU (step) or through CUDA launchers (launch) for one launch plan (see "
      "fusedlr/fast_step.py).";
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
#ifdef FUSEDLR_WITH_CUDA
  const void* launchers = cuda::device_launchers();
#else
  const void* launchers = nullptr;
#endif
  // The launchers table of StepPlan's CUDA fast path (csrc/cuda/launchers.h), 0 without the CUDA kernels.
  return PyModule_AddIntConstant(module, "CUDA_LAUNCHERS", static_cast<long>(reinterpret_cast<uintptr_t>(launchers)));
}

}  // namespace fusedlr
