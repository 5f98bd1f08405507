"""Host floor: what torch's optimizer contract alone costs per step for many tiny parameters.

The case of ``benchmarks/host_cost.py`` (2000 one-element fp32 params on the CPU, new gradient tensors every step
as ``p.grad = torch.randn(1)``, global-norm clipping, AdamW). A small C++ extension (``torch.utils.cpp_extension.
load_inline``, built once into ``--build-dir``) holds the params, two moments per param and one int64 step tensor,
and runs one loop over the params per step, cumulatively doing:

    1  nothing (the Python -> C++ call)
    2  + read each param's ``.grad`` (``p.unsafeGetTensorImpl()->grad()``) and its data pointer
    3  + check the gradient's dtype, device, layout, sizes and strides
    4  + the data pointers of the param and of its two moments
    5  + the arithmetic: pass 1 (sum of squares), the clip coefficient, pass 2 (one AdamW update per element,
         the step counter and its bias corrections)
    6  + bump the version counters of the param and its moments (and of the step tensor, once)
    7  stage 6 split over 2 threads (``at::parallel_for``; pass 1 then pass 2, each in two halves)

Variants of stage 6: the moments as views of one flat tensor, a second run on warm caches, fusedlr's four walks
over the params, the params and moments checked every step. Each has its own parameters;
``fusedlr.AdamW(backend="cpu")`` (its eager fast path, ``fusedlr._C.StepPlan``: as a whole, its native call alone,
its Python side alone) and torch's fused recipe (``host_cost._torch_step``) run in the same process, in turn every
round (the order rotates each round), and each round also times the benchmark's own gradient creation, which
``host_cost.py`` keeps outside its timed region. Reported: median us/step, p10, p90, the median over rounds of each
stage's increment over the previous stage, and the garbage collection inside the timed steps. Not a test:
nothing is asserted.

    PYTHONPATH=. python benchmarks/host_floor.py [--tensors 2000] [--steps 300] [--out benchmarks/results]
    perf record -e cpu-clock python benchmarks/host_floor.py --only fusedlr-cpu --seconds 10  # one pipeline
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.cpp_extension import load_inline

from benchmarks.host_cost import GOAL_US, _fusedlr_step, _torch_step

STAGES = {
    1: "empty call (Python -> C++)",
    2: "+ read p.grad impl and its data pointer",
    3: "+ check grad dtype/device/layout/sizes/strides",
    4: "+ data pointers of p, exp_avg, exp_avg_sq",
    5: "+ arithmetic (norm pass, clip, AdamW update, step counter)",
    6: "+ bump version counters of p, m, v (steps once)",
    7: "stage 6 on 2 threads (at::parallel_for)",
}

GRADS = "grad creation (outside the timed step)"
NATIVE = "fusedlr-cpu native call"

CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <stdexcept>
#include <vector>

namespace {

struct Slot {
  float* p;
  const float* g;
  float* m;
  float* v;
};

// AdamW with clipping at 1.0 and lr 1e-3, the arithmetic of fusedlr's kernels (adamw_math.h) in float32.
constexpr double kLr = 1e-3, kBeta1 = 0.9, kBeta2 = 0.999, kEps = 1e-8, kWd = 1e-2, kMaxNorm = 1.0;

struct Coeffs {
  float scale, decay, w1, beta2, c2, bias2_sqrt, lr_bias, eps;
};

Coeffs coeffs(double scale, int64_t t) {
  const double b1 = -std::expm1(t * std::log(kBeta1)), b2 = -std::expm1(t * std::log(kBeta2));
  return {static_cast<float>(scale), static_cast<float>(1.0 - kLr * kWd), static_cast<float>(1.0 - kBeta1),
          static_cast<float>(kBeta2), static_cast<float>(1.0 - kBeta2), static_cast<float>(std::sqrt(b2)),
          static_cast<float>(kLr / b1), static_cast<float>(kEps)};
}

inline void bump(const at::Tensor& t) { t.unsafeGetTensorImpl()->bump_version(); }

// Whether ``t`` is a one-element contiguous float32 CPU tensor (what the step can read as it is).
inline bool one_float(const c10::TensorImpl& t) {
  return t.dtype() == caffe2::TypeMeta::Make<float>() && t.device().is_cpu() && t.layout() == at::kStrided &&
         t.dim() == 1 && t.sizes()[0] == 1 && t.strides()[0] == 1;
}

// Params, moments and steps of one stage; ``step(stage)`` runs one optimizer step up to that stage. With
// ``flat`` (float32 [2, n]), ``ms`` and ``vs`` are its rows' one-element views: the step reads the moments
// through ``flat``'s data pointer and bumps its version counter (shared by the views) once. With
// ``check_states``, stage 4 also checks the param and its moments as stage 3 checks the gradient.
class Floor {
 public:
  Floor(std::vector<at::Tensor> params, std::vector<at::Tensor> ms, std::vector<at::Tensor> vs, at::Tensor steps,
        std::optional<at::Tensor> flat, bool check_states)
      : params_(std::move(params)), ms_(std::move(ms)), vs_(std::move(vs)), steps_(std::move(steps)),
        flat_(flat.value_or(at::Tensor())), check_states_(check_states), slots_(params_.size()) {}

  // Sum of squares of the gradients (stage >= 5; 0 below), so that nothing is optimised away.
  double step(int stage) {
    if (stage <= 1) return 0.0;
    const int64_t n = static_cast<int64_t>(params_.size());
    if (stage <= 6) {
      const double sumsq = collect(stage, 0, n);
      if (stage >= 5) update(stage, clip(sumsq), 0, n);
      if (stage >= 6) bump_once();
      return sumsq;
    }
    const int64_t half = (n + 1) / 2;
    double part[2] = {0.0, 0.0};
    at::parallel_for(0, n, half, [&](int64_t b, int64_t e) { part[b / half] = collect(6, b, e); });
    const double sumsq = part[0] + part[1];
    const double scale = clip(sumsq);
    at::parallel_for(0, n, half, [&](int64_t b, int64_t e) { update(6, scale, b, e); });
    bump_once();
    return sumsq;
  }

  // Stage 6 in the order of walks of fusedlr's StepPlan.step: pointers and checks, pass 1, pass 2, bumps.
  double step_in_four_walks() {
    const int64_t n = static_cast<int64_t>(params_.size());
    collect(4, 0, n);
    double sumsq = 0.0;
    for (const Slot& s : slots_) sumsq += static_cast<double>(s.g[0]) * s.g[0];
    update(5, clip(sumsq), 0, n);
    for (int64_t i = 0; i < n; ++i) {
      bump(params_[i]);
      bump(ms_[i]);
      bump(vs_[i]);
    }
    bump_once();
    return sumsq;
  }

 private:
  void bump_once() {
    bump(steps_);
    if (flat_.defined()) bump(flat_);
  }

  static double clip(double sumsq) {
    const double x = kMaxNorm / (std::sqrt(sumsq) + 1e-6);
    return x >= 1.0 ? 1.0 : x;
  }

  // Stages 2-4 (and pass 1 from stage 5) over params [b, e): fills ``slots_``.
  double collect(int stage, int64_t b, int64_t e) {
    double sumsq = 0.0;
    float* flat = flat_.defined() ? static_cast<float*>(flat_.unsafeGetTensorImpl()->mutable_data()) : nullptr;
    for (int64_t i = b; i < e; ++i) {
      c10::TensorImpl& p = *params_[i].unsafeGetTensorImpl();
      const at::Tensor& grad = p.grad();
      if (!grad.defined()) throw std::runtime_error("host_floor: a parameter has no gradient");
      const c10::TensorImpl& g = *grad.unsafeGetTensorImpl();
      Slot& s = slots_[i];
      s.g = static_cast<const float*>(g.data());
      if (stage >= 3 && !one_float(g)) {
        throw std::runtime_error("host_floor: a gradient is not a one-element float32 CPU tensor");
      }
      if (stage >= 4 && check_states_ &&
          !(one_float(p) && one_float(*ms_[i].unsafeGetTensorImpl()) && one_float(*vs_[i].unsafeGetTensorImpl()))) {
        throw std::runtime_error("host_floor: a parameter or moment is not a one-element float32 CPU tensor");
      }
      if (stage >= 4) {
        s.p = static_cast<float*>(p.mutable_data());
        if (flat != nullptr) {
          s.m = flat + i;
          s.v = flat + params_.size() + i;
        } else {
          s.m = static_cast<float*>(ms_[i].unsafeGetTensorImpl()->mutable_data());
          s.v = static_cast<float*>(vs_[i].unsafeGetTensorImpl()->mutable_data());
        }
      }
      if (stage >= 5) sumsq += static_cast<double>(s.g[0]) * s.g[0];
    }
    return sumsq;
  }

  // Pass 2 over params [b, e) (stage 5), with the version bumps (stage 6).
  void update(int stage, double scale, int64_t b, int64_t e) {
    int64_t* steps = steps_.data_ptr<int64_t>();
    int64_t cached = -1;
    Coeffs c{};
    for (int64_t i = b; i < e; ++i) {
      const int64_t t = ++steps[i];
      if (t != cached) {
        c = coeffs(scale, t);
        cached = t;
      }
      const Slot& s = slots_[i];
      const float g = s.g[0] * c.scale;
      float p = s.p[0] * c.decay, m = s.m[0], v = s.v[0];
      m = m + c.w1 * (g - m);
      v = v * c.beta2 + (c.c2 * g) * g;
      p = p - c.lr_bias * (m / (std::sqrt(v) / c.bias2_sqrt + c.eps));
      s.p[0] = p;
      s.m[0] = m;
      s.v[0] = v;
      if (stage >= 6) {
        bump(params_[i]);
        if (!flat_.defined()) {
          bump(ms_[i]);
          bump(vs_[i]);
        }
      }
    }
  }

  std::vector<at::Tensor> params_, ms_, vs_;
  at::Tensor steps_, flat_;
  bool check_states_;
  std::vector<Slot> slots_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Floor>(m, "Floor")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                          std::optional<at::Tensor>, bool>())
      .def("step", &Floor::step)
      .def("step_in_four_walks", &Floor::step_in_four_walks);
}
"""


def build(build_dir: Path) -> Any:
    """The extension (compiled once per source into ``build_dir``, about a minute)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    return load_inline(
        name="fusedlr_host_floor",
        cpp_sources=[CPP],
        extra_cflags=["-O3", "-fno-math-errno"],
        build_directory=str(build_dir),
    )


def new_params(n: int) -> list[torch.Tensor]:
    """The params of ``host_cost.time_pipeline``."""
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(1)) for _ in range(n)]


def new_grads(params: list[torch.Tensor]) -> None:
    """New gradient tensors, as ``host_cost.time_pipeline`` makes them before every step."""
    for p in params:
        p.grad = torch.randn(1)


class NoNative:
    """Stands in for ``fusedlr._C.StepPlan``: a step that does nothing (times fusedlr's Python side alone)."""

    def step(self, *args: Any) -> bool:
        return True


class TimedNative:
    """Stands in for ``fusedlr._C.StepPlan`` and records the seconds of each of its ``step`` calls."""

    def __init__(self, native: Any) -> None:
        self.native = native
        self.times: list[float] = []

    def step(self, *args: Any) -> bool:
        start = time.perf_counter()
        ran = self.native.step(*args)
        self.times.append(time.perf_counter() - start)
        return ran


@dataclass
class Pipeline:
    """One timed step over its own params; ``warm_up`` (or None) runs after the new gradients, untimed."""

    params: list[torch.Tensor]
    step: Callable[[], Any]
    warm_up: Callable[[], Any] | None = None


def floor_pipeline(
    ext: Any,
    stage: int,
    n: int,
    flat: bool = False,
    warm: bool = False,
    four_walks: bool = False,
    check_states: bool = False,
) -> Pipeline:
    """Stage ``stage`` of the floor; ``flat``: the moments are views of one [2, n] tensor; ``warm``: the step runs
    once untimed on the same gradients first (its caches warm); ``four_walks``: stage 6 in fusedlr's four walks
    over the params instead of two; ``check_states``: also check each param's and moment's dtype and layout."""
    params = new_params(n)
    if flat:
        states = torch.zeros(2, n)
        ms, vs = list(states[0].split(1)), list(states[1].split(1))
    else:
        states = None
        ms, vs = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    floor = ext.Floor(params, ms, vs, torch.zeros(n, dtype=torch.int64), states, check_states)

    def step() -> float:
        return floor.step_in_four_walks() if four_walks else floor.step(stage)

    return Pipeline(params, step, step if warm else None)


def fusedlr_native_replaced(params: list[torch.Tensor], replace: Callable[[Any], Any]) -> Callable[[], None]:
    """fusedlr's ``opt.step`` with its ``StepPlan`` replaced by ``replace(StepPlan)`` (two warm-up steps: the
    first builds the plan, the second its ``StepPlan``)."""
    step = _fusedlr_step("cpu", params)
    for _ in range(2):
        new_grads(params)
        step()
    fast = step.__self__._step_cache.get("fast")
    if fast is None or fast.native is None:
        raise RuntimeError("fusedlr-cpu did not take its fast path (is fusedlr._C built in this clone?)")
    fast.native = replace(fast.native)
    return step


def summary(us: list[float], gc_us: list[float] | None) -> dict[str, float]:
    """Median, p10, p90 of ``us``; with ``gc_us`` (the collector's share of each), also the fraction of steps
    with a collection, its mean per step and the median of the steps less their collection time."""
    s = sorted(us)
    row = {"median_us": statistics.median(s), "p10_us": s[len(s) // 10], "p90_us": s[(9 * len(s)) // 10]}
    if gc_us is not None:
        row["steps_with_gc"] = sum(g > 0 for g in gc_us) / len(gc_us)
        row["gc_mean_us"] = statistics.fmean(gc_us)
        row["median_without_gc_us"] = statistics.median(t - g for t, g in zip(us, gc_us))
    return row


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def pipelines(ext: Any, n: int) -> tuple[dict[str, Pipeline], TimedNative]:
    """Every pipeline with its own params, and the recorder of fusedlr's native call."""
    pipes = {f"floor-{k}": floor_pipeline(ext, k, n) for k in STAGES}
    pipes["floor-6 flat"] = floor_pipeline(ext, 6, n, flat=True)
    pipes["floor-6 warm"] = floor_pipeline(ext, 6, n, warm=True)
    pipes["floor-6 in four walks"] = floor_pipeline(ext, 6, n, four_walks=True)
    pipes["floor-6 checking p, m, v"] = floor_pipeline(ext, 6, n, check_states=True)
    params = new_params(n)
    pipes["fusedlr-cpu"] = Pipeline(params, _fusedlr_step("cpu", params))
    native = TimedNative(None)

    def timed(plan: Any) -> TimedNative:
        native.native = plan
        return native

    params = new_params(n)
    pipes["fusedlr-cpu (native call timed)"] = Pipeline(params, fusedlr_native_replaced(params, timed))
    params = new_params(n)
    pipes["fusedlr-cpu Python side"] = Pipeline(params, fusedlr_native_replaced(params, lambda plan: NoNative()))
    params = new_params(n)
    pipes["torch-fused"] = Pipeline(params, _torch_step("fused", params))
    return pipes, native


class GcClock:
    """Seconds Python's cyclic garbage collector has run since it was installed (a ``gc.callbacks`` entry)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start

    def remove(self) -> None:
        gc.callbacks.remove(self)


def run(ext: Any, n: int, steps: int, in_a_row: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Microseconds per step of every pipeline, round by round (5 warm-up rounds dropped), the benchmark's
    gradient creation (every pipeline's, before its step) and fusedlr's native call; and the microseconds of
    garbage collection inside each timed step (collections that the allocations of the gradient creation and
    of the step trigger while the step runs). Each pipeline steps ``in_a_row`` times in its turn and the last
    step is timed: 1 leaves its objects as cold as the other pipelines' turns make them (after a forward and
    backward pass), 3 as warm as host_cost.py's consecutive steps leave them."""
    pipes, native = pipelines(ext, n)
    names = list(pipes)
    times: dict[str, list[float]] = {name: [] for name in [*names, GRADS, NATIVE]}
    in_gc: dict[str, list[float]] = {name: [] for name in [*names, GRADS]}
    clock = GcClock()
    try:
        for r in range(steps + 5):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                pipe = pipes[name]
                for _ in range(in_a_row):
                    gc0, start = clock.total, time.perf_counter()
                    new_grads(pipe.params)
                    gc1, made = clock.total, time.perf_counter()
                    if pipe.warm_up is not None:
                        pipe.warm_up()
                    gc2, begin = clock.total, time.perf_counter()
                    pipe.step()
                    end, gc3 = time.perf_counter(), clock.total
                if r >= 5:
                    times[GRADS].append((made - start) * 1e6)
                    in_gc[GRADS].append((gc1 - gc0) * 1e6)
                    times[name].append((end - begin) * 1e6)
                    in_gc[name].append((gc3 - gc2) * 1e6)
            if r >= 5:
                times[NATIVE].append(native.times[-1] * 1e6)
    finally:
        clock.remove()
    return times, in_gc


def increments(times: dict[str, list[float]]) -> dict[int, float]:
    """Median over rounds of floor-k minus floor-(k-1) (k = 2..6), and of floor-7 minus floor-6."""
    return {
        k: statistics.median(a - b for a, b in zip(times[f"floor-{k}"], times[f"floor-{k - 1}"]))
        for k in range(2, len(STAGES) + 1)
    }


def report(
    times: dict[str, list[float]],
    in_gc: dict[str, list[float]],
    n: int,
    steps: int,
    in_a_row: int,
    load: tuple,
    load_after: tuple,
) -> dict:
    rows = {name: summary(us, in_gc.get(name)) for name, us in times.items()}
    fused = rows["torch-fused"]["median_us"]
    for row in rows.values():
        row["torch_fused_over"] = fused / row["median_us"]
    return {
        "case": f"{n} one-element fp32 params, CPU, new grads every step, clip 1.0 + AdamW",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load,
        "load_average_after": load_after,
        "torch": torch.__version__,
        "steps": steps,
        "in_a_row": in_a_row,
        "goal_us": GOAL_US,
        "results": rows,
        "stage_increment_us": increments(times),
    }


WHAT = {
    **{f"floor-{k}": what for k, what in STAGES.items()},
    "floor-6 flat": "floor-6 with the moments as views of one [2, n] tensor (read via its data pointer, its "
    "version counter bumped once)",
    "floor-6 warm": "floor-6 run a second time on the same gradients (caches warm)",
    "floor-6 in four walks": "floor-6 walking the params four times as `StepPlan.step` does (pointers and checks; "
    "pass 1; pass 2; version bumps) instead of twice",
    "floor-6 checking p, m, v": "floor-6 also checking each param's and moment's dtype, device, layout, sizes and "
    "strides every step, as `StepPlan.step` does",
    "fusedlr-cpu": '`fusedlr.AdamW(..., backend="cpu").step()` (fast path), as host_cost.py',
    "fusedlr-cpu (native call timed)": "the same, its `StepPlan.step` call wrapped in a timer",
    NATIVE: "that `StepPlan.step` call alone",
    "fusedlr-cpu Python side": "fusedlr-cpu with `StepPlan.step` replaced by a no-op (nothing is updated)",
    "torch-fused": "`clip_grad_norm_(foreach=True)` + `AdamW(fused=True).step()` + `LambdaLR.step()`",
    GRADS: "`p.grad = torch.randn(1)` for the params (host_cost.py does not time it)",
}


def markdown(rep: dict) -> list[str]:
    rows, inc = rep["results"], rep["stage_increment_us"]
    load = ", ".join(f"{x:.1f}" for x in rep["load_average_before"])
    load_after = ", ".join(f"{x:.1f}" for x in rep["load_average_after"])
    lines = [
        f"## {rep['case']}, {rep['in_a_row']} step(s) in a row",
        "",
        f"{rep['date']}, {rep['device']} ({rep['cpu_count']} CPUs, {rep['torch_threads']} torch threads), load average "
        f"{load} before, {load_after} after; torch {rep['torch']}; {rep['steps']} rounds, every pipeline "
        f"{rep['in_a_row']} step(s) in a row per round (the last timed) in rotating order "
        f"(`PYTHONPATH=. python benchmarks/host_floor.py --in-a-row {rep['in_a_row']}`). Increment: median over rounds of "
        "this stage's time less the previous stage's (floor-7: less floor-6). GC: Python's cyclic collector running "
        "inside the timed step (triggered by the allocations of the gradient creation and of the step).",
        "",
        "| pipeline | what it does per step | median us | p10 | p90 | increment | steps with GC | GC mean us | "
        "median without GC | torch-fused / this |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, what in WHAT.items():
        r = rows[name]
        k = int(name[6]) if name.startswith("floor-") and len(name) == 7 else None
        step_inc = f"{inc[k]:.1f}" if k in inc else ""
        gc_cols = (
            f"{100 * r['steps_with_gc']:.0f}% | {r['gc_mean_us']:.1f} | {r['median_without_gc_us']:.1f}"
            if "gc_mean_us" in r
            else "| |"
        )
        lines.append(
            f"| {name} | {what} | {r['median_us']:.1f} | {r['p10_us']:.1f} | {r['p90_us']:.1f} | {step_inc} "
            f"| {gc_cols} | {r['torch_fused_over']:.1f}x |"
        )
    return lines


def profile_one(ext: Any, n: int, name: str, seconds: float) -> None:
    """Steps pipeline ``name`` alone for ``seconds`` and prints its mean us/step."""
    pipe = pipelines(ext, n)[0][name]
    steps, total = 0, 0.0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        new_grads(pipe.params)
        if pipe.warm_up is not None:
            pipe.warm_up()
        begin = time.perf_counter()
        pipe.step()
        total += time.perf_counter() - begin
        steps += 1
    print(f"{name}: {steps} steps, mean {total / steps * 1e6:.1f} us/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None, help="write host-floor-cpu-<date>.{json,md} here")
    parser.add_argument(
        "--build-dir", type=Path, default=Path(tempfile.gettempdir()) / "fusedlr_host_floor", help="extension build"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="step only this pipeline (new gradients each step) for --seconds, for a profiler such as "
        "`perf record -e cpu-clock` (hardware counters are not available in this VM), and print its mean",
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--in-a-row",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 3],
        help="steps each pipeline takes in its turn, the last timed (comma-separated: one table each)",
    )
    args = parser.parse_args()
    ext = build(args.build_dir)
    if args.only is not None:
        profile_one(ext, args.tensors, args.only, args.seconds)
        return
    reps, lines = [], ["# Host floor"]
    for in_a_row in args.in_a_row:
        load_before = os.getloadavg()
        times, in_gc = run(ext, args.tensors, args.steps, in_a_row)
        reps.append(report(times, in_gc, args.tensors, args.steps, in_a_row, load_before, os.getloadavg()))
        lines += ["", *markdown(reps[-1])]
        print("\n".join(lines), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"host-floor-cpu-{reps[0]['date'][:10]}"
        stem.with_suffix(".json").write_text(json.dumps(reps, indent=2) + "\n")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
