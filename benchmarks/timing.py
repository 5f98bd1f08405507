"""Timing, bandwidth and memory measurement, on CUDA (events) or CPU (perf_counter).

Every timed step starts on an idle device: ``prepare()`` then a synchronize, then the step between two
CUDA events. A step's time so includes its host-side launch overhead and any sync it does (torch's
``scaler.step`` with a foreach optimizer reads ``found_inf`` on the host), as a training loop sees it
when the GPU is not ahead of the host.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Timing",
    "copy_bandwidth",
    "fit_reason",
    "free_bytes",
    "measure",
    "peak_extra_bytes",
    "release",
    "synced",
    "synchronize",
]


@dataclass(frozen=True)
class Timing:
    """Per-step times in milliseconds."""

    times_ms: list[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def quantile_ms(self, q: float) -> float:
        """The ``q`` quantile (0..1) by nearest rank."""
        ordered = sorted(self.times_ms)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def synchronize(device: torch.device) -> None:
    """Wait for ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """``fn`` followed by a device synchronize (for wall-clock timers such as pytest-benchmark's)."""

    def call() -> None:
        fn()
        synchronize(device)

    return call


def _noop() -> None:
    return None


def measure(
    step: Callable[[], object],
    device: torch.device,
    *,
    prepare: Callable[[], object] = _noop,
    warmup: int = 5,
    iters: int = 50,
    budget_s: float = 2.0,
    min_iters: int = 5,
) -> Timing:
    """Time ``step`` ``iters`` times after ``warmup`` untimed calls, each preceded by ``prepare`` (untimed).

    The number of timed steps is capped so they take about ``budget_s`` (estimated from the fastest warm-up
    step), but is at least ``min_iters``; warm-up stops after 2 steps once it has taken ``budget_s / 2``."""
    estimate: list[float] = []
    for i in range(max(1, warmup)):
        prepare()
        synchronize(device)
        t0 = time.perf_counter()
        step()
        synchronize(device)
        estimate.append(time.perf_counter() - t0)
        if i >= 1 and sum(estimate) > budget_s / 2:  # slow pipelines: 2 warm-up steps are enough
            break
    per_step = min(estimate)  # the first steps also allocate states, compile kernels...
    n = max(min_iters, min(iters, int(min(budget_s / max(per_step, 1e-9), 1e9))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends):
            prepare()
            torch.cuda.synchronize(device)
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return Timing([s.elapsed_time(e) for s, e in zip(starts, ends)])
    times = []
    for _ in range(n):
        prepare()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(times)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 20) -> tuple[float, int]:
    """(bytes/s, buffer bytes): device-to-device ``copy_`` of a large buffer, counting read + write bytes."""
    n = nbytes or ((1 << 30) if device.type == "cuda" else (1 << 26))
    src, dst = torch.ones(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    timing = measure(lambda: dst.copy_(src), device, warmup=3, iters=iters, budget_s=float("inf"), min_iters=iters)
    src = dst = torch.empty(0, device=device)  # free the buffers
    release(device)
    return 2.0 * n / (timing.median_ms * 1e-3), n


def peak_extra_bytes(step: Callable[[], object], device: torch.device,
                     prepare: Callable[[], object] = _noop) -> int | None:
    """Peak device memory allocated during one ``step`` beyond what was allocated before it (None on CPU).

    Call after warm-up: optimizer states then already exist, so this is the step's transient workspace."""
    if device.type != "cuda":
        return None
    prepare()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def release(device: torch.device) -> None:
    """Free what dropped references held (and the CUDA cache), so the next pipeline starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int | None:
    """Free device memory (None on CPU: not checked)."""
    if device.type != "cuda":
        return None
    release(device)
    return torch.cuda.mem_get_info(device)[0]


def fit_reason(needed: int, device: torch.device) -> str | None:
    """Why ``needed`` bytes do not fit on ``device`` (None: they do, or it is not checked)."""
    free = free_bytes(device)
    if free is None or needed <= free:
        return None
    return f"does not fit: needs ~{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
