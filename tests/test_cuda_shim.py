"""The CUDA shim (csrc/cuda/testing/cuda_shim.h) catches what it is for: small kernels whose results
depend on barriers, warp ops and shared memory run right with them and go wrong, or stop with an
error, without them; and each __syncthreads() of the fusedlr kernels is needed by the tests that
compare those kernels with the reference (removing any one of them makes a comparison fail).
"""

from __future__ import annotations

import ctypes

import pytest
import torch

import fusedlr
from fusedlr import reference
from fusedlr.bucket import Bucket
from fusedlr.control import FoldedUpdate, GroupHyper, StepControl

from cuda_on_host import EmulatedCudaBackend, ShimLibrary, cuda_include, fusedlr_kernels, kernel_barrier_sites

pytestmark = pytest.mark.skipif(cuda_include() is None, reason="no CUDA headers (nvcc on PATH)")

SAMPLE = r"""
#ifndef BARRIER
#define BARRIER __syncthreads()
#endif
#ifndef WARP_SYNC
#define WARP_SYNC __syncwarp()
#endif

// Sum of x: a grid-stride loop, a shared-memory tree down to one warp, shuffles, one atomic per block.
__global__ void block_sum(const int* x, int n, unsigned long long* out) {
  __shared__ int partial[256];
  const int tid = threadIdx.x;
  int acc = 0;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += gridDim.x * blockDim.x) acc += x[i];
  partial[tid] = acc;
  BARRIER;
  for (int s = blockDim.x / 2; s >= 32; s >>= 1) {
    if (tid < s) partial[tid] += partial[tid + s];
    BARRIER;
  }
  if (tid < 32) {
    int v = partial[tid];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (tid == 0) atomicAdd(out, static_cast<unsigned long long>(static_cast<long long>(v)));
  }
}

// Each lane reads the value its mirror lane wrote to shared memory.
__global__ void mirror(const int* x, int* y) {
  __shared__ int s[64];
  const int t = threadIdx.x, lane = t % 32;
  s[t] = x[t];
  WARP_SYNC;
  y[t] = s[t - lane + 31 - lane];
}

// Warp ops against their definitions: xor butterfly, up shift, ballot.
__global__ void warp_ops(const int* x, int* y) {
  const int t = threadIdx.x;
  int v = x[t];
  for (int m = 1; m < 32; m <<= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  y[3 * t] = v;
  y[3 * t + 1] = __shfl_up_sync(0xffffffffu, x[t], 3);
  y[3 * t + 2] = static_cast<int>(__ballot_sync(0xffffffffu, x[t] % 2 != 0));
}

// Only some threads reach the barrier: the shim must report it, not hang.
__global__ void divergent_barrier(int* y) {
  if (threadIdx.x < 16) __syncthreads();
  y[threadIdx.x] = 1;
}

extern "C" {
int run_block_sum(const int* x, int n, unsigned long long* out, int grid) {
  block_sum<<<grid, 256>>>(x, n, out);
  return cudaGetLastError();
}
int run_mirror(const int* x, int* y) {
  mirror<<<1, 64>>>(x, y);
  return cudaGetLastError();
}
int run_warp_ops(const int* x, int* y) {
  warp_ops<<<1, 64>>>(x, y);
  return cudaGetLastError();
}
int run_divergent_barrier(int* y) {
  divergent_barrier<<<2, 64, 0, nullptr>>>(y);
  return cudaGetLastError();
}
}
"""

SEEDS = range(8)


def _sample(**defines: str) -> ShimLibrary:
    return ShimLibrary([("sample.cu", SAMPLE)], "sample", defines)


def _block_sums(shim: ShimLibrary, x: torch.Tensor, grid: int) -> list[int]:
    out = []
    for seed in SEEDS:
        shim.configure(seed, resident_blocks=3)
        acc = torch.zeros(1, dtype=torch.int64)
        rc = shim.lib.run_block_sum(ctypes.c_void_p(x.data_ptr()), x.numel(), ctypes.c_void_p(acc.data_ptr()), grid)
        shim.check(rc)
        out.append(int(acc))
    return out


def test_block_reduction_is_exact_with_barriers_and_wrong_without() -> None:
    x = torch.randint(-1000, 1000, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    want = int(x.sum())
    assert _block_sums(_sample(), x, grid=4) == [want] * len(SEEDS)
    broken = _block_sums(_sample(BARRIER="(void)0"), x, grid=4)
    assert any(got != want for got in broken), "a reduction without barriers went unnoticed"


def test_missing_syncwarp_is_caught() -> None:
    x = torch.arange(64, dtype=torch.int32)
    want = torch.cat([torch.arange(31, -1, -1), torch.arange(63, 31, -1)]).int()

    def run(shim: ShimLibrary) -> list[bool]:
        ok = []
        for seed in SEEDS:
            shim.configure(seed, yield_prob=0.5)
            y = torch.zeros(64, dtype=torch.int32)
            shim.check(shim.lib.run_mirror(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr())))
            ok.append(torch.equal(y, want))
        return ok

    assert all(run(_sample()))
    assert not all(run(_sample(WARP_SYNC="(void)0")))


def test_warp_ops_follow_their_definitions() -> None:
    x = torch.randint(0, 100, (64,), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    shim = _sample()
    shim.configure(3)
    y = torch.zeros(64, 3, dtype=torch.int32)
    shim.check(shim.lib.run_warp_ops(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr())))
    warps = x.view(2, 32)
    assert torch.equal(y[:, 0], warps.sum(1).repeat_interleave(32).int())
    up = torch.cat([torch.cat([w[:3], w[:-3]]) for w in warps])
    assert torch.equal(y[:, 1], up)
    ballot = [sum(1 << i for i in range(32) if int(w[i]) % 2) for w in warps]
    assert [int(v) & 0xFFFFFFFF for v in y[::32, 2]] == ballot


def test_barrier_not_reached_by_every_thread_is_an_error() -> None:
    shim = _sample()
    shim.configure(0)
    y = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cannot proceed: 16 of 64 threads wait at __syncthreads"):
        shim.check(shim.lib.run_divergent_barrier(ctypes.c_void_p(y.data_ptr())))


# ---------------------------------------------------------------- the fusedlr kernels
def _bucket(sizes: list[int], steps: list[int], amsgrad: bool, seed: int) -> tuple[Bucket, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g) for n in sizes]
    bucket = Bucket(
        params=params,
        exp_avgs=[torch.randn(n, generator=g) for n in sizes],
        exp_avg_sqs=[torch.rand(n, generator=g) for n in sizes],
        max_exp_avg_sqs=[torch.rand(n, generator=g) + 1 for n in sizes] if amsgrad else None,
        steps=torch.tensor(steps, dtype=torch.int64),
    )
    return bucket, [torch.randn(n, generator=g) for n in sizes]


def _clone(b: Bucket) -> Bucket:
    c = lambda ts: None if ts is None else [t.clone() for t in ts]
    return Bucket(c(b.params), c(b.exp_avgs), c(b.exp_avg_sqs), c(b.max_exp_avg_sqs), b.steps.clone())


SIZES = [3, 8192 + 5, 1, 0, 2 * 8192, 700]
STEPS = [1, 7, 2, 9, 30, 4]


HYPER = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False)
SCHED = fusedlr.get_schedule("cosine", num_warmup_steps=2, num_training_steps=10)


def _folded_step(backend: EmulatedCudaBackend, bucket: Bucket, grads: list[torch.Tensor], scale: torch.Tensor):
    """A folded step of one bucket by the kernels (as ``AdamW`` runs it on a folding backend): pass 1 into a
    stats buffer holding garbage (reset), then the update as group 1 of two, advancing the steps and k and
    writing the norm, found_inf and applied LR. Returns (stats, k, norm, found_inf, applied_lr)."""
    stats = torch.full((2,), 7.0)
    backend.grad_stats(bucket, grads, None, stats, scale=scale, reset=True)
    k, norm, found = torch.tensor(3), torch.full((), -1.0), torch.full((), -1.0)
    applied = torch.full((2,), float("nan"), dtype=torch.float64)
    ctrl = StepControl(k=k, schedule=SCHED, schedule_table=SCHED.as_tensor(), stats=stats, max_norm=1.0,
                       inv_scale=None, found_inf=None)
    fold = FoldedUpdate(scale=scale, skip_nonfinite=True, group=1, advance_k=True, norm_out=norm, found_inf_out=found)
    backend.adamw_update(bucket, grads, HYPER, ctrl, applied, fold)
    return stats, k, norm, found, applied


def _kernels_match_reference(backend: EmulatedCudaBackend, seed: int, sizes=SIZES, steps=STEPS) -> bool:
    """One folded grad_stats + adamw_update (``_folded_step``) of tensors with different steps (so per-tensor
    coefficients differ), against the reference and the small ops the optimizer runs without folding."""
    bucket, grads = _bucket(sizes, steps, amsgrad=True, seed=seed)
    ref = _clone(bucket)
    ref.steps += 1  # the reference reads this update's step numbers
    scale = torch.tensor(3.0)
    inv = scale.double().reciprocal().float()  # GradScaler's inverse
    ref_stats = torch.zeros(2)
    reference.grad_stats(ref, grads, inv, ref_stats)
    stats, k, norm, found, applied = _folded_step(backend, bucket, grads, scale)
    if not torch.allclose(stats, ref_stats, rtol=1e-5, atol=0):
        return False
    ref_lr = torch.zeros((), dtype=torch.float64)
    ctrl = StepControl(k=torch.tensor(3), schedule=SCHED, schedule_table=SCHED.as_tensor(), stats=stats, max_norm=1.0,
                       inv_scale=inv, found_inf=torch.tensor(0.0))
    reference.adamw_update(ref, grads, HYPER, ctrl, ref_lr)
    pairs = zip([*bucket.params, *bucket.exp_avgs, *bucket.exp_avg_sqs, *bucket.max_exp_avg_sqs],
                [*ref.params, *ref.exp_avgs, *ref.exp_avg_sqs, *ref.max_exp_avg_sqs])
    return (
        all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in pairs)
        and torch.equal(bucket.steps, ref.steps)
        and int(k) == 4
        and torch.equal(norm, stats[0].sqrt())
        and float(found) == 0.0
        and torch.equal(applied[1], ref_lr)
        and bool(applied[0].isnan())
        and int(backend.arrival) == 0
    )


def test_fusedlr_kernels_match_reference_under_many_interleavings() -> None:
    shim = fusedlr_kernels()
    shim.disable_barrier(None)
    for seed in range(4):
        shim.configure(seed, yield_prob=0.5, resident_blocks=2)
        assert _kernels_match_reference(EmulatedCudaBackend(shim, grid=3), seed), f"seed {seed}"


def test_fusedlr_kernels_on_thousands_of_tensors() -> None:
    g = torch.Generator().manual_seed(5)
    sizes = [int(n) for n in torch.randint(0, 40, (3000,), generator=g)] + [8192 * 3 + 1]
    steps = [int(t) for t in torch.randint(1, 100, (len(sizes),), generator=g)]
    shim = fusedlr_kernels()
    shim.configure(11, yield_prob=0.25, resident_blocks=3)
    assert _kernels_match_reference(EmulatedCudaBackend(shim, grid=5), 0, sizes, steps)


@pytest.mark.parametrize("site", range(len(kernel_barrier_sites())), ids=lambda i: kernel_barrier_sites()[i])
def test_every_barrier_of_the_kernels_is_needed(site: int) -> None:
    """Without this __syncthreads(), some interleaving gives a result other than the reference's, or threads
    of a block stop at different barriers (reported by the shim)."""
    shim = fusedlr_kernels()
    assert shim.barrier_sites == kernel_barrier_sites()
    shim.disable_barrier(site)
    try:
        caught = False
        for seed in range(6):
            shim.configure(seed, yield_prob=0.5, resident_blocks=2)
            try:
                caught = not _kernels_match_reference(EmulatedCudaBackend(shim, grid=3), seed)
            except RuntimeError:
                caught = True
            if caught:
                break
    finally:
        shim.disable_barrier(None)
    assert caught, f"removing the barrier at {shim.barrier_sites[site]} changed no result"


@pytest.mark.parametrize("grid", [1, 3])
def test_folded_step_skipped_and_without_chunks(grid: int) -> None:
    """A skipped step (an inf gradient) writes only the norm (inf) and found_inf (1): steps, k, the applied LR
    and every tensor stay; a bucket of zero-size tensors (no chunk) still resets the stats, advances the steps
    and k and writes the norm, found_inf and applied LR."""
    shim = fusedlr_kernels()
    shim.disable_barrier(None)
    shim.configure(grid, yield_prob=0.5, resident_blocks=2)
    backend = EmulatedCudaBackend(shim, grid=grid)
    bucket, grads = _bucket(SIZES, STEPS, amsgrad=True, seed=1)
    grads[1][17] = float("inf")
    before = _clone(bucket)
    stats, k, norm, found, applied = _folded_step(backend, bucket, grads, torch.tensor(2.0))
    assert stats[1] > 0 and float(norm) == float("inf") and float(found) == 1.0
    assert int(k) == 3 and torch.equal(bucket.steps, before.steps) and bool(applied.isnan().all())
    for a, b in zip(_tensors(bucket), _tensors(before)):
        assert torch.equal(a, b)

    empty, empty_grads = _bucket([0, 0], [0, 5], amsgrad=True, seed=2)
    stats, k, norm, found, applied = _folded_step(backend, empty, empty_grads, torch.tensor(2.0))
    assert stats.tolist() == [0.0, 0.0] and float(norm) == 0.0 and float(found) == 0.0
    assert int(k) == 4 and empty.steps.tolist() == [1, 6] and int(backend.arrival) == 0
    assert float(applied[1]) == pytest.approx(1e-2 * SCHED(3)) and bool(applied[0].isnan())


# Twenty tensors, zero-size ones first, last and in runs, 22 chunks: grids of 3 and 7 blocks split them
# unevenly, and block ranges start and end inside tensors and next to zero-size ones.
WALK_SIZES = [0, 5, 8192, 0, 0, 8193, 1, 3 * 8192 + 7, 0, 100, 8191, 0, 2 * 8192, 17, 0, 8192 + 1, 3, 0, 40000, 0]
WALK_STEPS = [1 + (7 * i) % 23 for i in range(len(WALK_SIZES))]


def _update(grid: int, seed: int) -> tuple[Bucket, Bucket]:
    """One adamw_update by the kernels with ``grid`` blocks, and by the reference, of the WALK_SIZES bucket."""
    shim = fusedlr_kernels()
    shim.disable_barrier(None)
    shim.configure(seed, yield_prob=0.25, resident_blocks=2)
    bucket, grads = _bucket(WALK_SIZES, WALK_STEPS, amsgrad=True, seed=0)
    ref = _clone(bucket)
    hyper = GroupHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False)
    ctrl = StepControl(k=torch.tensor(3), schedule=None, schedule_table=None, stats=torch.tensor([4.0, 0.0]),
                       max_norm=1.0, inv_scale=torch.tensor(0.5),
                       found_inf=torch.tensor(0.0))
    EmulatedCudaBackend(shim, grid=grid).adamw_update(bucket, grads, hyper, ctrl)
    reference.adamw_update(ref, grads, hyper, ctrl)
    return bucket, ref


def _tensors(b: Bucket) -> list[torch.Tensor]:
    return [*b.params, *b.exp_avgs, *b.exp_avg_sqs, *b.max_exp_avg_sqs]


def test_contiguous_chunk_ranges_update_every_tensor_once_whatever_the_grid() -> None:
    """Each block walks its own range of chunks across tensors (zero-size ones included): every element is
    updated once, with its own tensor's coefficients, bit for bit the same for any grid."""
    one, ref = _update(grid=1, seed=0)
    for a, b in zip(_tensors(one), _tensors(ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for grid, seed in [(3, 1), (7, 2), (22, 3)]:
        got, _ = _update(grid, seed)
        for i, (a, b) in enumerate(zip(_tensors(got), _tensors(one))):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"grid {grid}: tensor {i}"


def _stats(grid: int, seed: int, grads: list[torch.Tensor]) -> torch.Tensor:
    shim = fusedlr_kernels()
    shim.disable_barrier(None)
    shim.configure(seed, yield_prob=0.5, resident_blocks=3)
    out = torch.zeros(2)
    bucket, _ = _bucket(WALK_SIZES, WALK_STEPS, amsgrad=False, seed=0)
    EmulatedCudaBackend(shim, grid=grid).grad_stats(bucket, grads, torch.tensor(0.25), out)
    return out


def test_grad_stats_is_deterministic_for_a_grid_and_close_to_the_reference_for_any() -> None:
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(n, generator=g) * (1 + i) for i, n in enumerate(WALK_SIZES)]
    grads[7][123] = float("nan")
    grads[18][-1] = float("inf")
    want = torch.zeros(2)
    reference.grad_stats(_bucket(WALK_SIZES, WALK_STEPS, amsgrad=False, seed=0)[0], grads, torch.tensor(0.25), want)
    grads[7][123] = grads[18][-1] = 0.0  # finite, to compare the sums too
    finite_want = torch.zeros(2)
    reference.grad_stats(_bucket(WALK_SIZES, WALK_STEPS, amsgrad=False, seed=0)[0], grads, torch.tensor(0.25),
                         finite_want)
    for grid in (3, 7):
        first = _stats(grid, seed=grid, grads=grads)
        torch.testing.assert_close(first, finite_want, rtol=1e-5, atol=0)
        again = _stats(grid, seed=100 + grid, grads=grads)  # another block order and interleaving
        assert torch.equal(first.view(torch.int32), again.view(torch.int32)), f"grid {grid}"
    grads[7][123], grads[18][-1] = float("nan"), float("inf")
    assert _stats(7, seed=0, grads=grads)[1] == want[1] == 2


def test_grid_is_sized_from_the_occupancy_of_the_kernel_that_runs() -> None:
    """The binding's grid: min(total chunks, SMs * resident blocks per SM), here the shim's 132 SMs and its
    thread-limited occupancy (2048 / 512 = 4 blocks; the set instances' too, which on a GPU have their own
    register-limited one); -1 for a mode without a kernel."""
    lib = fusedlr_kernels().lib
    lib.fusedlr_emu_grad_stats_grid.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.fusedlr_emu_adamw_update_grid.argtypes = [ctypes.c_int] * 4 + [ctypes.c_int64, ctypes.c_int]
    assert [lib.fusedlr_emu_grad_stats_grid(2, n) for n in (1, 22, 528, 10**12)] == [1, 22, 528, 528]
    for launch_set in (0, 1):
        assert lib.fusedlr_emu_adamw_update_grid(0, 1, 0, 0, 10**6, launch_set) == 528
        assert lib.fusedlr_emu_adamw_update_grid(2, 0, 1, 2, 7, launch_set) == 7
        # fp32 params, fp32 low-precision moments
        assert lib.fusedlr_emu_adamw_update_grid(0, 0, 1, 0, 7, launch_set) == -1
    assert lib.fusedlr_emu_grad_stats_grid(9, 7) == -1


# Three param groups of one launch set: different hyperparameters (maximize in one), a float32 tensor LR in the
# second, zero-size tensors in each, and chunks that straddle the segments for grids of 3 and 7 blocks.
SET_SIZES = [[0, 8192 + 5, 3], [700, 0, 2 * 8192, 1], [5000, 0]]
SET_STEPS = [[4, 1, 9], [2, 6, 3, 11], [1, 8]]
SET_HYPERS = [
    HYPER,
    GroupHyper(lr=torch.tensor(3e-3), beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0, amsgrad=True, maximize=False),
    GroupHyper(lr=5e-2, beta1=0.5, beta2=0.999, eps=1e-7, weight_decay=0.3, amsgrad=True, maximize=True),
]


def _set_step(backend: EmulatedCudaBackend, buckets: list[Bucket], grads, launch_set: bool, inf: bool = False):
    """A folded AMP + clipping step of SET_HYPERS's three groups (pass 1 by the kernels, then the updates: one
    set launch, or one launch per group). Returns (k, norm, found_inf, applied_lr)."""
    scale = torch.tensor(4.0)
    stats = torch.full((2,), 7.0)
    backend.grad_stats_set(buckets, grads, stats, scale)
    k, norm, found = torch.tensor(3), torch.full((), -1.0), torch.full((), -1.0)
    applied = torch.full((4,), float("nan"), dtype=torch.float64)  # entry 3: no group
    ctrl = StepControl(k=k, schedule=SCHED, schedule_table=SCHED.as_tensor(), stats=stats, max_norm=1.0,
                       inv_scale=None, found_inf=None)
    folds = [
        FoldedUpdate(scale=scale, skip_nonfinite=True, group=i, advance_k=i == 2, norm_out=norm if i == 2 else None,
                     found_inf_out=found if i == 2 else None)
        for i in range(3)
    ]
    if launch_set:
        backend.prepare_update_set(buckets, grads, SET_HYPERS, ctrl, applied, folds)()
    else:
        for b, gs, h, f in zip(buckets, grads, SET_HYPERS, folds):
            backend.adamw_update(b, gs, h, ctrl, applied, f)
    return k, norm, found, applied


def _set_buckets(seed: int) -> tuple[list[Bucket], list[list[torch.Tensor]]]:
    pairs = [_bucket(s, st, amsgrad=True, seed=seed + i) for i, (s, st) in enumerate(zip(SET_SIZES, SET_STEPS))]
    return [b for b, _ in pairs], [gs for _, gs in pairs]


@pytest.mark.parametrize("grid", [1, 3, 7])
def test_launch_set_is_bitwise_the_per_group_launches_and_the_reference(grid: int) -> None:
    """One launch over three segments (launch_adamw_update_set) writes bitwise what one launch per segment writes
    (every tensor, steps, k, norm, found_inf, each group's applied LR), and matches the reference's update with
    each group's hyperparameters (torch's recipe: unscale, clip, AdamW)."""
    shim = fusedlr_kernels()
    shim.disable_barrier(None)
    shim.configure(grid, yield_prob=0.5, resident_blocks=2)
    backend = EmulatedCudaBackend(shim, grid=grid)
    one, grads = _set_buckets(seed=5)
    per = [_clone(b) for b in one]
    ref = [_clone(b) for b in one]
    out_one = _set_step(backend, one, grads, launch_set=True)
    out_per = _set_step(backend, per, grads, launch_set=False)
    for a, b in zip(out_one, out_per):
        assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(a[~a.isnan()], b[~b.isnan()])
    assert int(out_one[0]) == 4 and float(out_one[2]) == 0.0 and bool(out_one[3][3].isnan())
    for b, p in zip(one, per):
        assert torch.equal(b.steps, p.steps)
        for x, y in zip(_tensors(b), _tensors(p)):
            assert torch.equal(x, y)
    assert int(backend.arrival) == 0

    flat = [g for gs in grads for g in gs]
    total = torch.stack([(g * 0.25).pow(2).sum() for g in flat]).sum()
    coef = min(1.0, 1.0 / (float(total.sqrt()) + 1e-6))
    ctrl = StepControl(k=torch.tensor(3), schedule=SCHED, schedule_table=SCHED.as_tensor(),
                       stats=torch.stack([total, torch.tensor(0.0)]), max_norm=1.0, inv_scale=torch.tensor(0.25),
                       found_inf=torch.tensor(0.0))
    for i, (r, gs, h, b) in enumerate(zip(ref, grads, SET_HYPERS, one)):
        r.steps += 1  # the reference reads this update's step numbers
        lr = torch.zeros((), dtype=torch.float64)
        reference.adamw_update(r, gs, h, ctrl, lr)
        assert torch.equal(b.steps, r.steps)
        assert float(out_one[3][i]) == pytest.approx(float(lr), rel=1e-12)
        for x, y in zip(_tensors(b), _tensors(r)):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert coef < 1.0  # the clip applies


@pytest.mark.parametrize("grid", [1, 3])
def test_launch_set_skipped_step_writes_only_the_flags(grid: int) -> None:
    """A skipped AMP step (an inf gradient in the second group) updates no segment: only the norm (inf) and
    found_inf (1) are written; steps, k, the applied LRs and every tensor stay."""
    shim = fusedlr_kernels()
    shim.disable_barrier(None)
    shim.configure(grid, yield_prob=0.5, resident_blocks=2)
    buckets, grads = _set_buckets(seed=9)
    grads[1][2][40] = float("inf")
    before = [_clone(b) for b in buckets]
    k, norm, found, applied = _set_step(EmulatedCudaBackend(shim, grid=grid), buckets, grads, launch_set=True)
    assert float(norm) == float("inf") and float(found) == 1.0 and int(k) == 3 and bool(applied.isnan().all())
    for b, p in zip(buckets, before):
        assert torch.equal(b.steps, p.steps)
        for x, y in zip(_tensors(b), _tensors(p)):
            assert torch.equal(x, y)
