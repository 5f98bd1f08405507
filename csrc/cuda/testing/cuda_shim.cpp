// The scheduler behind cuda_shim.h: CUDA threads as fibers (ucontext) on one OS thread, blocks run
// ``resident`` at a time with their own copy of the __shared__ variables, random (seeded) switching.
// Configured and queried from Python through the extern "C" functions at the end.
#include "cuda_shim.h"

#include <ucontext.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace cudashim {

const ThreadView* current = nullptr;

namespace {

constexpr size_t kStack = 256 * 1024;

enum class State { kReady, kBarrier, kWarp, kDone };

struct Warp {
  unsigned arrived = 0, mask = 0, generation = 0;
  uint64_t slots[2][32] = {};
};

struct Block {
  int slot = 0;
  unsigned threads = 0, at_barrier = 0, exited = 0;
  int barrier_count = 0, barrier_result = 0;
  std::vector<Warp> warps;
  std::vector<std::vector<char>> shared;  // this block's copy of each shared region (when not loaded)
};

struct Region {
  char* address;
  size_t bytes;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  ThreadView view;
  Block* block = nullptr;
  unsigned linear = 0;  // thread index within the block
  State state = State::kReady;
  const uint64_t* exchanged = nullptr;
  int barrier_generation_result = 0;
};

struct Config {
  uint64_t seed = 0;
  double yield_prob = 0.25;
  int resident = 2;
  int disabled_barrier = -1;
};

Config config;
std::mt19937_64 rng;
std::string last_error;
cudaError_t pending_error = cudaSuccess;
ucontext_t scheduler;
Fiber* running = nullptr;
Block* loaded = nullptr;            // the block whose shared copy is in the regions' memory
std::vector<Region> regions;        // the __shared__ variables met in this launch
std::vector<Block>* wave = nullptr;  // the resident blocks
const std::function<void()>* kernel_body = nullptr;
std::vector<std::unique_ptr<char[]>> stacks;
int launches = 0;

constexpr char kPoison = static_cast<char>(0xFF);

void load_shared(Block* b) {
  if (b == loaded) return;
  for (size_t i = 0; i < regions.size(); ++i) {
    if (loaded != nullptr) std::memcpy(loaded->shared[i].data(), regions[i].address, regions[i].bytes);
    std::memcpy(regions[i].address, b->shared[i].data(), regions[i].bytes);
  }
  loaded = b;
}

void fail(const std::string& what) {
  if (last_error.empty()) last_error = what;
  pending_error = cudaErrorLaunchFailure;
}

void to_scheduler() {
  Fiber* self = running;
  swapcontext(&self->ctx, &scheduler);
}

void fiber_main() {
  (*kernel_body)();
  running->state = State::kDone;
  running->block->exited += 1;
}

unsigned block_size(const dim3& b) { return b.x * b.y * b.z; }

// Runs ``fibers`` (the threads of the resident blocks) until all finish or none can move; returns false
// on a deadlock. ``ready`` holds the runnable ones but the one running, which the loop puts back when
// it comes back runnable (a yield) and the primitives put back when they release others.
std::vector<Fiber*> ready;

bool run_wave(std::vector<Fiber>& fibers, const std::string& where) {
  ready.clear();
  for (Fiber& f : fibers) ready.push_back(&f);
  size_t live = fibers.size();
  while (live > 0) {
    if (ready.empty()) {
      for (Fiber& f : fibers) {
        if (f.state == State::kBarrier || f.state == State::kWarp) {
          const Block& b = *f.block;
          char msg[512];
          std::snprintf(msg, sizeof msg,
                        "%s: block (%u,%u,%u) cannot proceed: %u of %u threads wait at __syncthreads, %u exited, "
                        "thread %u waits at a %s (a barrier or warp op not reached by every thread it needs)",
                        where.c_str(), f.view.block_idx.x, f.view.block_idx.y, f.view.block_idx.z, b.at_barrier,
                        b.threads, b.exited, f.linear, f.state == State::kBarrier ? "__syncthreads" : "warp op");
          fail(msg);
          return false;
        }
      }
      fail(where + ": no runnable thread");
      return false;
    }
    const size_t pick = std::uniform_int_distribution<size_t>(0, ready.size() - 1)(rng);
    Fiber* f = ready[pick];
    ready[pick] = ready.back();
    ready.pop_back();
    load_shared(f->block);
    running = f;
    current = &f->view;
    swapcontext(&scheduler, &f->ctx);
    running = nullptr;
    current = nullptr;
    if (f->state == State::kReady) ready.push_back(f);
    live -= f->state == State::kDone;
  }
  return true;
}

// Makes the waiting fiber ``g`` runnable (the running one is put back by run_wave).
void release(Fiber* g) {
  g->state = State::kReady;
  if (g != running) ready.push_back(g);
}

Fiber& self() {
  if (running == nullptr) {
    std::fprintf(stderr, "cuda_shim: a device primitive was called outside a kernel\n");
    std::abort();
  }
  return *running;
}

}  // namespace

void shared_region(void* address, size_t bytes) {
  char* a = static_cast<char*>(address);
  for (const Region& r : regions) {
    if (r.address == a) return;
  }
  regions.push_back({a, bytes});
  for (Block& b : *wave) b.shared.emplace_back(bytes, kPoison);
  std::memset(a, kPoison, bytes);  // the loaded block's copy
}

void yield_point() {
  if (running != nullptr && std::bernoulli_distribution(config.yield_prob)(rng)) to_scheduler();
}

int block_barrier_count(int predicate) {
  Fiber& f = self();
  Block& b = *f.block;
  b.barrier_count += predicate != 0;
  f.state = State::kBarrier;
  if (++b.at_barrier == b.threads) {
    b.barrier_result = b.barrier_count;
    b.barrier_count = 0;
    b.at_barrier = 0;
    for (Fiber* g = &f - f.linear; g != &f - f.linear + b.threads; ++g) {
      g->barrier_generation_result = b.barrier_result;
      release(g);
    }
  }
  to_scheduler();
  return f.barrier_generation_result;
}

void block_barrier() { block_barrier_count(0); }

void barrier_at(int site) {
  if (site == config.disabled_barrier) {
    yield_point();
  } else {
    block_barrier_count(0);
  }
}

unsigned lane_id() { return self().linear % 32; }

const uint64_t* warp_exchange(unsigned mask, uint64_t bits) {
  Fiber& f = self();
  Block& b = *f.block;
  const unsigned lane = f.linear % 32;
  Warp& w = b.warps[f.linear / 32];
  if (((mask >> lane) & 1u) == 0) {
    fail("warp op called by lane " + std::to_string(lane) + " which is not in its mask");
    mask |= 1u << lane;
  }
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    fail("lanes of one warp called a warp op with different masks");
  }
  const unsigned buffer = w.generation & 1u;
  w.slots[buffer][lane] = bits;
  w.arrived |= 1u << lane;
  f.state = State::kWarp;
  f.exchanged = w.slots[buffer];
  if (w.arrived == w.mask) {
    for (unsigned l = 0; l < 32; ++l) {
      if ((w.mask >> l) & 1u) release(&f - lane + l);
    }
    w.arrived = 0;
    w.generation += 1;
  }
  to_scheduler();
  return f.exchanged;
}

unsigned warp_sync(unsigned mask) {
  warp_exchange(mask, 0);
  return mask;
}

unsigned active_lanes() {
  Fiber& f = self();
  const unsigned lane = f.linear % 32;
  const unsigned warp_threads = std::min(32u, f.block->threads - (f.linear - lane));
  unsigned out = 0;
  for (unsigned l = 0; l < warp_threads; ++l) out |= (&f - lane + l)->state != State::kDone ? (1u << l) : 0u;
  return out;
}

cudaError_t run_grid(dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  const std::string where = "launch " + std::to_string(launches++);
  const unsigned threads = block_size(block), blocks = block_size(grid);
  if (threads == 0 || threads > 1024 || blocks == 0 || dynamic_smem > 0) {
    fail(where + ": invalid configuration (grid " + std::to_string(blocks) + ", block " + std::to_string(threads) +
         ", dynamic shared memory " + std::to_string(dynamic_smem) + ")");
    return pending_error;
  }
  if (running != nullptr) {
    fail(where + ": launched from inside a kernel");
    return pending_error;
  }
  const size_t per_wave = static_cast<size_t>(std::max(1, config.resident)) * threads;
  while (stacks.size() < per_wave) stacks.emplace_back(new char[kStack]);

  std::vector<unsigned> order(blocks);
  for (unsigned i = 0; i < blocks; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);  // the hardware picks the block order

  kernel_body = &body;
  regions.clear();
  for (size_t first = 0; first < blocks; first += config.resident) {
    const size_t count = std::min<size_t>(config.resident, blocks - first);
    std::vector<Block> blocks_now(count);
    std::vector<Fiber> fibers(count * threads);
    for (size_t i = 0; i < count; ++i) {
      Block& b = blocks_now[i];
      b.slot = static_cast<int>(i);
      b.threads = threads;
      b.warps.resize((threads + 31) / 32);
      for (const Region& r : regions) b.shared.emplace_back(r.bytes, kPoison);
      const unsigned id = order[first + i];
      const uint3 bidx = make_uint3(id % grid.x, (id / grid.x) % grid.y, id / (grid.x * grid.y));
      for (unsigned t = 0; t < threads; ++t) {
        Fiber& f = fibers[i * threads + t];
        f.block = &b;
        f.linear = t;
        f.view.thread_idx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
        f.view.block_idx = bidx;
        f.view.block_dim = block;
        f.view.grid_dim = grid;
        f.stack = stacks[i * threads + t].get();
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = &scheduler;
        makecontext(&f.ctx, fiber_main, 0);
      }
    }
    loaded = nullptr;
    wave = &blocks_now;
    const bool ok = run_wave(fibers, where);
    wave = nullptr;
    loaded = nullptr;
    if (!ok) break;  // the stuck fibers are abandoned with their stacks
  }
  kernel_body = nullptr;
  return pending_error;
}

}  // namespace cudashim

extern "C" {

// The scheduler's seed, the chance of a switch at each primitive and the blocks run at once.
void cudashim_configure(uint64_t seed, double yield_prob, int resident_blocks) {
  cudashim::config.seed = seed;
  cudashim::config.yield_prob = yield_prob;
  cudashim::config.resident = resident_blocks < 1 ? 1 : resident_blocks;
  cudashim::rng.seed(seed);
}

// Makes __syncthreads() number ``site`` a no-op (-1: none), to prove that a test needs it.
void cudashim_disable_barrier(int site) { cudashim::config.disabled_barrier = site; }

// The first failure since the last call ("" if none), cleared by the call.
const char* cudashim_take_error() {
  static std::string out;
  out = cudashim::last_error;
  cudashim::last_error.clear();
  cudashim::pending_error = cudaSuccess;
  return out.c_str();
}

// The CUDA runtime calls a launcher may make, on host memory.
cudaError_t cudaGetLastError() {
  const cudaError_t e = cudashim::pending_error;
  cudashim::pending_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cudashim::pending_error; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "cuda_shim launch failure"; }
cudaError_t cudaMemsetAsync(void* p, int value, size_t n, cudaStream_t) {
  std::memset(p, value, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, n);
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
// An H100 SXM's: 132 SMs, 2048 threads and 228 KiB of shared memory per SM.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *value = 2048; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

// Resident blocks per SM by the thread limit alone (the host knows no kernel's registers): 2048 / threads.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel, int threads, size_t smem) {
  if (kernel == nullptr || threads <= 0 || threads > 1024 || smem > 0) return cudaErrorInvalidValue;
  *blocks = std::min(32, 2048 / threads);
  return cudaSuccess;
}

}  // extern "C"
