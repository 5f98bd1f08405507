// Host emulation of the fusedlr CUDA kernels, for tests on machines without a GPU (not part of
// the extension). tests/test_extension.py compiles it with ``nvcc -shared`` and calls it through
// ctypes on CPU tensors: the grid is walked block by block and thread by thread, running the
// kernels' own per-chunk code (multi_tensor.cuh), table builder (table.h) and step math
// (adamw_math.h, schedule.h). Only the CUDA mechanics (launch, shared memory, shuffles, atomics)
// are not covered.
#include <vector>

#include "../multi_tensor.cuh"

using namespace fusedlr;
using namespace fusedlr::cuda;

namespace {

template <typename T>
void stats(const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale, float* out, int grid) {
  const float inv = inv_scale != nullptr ? *inv_scale : 1.0f;
  // Stage 1: each block's partials; stage 2 (the kernel's last block): their sum in block order.
  std::vector<float> block_sum(grid, 0.0f);
  std::vector<unsigned int> block_count(grid, 0u);
  for (int block = 0; block < grid; ++block) {
    std::vector<float> sum(kThreads, 0.0f);
    std::vector<unsigned int> count(kThreads, 0u);
    for (int64_t chunk = block; chunk < total_chunks; chunk += grid) {
      const detail::ChunkRef r = detail::locate<kStatsPtrs>(table, n, chunk);
      for (int tid = 0; tid < kThreads; ++tid) detail::stats_chunk<T>(table, r, inv, tid, kThreads, sum[tid], count[tid]);
    }
    for (int tid = 0; tid < kThreads; ++tid) {
      block_sum[block] += sum[tid];
      block_count[block] += count[tid];
    }
  }
  float s = 0.0f;
  unsigned int c = 0;
  for (int block = 0; block < grid; ++block) {
    s += block_sum[block];
    c += block_count[block];
  }
  out[0] += s;
  if (c > 0) out[1] += static_cast<float>(c);
}

template <typename T, bool AMSGRAD>
void update(const int64_t* table, int64_t n, int64_t total_chunks, const AdamWHyper& hyper, const StepInputs& in,
            int grid) {
  using S = typename detail::Elem<T>::S;
  const StepScalars step = step_scalars(hyper, in);
  if (step.skip) return;
  if (in.applied_lr != nullptr) *in.applied_lr = step.lr;
  for (int block = 0; block < grid; ++block) {
    int64_t current = -1;
    AdamWCoeffs<S> c{};
    for (int64_t chunk = block; chunk < total_chunks; chunk += grid) {
      const detail::ChunkRef r = detail::locate<kUpdatePtrs>(table, n, chunk);
      if (r.tensor != current) {
        c = tensor_coeffs<S>(hyper, step, in.steps[r.tensor]);
        current = r.tensor;
      }
      for (int tid = 0; tid < kThreads; ++tid) detail::update_chunk<T, AMSGRAD>(table, r, c, tid, kThreads);
    }
  }
}

template <typename T>
void update_ams(bool amsgrad, const int64_t* table, int64_t n, int64_t total_chunks, const AdamWHyper& hyper,
                const StepInputs& in, int grid) {
  if (amsgrad) {
    update<T, true>(table, n, total_chunks, hyper, in, grid);
  } else {
    update<T, false>(table, n, total_chunks, hyper, in, grid);
  }
}

}  // namespace

extern "C" {

int64_t fusedlr_emu_chunk() { return kChunk; }

// Same as the CUDA binding: returns the total number of chunks.
int64_t fusedlr_emu_fill_table(const int64_t* ptrs, const int64_t* numels, int64_t n, int nptr, int64_t* out) {
  return fill_table(ptrs, numels, n, nptr, out);
}

int fusedlr_emu_grad_stats(int dtype, const int64_t* table, int64_t n, int64_t total_chunks, const float* inv_scale,
                           float* out, int grid) {
  switch (dtype) {
    case 0: stats<float>(table, n, total_chunks, inv_scale, out, grid); return 0;
    case 1: stats<__half>(table, n, total_chunks, inv_scale, out, grid); return 0;
    case 2: stats<__nv_bfloat16>(table, n, total_chunks, inv_scale, out, grid); return 0;
    case 3: stats<double>(table, n, total_chunks, inv_scale, out, grid); return 0;
    default: return 1;
  }
}

// hyper: lr, beta1, beta2, eps, weight_decay, max_norm (used when has_max_norm). lr_f32/lr_f64: a
// tensor LR replacing hyper6[0] (or null); applied_lr receives lr_t when the update is applied (or null).
int fusedlr_emu_adamw_update(int dtype, int amsgrad, const int64_t* table, int64_t n, int64_t total_chunks,
                             const double* hyper6, int has_max_norm, int maximize, const int64_t* k,
                             const double* schedule, const float* stats, const float* inv_scale,
                             const float* found_inf, const int64_t* steps, int grid, const float* lr_f32,
                             const double* lr_f64, double* applied_lr) {
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
  switch (dtype) {
    case 0: update_ams<float>(amsgrad != 0, table, n, total_chunks, h, in, grid); return 0;
    case 1: update_ams<__half>(amsgrad != 0, table, n, total_chunks, h, in, grid); return 0;
    case 2: update_ams<__nv_bfloat16>(amsgrad != 0, table, n, total_chunks, h, in, grid); return 0;
    case 3: update_ams<double>(amsgrad != 0, table, n, total_chunks, h, in, grid); return 0;
    default: return 1;
  }
}

}  // extern "C"
