// The launch glue of the fusedlr CUDA kernels run on the host by cuda_shim.h: extern "C" entry
// points (called through ctypes by tests/cuda_on_host.py) over the kernels' own host launchers
// (csrc/cuda/launch.h), so the launch configuration, the grid and every __global__ kernel run as
// written. This is the only file that knows the launchers' signatures.
#include <cstring>
#include <optional>
#include <vector>

#include "../launch.h"
#include "../launchers.h"

using namespace fusedlr;
using namespace fusedlr::cuda;

extern "C" {

int64_t fusedlr_emu_chunk() { return kChunk; }
int64_t fusedlr_emu_segment_words() { return kSegmentWords; }

// Same as the CUDA binding: returns the total number of chunks.
int64_t fusedlr_emu_fill_table(const int64_t* ptrs, const int64_t* numels, int64_t n, int nptr, int64_t* out) {
  return fill_table(ptrs, numels, n, nptr, out);
}

// The set region of nseg segments (table.h): per segment, hyper5 (lr, beta1, beta2, eps, weight_decay),
// maximize and ptrs5 (steps, lr_f32, lr_f64, applied_lr, pids; 0 where absent); sizes: its tensors.
void fusedlr_emu_fill_set_region(const double* hyper5, const int64_t* maximize, const int64_t* ptrs5,
                                 const int64_t* sizes, int64_t nseg, int64_t* out) {
  std::vector<SetSegment> segs(nseg);
  for (int64_t s = 0; s < nseg; ++s) {
    const double* h = hyper5 + 5 * s;
    const int64_t* p = ptrs5 + 5 * s;
    segs[s] = SetSegment{0, reinterpret_cast<int64_t*>(p[0]), reinterpret_cast<const float*>(p[1]),
                         reinterpret_cast<const double*>(p[2]), reinterpret_cast<double*>(p[3]),
                         reinterpret_cast<const int64_t*>(p[4]), h[0], h[1], h[2], h[3], h[4], maximize[s]};
  }
  fill_set_region(segs.data(), sizes, nseg, out);
}

// workspace: float32 [2 * grid + 1], zero before the first launch (see launch_grad_stats).
int fusedlr_emu_grad_stats(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
                           const float* scale, int reset, float* out, float* workspace, int grid) {
  return launch_grad_stats(dtype, table, n, total_chunks, inv_scale, scale, reset != 0, out, workspace, grid, nullptr);
}

// The grid the CUDA binding launches pass 1 / pass 2 with (on the shim's device; -1 on an error).
int fusedlr_emu_grad_stats_grid(int dtype, int64_t total_chunks) {
  int grid = 0;
  return grad_stats_grid(dtype, total_chunks, 0, &grid) == cudaSuccess ? grid : -1;
}
// set: the grid of a launch set's instance (launch_adamw_update_set with nseg > 0).
int fusedlr_emu_adamw_update_grid(int dtype, int amsgrad, int low_precision, int state_dtype, int64_t total_chunks,
                                  int set) {
  int grid = 0;
  return adamw_update_grid(dtype, amsgrad != 0, low_precision != 0, state_dtype, total_chunks, 0, &grid, set != 0) ==
                 cudaSuccess
             ? grid
             : -1;
}

// hyper6: lr, beta1, beta2, eps, weight_decay, max_norm (used when has_max_norm). lr_f32/lr_f64: a
// tensor LR replacing hyper6[0] (or null); applied_lr receives lr_t when the update is applied (or null).
// low_precision: 0 for the default update, else the modes master (MasterKind), stochastic, seed and
// pids, with moments of state_dtype. scale, skip_nonfinite and the outputs: the folded step (StepOutputs;
// advance: steps are advanced, advance_k: k; arrival: an unsigned int, zero between launches). nseg > 0: a
// launch set (launch_adamw_update_set; the table holds the set region, steps/lr/applied_lr/pids unused).
int fusedlr_emu_adamw_update(int dtype, int amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                             const double* hyper6, int has_max_norm, int maximize, int64_t* k,
                             const double* schedule, const float* stats, const float* inv_scale,
                             const float* found_inf, int64_t* steps, int grid, const float* lr_f32,
                             const double* lr_f64, double* applied_lr, int low_precision, int state_dtype,
                             int master, int stochastic, uint32_t seed, const int64_t* pids, const float* scale,
                             int skip_nonfinite, int advance, int advance_k, float* norm_out, float* found_inf_out,
                             unsigned int* arrival, int64_t nseg) {
  const AdamWHyper h = make_hyper(hyper6[0], hyper6[1], hyper6[2], hyper6[3], hyper6[4],
                                  has_max_norm != 0 ? std::optional<double>(hyper6[5]) : std::nullopt,
                                  maximize != 0);
  StepInputs in{};
  in.k = k;
  in.schedule = schedule;
  in.stats = stats;
  in.inv_scale = inv_scale;
  in.found_inf = found_inf;
  in.steps = steps;
  in.lr_f32 = lr_f32;
  in.lr_f64 = lr_f64;
  in.applied_lr = applied_lr;
  in.grad_scale = scale;
  in.skip_nonfinite = skip_nonfinite != 0;
  StepOutputs outs{};
  outs.steps = advance != 0 ? steps : nullptr;
  outs.k = advance_k != 0 ? k : nullptr;
  outs.norm = norm_out;
  outs.found_inf = found_inf_out;
  outs.arrival = arrival;
  const LowPrecision lp{master, stochastic != 0, seed, pids};
  return launch_adamw_update_set(dtype, amsgrad != 0, table, n, total_chunks, nseg, h, in,
                                 low_precision != 0 ? &lp : nullptr, state_dtype, outs, grid, nullptr);
}

}  // extern "C"

// The Launchers table of the fast path (csrc/cuda/launchers.h) on the host: launch.h's launchers with the grid of
// EmulatedCudaBackend (min(total chunks, its grid), at least 1), no stream, a memcpy for an upload.
namespace {

int emu_grid = 1;
int64_t emu_launches = 0;  // kernel launches through emu_launchers (fusedlr_emu_launch_count)

int emu_grad_stats(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
                   const float* scale, bool reset, float* out, float* workspace, int grid, void* /*stream*/) {
  ++emu_launches;
  return launch_grad_stats(dtype, table, n, total_chunks, inv_scale, scale, reset, out, workspace, grid, nullptr);
}

int emu_adamw_update(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                     const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp, int state_dtype,
                     const StepOutputs& outs, int grid, void* /*stream*/) {
  ++emu_launches;
  return launch_adamw_update(dtype, amsgrad, table, n, total_chunks, hyper, in, lp, state_dtype, outs, grid, nullptr);
}

int emu_adamw_update_set(int dtype, bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks, int64_t nseg,
                         const AdamWHyper& hyper, const StepInputs& in, const LowPrecision* lp, int state_dtype,
                         const StepOutputs& outs, int grid, void* /*stream*/) {
  ++emu_launches;
  return launch_adamw_update_set(dtype, amsgrad, table, n, total_chunks, nseg, hyper, in, lp, state_dtype, outs, grid,
                                 nullptr);
}

int capped_grid(int64_t total_chunks, int* grid) {
  *grid = static_cast<int>(total_chunks < emu_grid ? (total_chunks < 1 ? 1 : total_chunks) : emu_grid);
  return 0;
}

int emu_grad_stats_grid(int /*dtype*/, int64_t total_chunks, int /*device*/, int* grid) {
  return capped_grid(total_chunks, grid);
}

int emu_adamw_update_grid(int /*dtype*/, bool /*amsgrad*/, bool /*low_precision*/, int /*state_dtype*/,
                          int64_t total_chunks, int /*device*/, bool /*set*/, int* grid) {
  return capped_grid(total_chunks, grid);
}

void* emu_current_stream(int /*device*/) { return nullptr; }

int emu_upload(void* dst, const void* host, int64_t bytes, int /*device*/, void* /*stream*/) {
  std::memcpy(dst, host, static_cast<size_t>(bytes));
  return 0;
}

const char* emu_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

const Launchers emu_launchers{emu_grad_stats,        emu_adamw_update,   emu_adamw_update_set,
                              emu_grad_stats_grid,   emu_adamw_update_grid, emu_current_stream,
                              emu_upload,            emu_error_string};

}  // namespace

// The address of the host Launchers table, whose launches take grids of at most ``grid`` blocks.
extern "C" const Launchers* fusedlr_emu_launchers(int grid) {
  emu_grid = grid < 1 ? 1 : grid;
  return &emu_launchers;
}

// The kernel launches made through the host Launchers table since the library was loaded.
extern "C" int64_t fusedlr_emu_launch_count() { return emu_launches; }
