// CUDA implementations of the fusedlr ops: argument checks, the device-resident pointer table
// of the multi-tensor launch, and the launches (csrc/cuda/*.cu). Compiled only in CUDA builds.
//
// The table (pointers, numels, chunk prefix) is rebuilt on the host each call, compared with
// the host mirror the caller keeps (``table_host``) and uploaded to ``table`` with an async
// copy from pinned memory on the current stream only when it changed: no host-device sync, and
// a CUDA graph captured after the first step replays without touching the table.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "../op_common.h"
#include "launch.h"

namespace fusedlr {
namespace cuda {
namespace {

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fusedlr: CUDA error in ", what, ": ", cudaGetErrorString(err));
}

cudaStream_t current_stream(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }

// The table as the kernels read it; ``tensors[j][i]`` is pointer j of tensor i (an empty list gives 0).
std::vector<int64_t> build_table(const std::vector<std::vector<const at::Tensor*>>& tensors, int nptr, int64_t n,
                                 int64_t* total_chunks) {
  std::vector<int64_t> ptrs(n * nptr, 0), numels(n);
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < nptr; ++j) {
      if (!tensors[j].empty()) {
        ptrs[i * nptr + j] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(tensors[j][i]->data_ptr()));
      }
    }
    numels[i] = tensors[0][i]->numel();
  }
  std::vector<int64_t> h(table_size(n, nptr));
  *total_chunks = fill_table(ptrs.data(), numels.data(), n, nptr, h.data());
  return h;
}

// Makes the device table hold ``h``; returns its device pointer. ``keep`` holds a fresh table
// when the caller passed no cache.
const int64_t* upload_table(const std::vector<int64_t>& h, const std::optional<at::Tensor>& table,
                            const std::optional<at::Tensor>& table_host, const at::Device& device, at::Tensor& keep) {
  const int64_t size = static_cast<int64_t>(h.size());
  const size_t bytes = h.size() * sizeof(int64_t);
  auto pinned_copy = [&]() {
    // A graph would replay the copy from a pinned buffer that is recycled after capture: refuse.
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    check_launch(cudaStreamIsCapturing(current_stream(device), &status), "cudaStreamIsCapturing");
    TORCH_CHECK(status == cudaStreamCaptureStatusNone,
                "fusedlr: the tensors of this bucket (or their addresses) changed while a CUDA graph was being "
                "captured; run one eager step with the same parameters and gradients before capturing");
    at::Tensor pinned = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    std::memcpy(pinned.data_ptr(), h.data(), bytes);
    return pinned;
  };
  if (table.has_value() != table_host.has_value()) {
    TORCH_CHECK(false, "fusedlr: pass both table and table_host, or neither");
  }
  if (!table.has_value()) {
    keep = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
    keep.copy_(pinned_copy(), /*non_blocking=*/true);
    return keep.data_ptr<int64_t>();
  }
  TORCH_CHECK(table->scalar_type() == at::kLong && table->is_contiguous() && table->numel() == size &&
                  table->device() == device,
              "fusedlr: table must be a contiguous int64 tensor of ", size, " elements on ", device);
  TORCH_CHECK(table_host->scalar_type() == at::kLong && table_host->is_contiguous() && table_host->numel() == size &&
                  table_host->device().is_cpu(),
              "fusedlr: table_host must be a contiguous int64 CPU tensor of ", size, " elements");
  if (std::memcmp(table_host->data_ptr(), h.data(), bytes) != 0) {
    table->copy_(pinned_copy(), /*non_blocking=*/true);  // cudaMemcpyAsync on the current stream
    std::memcpy(table_host->data_ptr(), h.data(), bytes);
  }
  return table->data_ptr<int64_t>();
}

// The arrival counter of an update launch that advances counters: ``workspace`` checked, else a fresh zero in
// ``keep``.
unsigned int* arrival_counter(const std::optional<at::Tensor>& workspace, const at::Device& device, at::Tensor& keep) {
  if (workspace.has_value()) {
    keep = *workspace;
    TORCH_CHECK(keep.scalar_type() == at::kInt && keep.is_contiguous() && keep.numel() >= 1 && keep.device() == device,
                "fusedlr.adamw_update: workspace must be a contiguous int32 tensor of at least 1 element on ", device,
                " (zero before its first use)");
  } else {
    keep = at::zeros({1}, at::TensorOptions().dtype(at::kInt).device(device));
  }
  return reinterpret_cast<unsigned int*>(keep.data_ptr<int32_t>());
}

// The update table's tensors (build_table's lists, kUpdatePtrs of them) of ``params`` and their states; the
// grads as checked (``chk.grads``).
std::vector<std::vector<const at::Tensor*>> update_lists(at::TensorList params, const CheckedUpdate& chk,
                                                         at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                                         at::TensorList max_exp_avg_sqs, at::TensorList masters,
                                                         at::TensorList remainders) {
  std::vector<std::vector<const at::Tensor*>> lists(kUpdatePtrs);
  for (size_t i = 0; i < params.size(); ++i) {
    lists[0].push_back(&params[i]);
    lists[1].push_back(&chk.grads[i]);
    lists[2].push_back(&exp_avgs[i]);
    lists[3].push_back(&exp_avg_sqs[i]);
    if (chk.amsgrad) lists[4].push_back(&max_exp_avg_sqs[i]);
    if (!masters.empty()) lists[5].push_back(&masters[i]);
    if (!remainders.empty()) lists[6].push_back(&remainders[i]);
  }
  return lists;
}

void grad_stats_cuda(at::TensorList grads, const std::optional<at::Tensor>& inv_scale, const at::Tensor& out,
                     const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& table_host,
                     const std::optional<at::Tensor>& workspace, const std::optional<at::Tensor>& scale,
                     bool reset) {
  TORCH_CHECK(out.is_cuda(), "fusedlr.grad_stats (CUDA): out must be a CUDA tensor");
  const int code = check_grad_stats(grads, inv_scale, out);
  check_scale(scale, inv_scale, out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = static_cast<int64_t>(grads.size());
  std::vector<at::Tensor> gs;
  gs.reserve(n);
  std::vector<const at::Tensor*> ptrs;
  for (const auto& g : grads) gs.push_back(kernel_grad(g, nullptr));
  for (const auto& g : gs) ptrs.push_back(&g);
  int64_t total_chunks = 0;
  const std::vector<int64_t> h = build_table({ptrs}, kStatsPtrs, n, &total_chunks);
  if (total_chunks == 0) {
    check_launch(launch_grad_stats(code, nullptr, n, 0, nullptr, nullptr, reset, out.data_ptr<float>(), nullptr, 0,
                                   current_stream(out.device())),
                 "grad_stats");
    return;
  }
  at::Tensor keep;
  const int64_t* dtable = upload_table(h, table, table_host, out.device(), keep);
  int grid = 0;
  check_launch(grad_stats_grid(code, total_chunks, out.device().index(), &grid), "(sizing the grid of grad_stats)");
  at::Tensor ws;
  if (workspace.has_value()) {
    ws = *workspace;
    TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.is_contiguous() && ws.device() == out.device() &&
                    ws.numel() >= 2 * static_cast<int64_t>(grid) + 1,
                "fusedlr.grad_stats: workspace must be a contiguous float32 tensor of at least ", 2 * grid + 1,
                " elements on ", out.device(), " (zeros before its first use)");
  } else {
    ws = at::zeros({2 * static_cast<int64_t>(grid) + 1}, out.options());
  }
  check_launch(launch_grad_stats(code, dtable, n, total_chunks, opt_ptr<float>(inv_scale), opt_ptr<float>(scale), reset,
                                 out.data_ptr<float>(), ws.data_ptr<float>(), grid, current_stream(out.device())),
               "grad_stats");
}

void adamw_update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const at::Tensor& steps,
                       const at::Tensor& k, const std::optional<at::Tensor>& schedule,
                       const std::optional<at::Tensor>& stats, std::optional<double> max_norm,
                       const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf,
                       double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,
                       at::TensorList masters, at::TensorList remainders, const std::optional<at::Tensor>& table,
                       const std::optional<at::Tensor>& table_host, const std::optional<at::Tensor>& lr_tensor,
                       const std::optional<at::Tensor>& applied_lr, const std::optional<at::Tensor>& pids,
                       int64_t seed, bool stochastic, int64_t lr_index, const std::optional<at::Tensor>& scale,
                       bool skip_nonfinite, bool advance, bool advance_k, const std::optional<at::Tensor>& norm_out,
                       const std::optional<at::Tensor>& found_inf_out, const std::optional<at::Tensor>& workspace) {
  TORCH_CHECK(steps.is_cuda(), "fusedlr.adamw_update (CUDA): steps must be a CUDA tensor");
  CheckedUpdate chk = check_adamw_update(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, k, schedule,
                                         stats, max_norm, inv_scale, found_inf,
                                         PrecisionArgs{masters, remainders, pids, stochastic});
  check_scale(scale, inv_scale, steps.device());
  StepOutputs outs = step_outputs(advance, advance_k, steps, k, stats, norm_out, found_inf_out, skip_nonfinite);
  at::Tensor arrival;
  if (advance || advance_k) outs.arrival = arrival_counter(workspace, steps.device(), arrival);
  const c10::cuda::CUDAGuard guard(steps.device());
  const int64_t n = static_cast<int64_t>(params.size());
  int64_t total_chunks = 0;
  const std::vector<int64_t> h =
      build_table(update_lists(params, chk, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, remainders), kUpdatePtrs,
                  n, &total_chunks);
  const bool writes_outputs = advance || advance_k || norm_out.has_value() || found_inf_out.has_value() ||
                              applied_lr.has_value();
  if (total_chunks == 0 && !writes_outputs) return;
  at::Tensor keep;
  const int64_t* dtable = upload_table(h, table, table_host, steps.device(), keep);

  const AdamWHyper hyper = make_hyper(lr, beta1, beta2, eps, weight_decay, max_norm, maximize);
  StepInputs in{};
  in.k = k.data_ptr<int64_t>();
  in.schedule = opt_ptr<double>(schedule);
  in.stats = opt_ptr<float>(stats);
  in.inv_scale = opt_ptr<float>(inv_scale);
  in.found_inf = opt_ptr<float>(found_inf);
  in.steps = steps.data_ptr<int64_t>();
  in.grad_scale = opt_ptr<float>(scale);
  in.skip_nonfinite = skip_nonfinite;
  set_lr_inputs(lr_tensor, applied_lr, lr_index, steps.device(), in);
  const LowPrecision lp{chk.master, stochastic, static_cast<uint32_t>(seed), opt_ptr<int64_t>(pids)};
  int grid = 0;
  check_launch(adamw_update_grid(chk.dtype, chk.amsgrad, chk.low_precision, chk.state_dtype, total_chunks,
                                 steps.device().index(), &grid),
               "(sizing the grid of adamw_update)");
  check_launch(launch_adamw_update(chk.dtype, chk.amsgrad, dtable, n, total_chunks, hyper, in,
                                   chk.low_precision ? &lp : nullptr, chk.state_dtype, outs, grid,
                                   current_stream(steps.device())),
               "adamw_update");
}

// adamw_update_set.cached (csrc/bindings.cpp): one launch (launch_adamw_update_set) over every segment; each
// segment is checked as an adamw_update of its bucket, and all must share the kernel instance.
void adamw_update_set_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
                           int64_t seed, bool stochastic, const std::optional<at::Tensor>& table,
                           const std::optional<at::Tensor>& table_host, const std::optional<at::Tensor>& workspace) {
  TORCH_CHECK(k.is_cuda(), "fusedlr.adamw_update_set (CUDA): k must be a CUDA tensor");
  const at::Device device = k.device();
  const size_t n = params.size(), m = sizes.size();
  check_update_set(sizes, n, groups, lr, beta1, beta2, eps, weight_decay, maximize, lr_tensors.size(), steps, pids);
  int64_t start = 0;
  std::vector<at::Tensor> kgrads;
  std::optional<CheckedUpdate> first;
  std::vector<SetSegment> segs(m);
  for (size_t s = 0; s < m; ++s) {
    const int64_t len = sizes[s];
    const std::optional<at::Tensor> seg_pids = pids.empty() ? std::nullopt : std::optional<at::Tensor>(pids[s]);
    CheckedUpdate chk = check_adamw_update(
        segment(params, start, len), segment(grads, start, len), segment(exp_avgs, start, len),
        segment(exp_avg_sqs, start, len), segment(max_exp_avg_sqs, start, len), steps[s], k, schedule, stats,
        max_norm, std::nullopt, found_inf,
        PrecisionArgs{segment(masters, start, len), segment(remainders, start, len), seg_pids, stochastic});
    TORCH_CHECK(!first.has_value() || (chk.dtype == first->dtype && chk.state_dtype == first->state_dtype &&
                                       chk.amsgrad == first->amsgrad && chk.master == first->master &&
                                       chk.low_precision == first->low_precision),
                "fusedlr.adamw_update_set: every segment must share the dtypes, amsgrad and precision mode");
    StepInputs in{};
    set_lr_inputs(lr_tensors.get(s), applied_lr, groups[s], device, in);
    segs[s] = SetSegment{0, steps[s].data_ptr<int64_t>(), in.lr_f32, in.lr_f64, in.applied_lr,
                         opt_ptr<int64_t>(seg_pids), lr[s], beta1[s], beta2[s], eps[s], weight_decay[s],
                         maximize[s] != 0 ? 1 : 0};
    for (auto& g : chk.grads) kgrads.push_back(std::move(g));
    if (!first.has_value()) first = std::move(chk);
    start += len;
  }
  first->grads = std::move(kgrads);
  const CheckedUpdate& chk = *first;
  check_scale(scale, std::nullopt, device);
  StepOutputs outs = step_outputs(false, advance_k, steps[0], k, stats, norm_out, found_inf_out, skip_nonfinite);
  at::Tensor arrival;
  outs.arrival = arrival_counter(workspace, device, arrival);
  const c10::cuda::CUDAGuard guard(device);
  int64_t total_chunks = 0;
  std::vector<int64_t> h = build_table(
      update_lists(params, chk, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, remainders), kUpdatePtrs,
      static_cast<int64_t>(n), &total_chunks);
  const size_t base = h.size();
  h.resize(base + set_region_size(static_cast<int64_t>(n), static_cast<int64_t>(m)));
  fill_set_region(segs.data(), sizes.data(), static_cast<int64_t>(m), h.data() + base);
  at::Tensor keep;
  const int64_t* dtable = upload_table(h, table, table_host, device, keep);

  const AdamWHyper hyper = make_hyper(lr[0], beta1[0], beta2[0], eps[0], weight_decay[0], max_norm, maximize[0] != 0);
  StepInputs in{};
  in.k = k.data_ptr<int64_t>();
  in.schedule = opt_ptr<double>(schedule);
  in.stats = opt_ptr<float>(stats);
  in.found_inf = opt_ptr<float>(found_inf);
  in.grad_scale = opt_ptr<float>(scale);
  in.skip_nonfinite = skip_nonfinite;
  const LowPrecision lp{chk.master, stochastic, static_cast<uint32_t>(seed), nullptr};
  int grid = 0;
  check_launch(adamw_update_grid(chk.dtype, chk.amsgrad, chk.low_precision, chk.state_dtype, total_chunks,
                                 device.index(), &grid, /*set=*/true),
               "(sizing the grid of adamw_update_set)");
  check_launch(launch_adamw_update_set(chk.dtype, chk.amsgrad, dtable, static_cast<int64_t>(n), total_chunks,
                                       static_cast<int64_t>(m), hyper, in, chk.low_precision ? &lp : nullptr,
                                       chk.state_dtype, outs, grid, current_stream(device)),
               "adamw_update_set");
}

at::Tensor schedule_eval_cuda(const at::Tensor& table, const at::Tensor& ks) {
  check_schedule_eval(table, ks);
  TORCH_CHECK(table.is_cuda() && ks.device() == table.device(), "fusedlr.schedule_eval: table and ks on one device");
  const c10::cuda::CUDAGuard guard(table.device());
  const at::Tensor t = table.contiguous();
  const at::Tensor kc = ks.contiguous();
  at::Tensor out = at::empty(ks.sizes(), ks.options().dtype(at::kDouble));
  check_launch(launch_schedule_eval(t.data_ptr<double>(), kc.data_ptr<int64_t>(), out.data_ptr<double>(), kc.numel(),
                                    current_stream(table.device())),
               "schedule_eval");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedlr

TORCH_LIBRARY_IMPL(fusedlr, CUDA, m) {
  m.impl("grad_stats", &fusedlr::cuda::grad_stats_cuda);
  m.impl("adamw_update", &fusedlr::cuda::adamw_update_cuda);
  m.impl("adamw_update_set.cached", &fusedlr::cuda::adamw_update_set_cuda);
  m.impl("schedule_eval", &fusedlr::cuda::schedule_eval_cuda);
}
