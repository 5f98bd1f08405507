// fusedlr._C: defines the fusedlr custom ops (schemas) and is the Python module that loads them.
// Implementations: csrc/cpu/adamw_cpu.cpp (CPU) and csrc/cuda/bindings_cuda.cpp (CUDA builds);
// fake (meta) implementations for torch.compile: fusedlr/extension/__init__.py.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <vector>

#include "cuda/table.h"
#include "op_common.h"
#include "param_signature.h"
#include "plan_watch.h"
#include "step_plan.h"

#ifdef FUSEDLR_WITH_CUDA
namespace fusedlr {
namespace cuda {
int compiled_archs(int* out, int capacity);  // csrc/cuda/adamw_update.cu
}  // namespace cuda
}  // namespace fusedlr
#endif

TORCH_LIBRARY(fusedlr, m) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  m.set_python_module("fusedlr.extension");
#endif
  // Pass 1: out[0] += sum((g * inv_scale)^2), out[1] += count of non-finite grads (out = ... with reset).
  // table/table_host: CUDA only, the cached device pointer table and its host mirror (see
  // csrc/cuda/bindings_cuda.cpp); None uploads a fresh table. workspace: CUDA only, float32
  // [2 * blocks + 1] zeros for the two-stage reduction (left zeroed; None allocates one).
  // scale (float32, one element): GradScaler's scale, instead of inv_scale: the kernels multiply by
  // float32(1 / float64(scale)), as GradScaler's own inverse. reset: write out instead of adding to it
  // (also with no gradient element), so the first bucket of a step needs no zeroed buffer.
  m.def(
      "grad_stats(Tensor[] grads, Tensor? inv_scale, Tensor(a!) out, Tensor(b!)? table=None, "
      "Tensor(c!)? table_host=None, Tensor(d!)? workspace=None, Tensor? scale=None, bool reset=False) -> ()");
  // Pass 2: the fused AdamW update, in place (see fusedlr/reference.py). max_exp_avg_sqs is empty
  // without amsgrad; steps holds each tensor's step number of this update; k is the schedule index.
  // lr_tensor (float32/float64, one element, on the device) replaces lr when given; applied_lr
  // (float64, one element) receives lr * sched(k) when the update is applied (not when skipped).
  // Low-precision modes (fusedlr/precision.py): the moments may be bfloat16 (or float32 for float64
  // params); masters (float32, bf16/fp16 params) or remainders (int16, bf16 params) hold the fp32
  // master of each param (required lists, empty when unused: torch 2.6's functionalization refuses
  // optional mutable tensor lists); stochastic rounds the bf16 params without master and bf16 moments with the
  // RNG keyed by seed, pids (int64 [n], each param's pid) and steps.
  // The small ops of a step, folded in (fusedlr.control.FoldedUpdate): applied_lr may hold every group's
  // entry (lr_index: this bucket's); scale: GradScaler's scale instead of inv_scale (as in grad_stats);
  // skip_nonfinite: skip also when stats[1] > 0. advance: steps hold the updates applied before (this
  // update's step numbers are steps + 1) and are advanced by 1 when the update is applied; advance_k:
  // k too. norm_out (float32, one element) receives sqrt(stats[0]) and found_inf_out (float32, one
  // element) 1.0 when the update is skipped, else 0.0, both also on a skipped step. workspace: CUDA only,
  // int32 [1] zero, the blocks' arrival counter of advance/advance_k (left zero; None allocates one).
  m.def(
      "adamw_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(j!) steps, Tensor(k!) k, Tensor? schedule, Tensor? stats, "
      "float? max_norm, Tensor? inv_scale, Tensor? found_inf, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool maximize, Tensor(e!)[] masters, Tensor(f!)[] remainders, Tensor(g!)? table=None, "
      "Tensor(h!)? table_host=None, Tensor? lr_tensor=None, Tensor(i!)? applied_lr=None, Tensor? pids=None, "
      "int seed=0, bool stochastic=False, int lr_index=0, Tensor? scale=None, bool skip_nonfinite=False, "
      "bool advance=False, bool advance_k=False, Tensor(l!)? norm_out=None, Tensor(m!)? found_inf_out=None, "
      "Tensor(n!)? workspace=None) -> ()");
  // A launch set (fusedlr/extension/_common.py): the buckets of several param groups in one op call, as the
  // consecutive runs of ``sizes[s]`` tensors of its lists (segment s: one bucket). grad_stats_set: pass 1 of
  // every segment into out, in order (GradScaler's scale; reset: write out instead of adding to it).
  m.def("grad_stats_set(Tensor[] grads, int[] sizes, Tensor(a!) out, Tensor? scale=None, bool reset=False) -> ()");
  // adamw_update_set: the folded adamw_update (advance=True, no inv_scale) of every segment, with segment s's
  // hyperparameters lr[s] .. maximize[s] (maximize: 0/1), tensor LR lr_tensors[s] (None: lr[s]), steps[s]
  // and applied_lr entry groups[s]; pids: one per segment when stochastic, else empty. The step-level outputs
  // (advance_k, norm_out, found_inf_out) are written by the last segment. masters, remainders and
  // max_exp_avg_sqs are empty or hold one tensor per param.
  m.def(
      "adamw_update_set(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor(f!)[] remainders, Tensor(j!)[] steps, "
      "Tensor(k!) k, Tensor(i!) applied_lr, int[] sizes, int[] groups, float[] lr, float[] beta1, float[] beta2, "
      "float[] eps, float[] weight_decay, int[] maximize, Tensor?[] lr_tensors, Tensor[] pids, Tensor? schedule, "
      "Tensor? stats, float? max_norm, Tensor? found_inf, Tensor? scale=None, bool skip_nonfinite=False, "
      "bool advance_k=False, Tensor(l!)? norm_out=None, Tensor(m!)? found_inf_out=None, int seed=0, "
      "bool stochastic=False) -> ()");
  // adamw_update_set.cached: the same, one CUDA launch over every segment, with the caller's cache of its device
  // table (``table``, int64), the table's host mirror (``table_host``, int64 on the CPU; the table is uploaded
  // only when it differs, no sync) and the launch's arrival counter (``workspace``, int32 [1], zero before its
  // first use); each is allocated per call when None.
  m.def(
      "adamw_update_set.cached(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor(f!)[] remainders, "
      "Tensor(j!)[] steps, Tensor(k!) k, Tensor(i!) applied_lr, int[] sizes, int[] groups, float[] lr, "
      "float[] beta1, float[] beta2, float[] eps, float[] weight_decay, int[] maximize, Tensor?[] lr_tensors, "
      "Tensor[] pids, Tensor? schedule, Tensor? stats, float? max_norm, Tensor? found_inf, Tensor? scale=None, "
      "bool skip_nonfinite=False, bool advance_k=False, Tensor(l!)? norm_out=None, Tensor(m!)? found_inf_out=None, "
      "int seed=0, bool stochastic=False, Tensor(g!)? table=None, Tensor(h!)? table_host=None, "
      "Tensor(n!)? workspace=None) -> ()");
  // The LR multiplier sched(k) for each k of ks (float64, shape of ks), as the kernels compute it.
  m.def("schedule_eval(Tensor table, Tensor ks) -> Tensor");
}

namespace {

// ADInplaceOrView kernel of the mutating ops: run the op below this key, then bump the version
// counter of every tensor the schema marks as written, as torch's own in-place ops do (so autograd
// notices a parameter modified by the optimizer after it was saved for backward).
void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  const size_t n = arguments.size();
  std::vector<at::Tensor> written;
  for (size_t i = 0; i < n; ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = (*stack)[stack->size() - n + i];
    if (value.isTensor()) {
      written.push_back(value.toTensor());
    } else if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorList()) written.push_back(t);
    }
  }
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  for (const at::Tensor& t : written) {
    if (t.defined() && !t.is_inference()) torch::autograd::impl::bump_version(t);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedlr, ADInplaceOrView, m) {
  m.impl("grad_stats", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("adamw_update", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("grad_stats_set", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("adamw_update_set", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  m.impl("adamw_update_set.cached", torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
}

namespace {

// scan_grads(params: list[Tensor]) -> (grads: list[Tensor | None], signature: bytes, bad: int)
//
// One pass over the parameters (fusedlr.plan.scan, the Python spec): each one's ``.grad``, and a
// signature of everything a cached plan depends on, per parameter: storage address, element
// count, and dtype/device/grad presence/grad dtype packed in one word. ``bad`` is the index of
// the first gradient the kernels cannot read (sparse, or another shape, device or an unsupported
// dtype), -1 when none: the caller raises the error naming it, before anything is modified.
PyObject* scan_grads(PyObject* /*self*/, PyObject* arg) {
  PyObject* seq = PySequence_Fast(arg, "fusedlr._C.scan_grads: expected a list of tensors");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** items = PySequence_Fast_ITEMS(seq);
  PyObject* grads = PyList_New(n);
  PyObject* sig = PyBytes_FromStringAndSize(nullptr, n * fusedlr::kSigWords * static_cast<Py_ssize_t>(sizeof(int64_t)));
  if (grads == nullptr || sig == nullptr) {
    Py_XDECREF(grads);
    Py_XDECREF(sig);
    Py_DECREF(seq);
    return nullptr;
  }
  auto* words = reinterpret_cast<int64_t*>(PyBytes_AS_STRING(sig));
  int64_t bad = -1;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(items[i])) {
      Py_DECREF(grads);
      Py_DECREF(sig);
      Py_DECREF(seq);
      PyErr_SetString(PyExc_TypeError, "fusedlr._C.scan_grads: every parameter must be a tensor");
      return nullptr;
    }
    const at::Tensor& p = THPVariable_Unpack(items[i]);
    const at::Tensor& g = p.grad();
    if (!fusedlr::param_signature(p, g, words + i * fusedlr::kSigWords) && bad < 0) bad = i;
    if (g.defined()) {
      PyList_SET_ITEM(grads, i, THPVariable_Wrap(g));
    } else {
      Py_INCREF(Py_None);
      PyList_SET_ITEM(grads, i, Py_None);
    }
  }
  Py_DECREF(seq);
  return Py_BuildValue("(NNL)", grads, sig, static_cast<long long>(bad));
}

PyMethodDef fusedlr_methods[] = {
    {"scan_grads", scan_grads, METH_O, "(grads, signature, bad) of a list of parameters (see fusedlr.plan.scan)."},
    {"watch_unchanged", fusedlr::watch_unchanged, METH_VARARGS,
     "Whether param_groups and optimizer.state still hold what a plan was built from (see fusedlr.watch)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

static PyModuleDef fusedlr_module = {
    PyModuleDef_HEAD_INIT, "_C", "fusedlr compiled kernels: registers the torch.ops.fusedlr operators.", -1,
    fusedlr_methods,       nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&fusedlr_module);
  if (mod == nullptr) return nullptr;
#ifdef FUSEDLR_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#ifdef FUSEDLR_WITH_CUDA
  int archs[64];
  const int n_archs = std::min(fusedlr::cuda::compiled_archs(archs, 64), 64);
  PyObject* arch_tuple = PyTuple_New(n_archs);
  if (arch_tuple == nullptr) {
    Py_DECREF(mod);
    return nullptr;
  }
  for (int i = 0; i < n_archs; ++i) PyTuple_SET_ITEM(arch_tuple, i, PyLong_FromLong(archs[i]));
#else
  PyObject* arch_tuple = PyTuple_New(0);
#endif
  if (PyModule_AddObject(mod, "CUDA_ARCHS", arch_tuple) < 0) {  // steals the reference on success
    Py_XDECREF(arch_tuple);
    Py_DECREF(mod);
    return nullptr;
  }
  if (fusedlr::add_step_plan_type(mod) < 0 || PyModule_AddIntConstant(mod, "WITH_CUDA", with_cuda) < 0 ||
      PyModule_AddIntConstant(mod, "CUDA_CHUNK", static_cast<long>(fusedlr::cuda::kChunk)) < 0 ||
      PyModule_AddIntConstant(mod, "CUDA_BLOCKS_PER_SM", static_cast<long>(fusedlr::cuda::kBlocksPerSm)) < 0 ||
      PyModule_AddIntConstant(mod, "STATS_TABLE_PTRS", fusedlr::cuda::kStatsPtrs) < 0 ||
      PyModule_AddIntConstant(mod, "UPDATE_TABLE_PTRS", fusedlr::cuda::kUpdatePtrs) < 0 ||
      PyModule_AddIntConstant(mod, "SET_SEGMENT_WORDS", fusedlr::cuda::kSegmentWords) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
