"""Ahead-of-time compilation of every Triton kernel specialization fusedlr can launch, for a GPU
architecture, with no GPU (``triton.compile`` with a ``GPUTarget``).

The specializations come from the code, not from a list: the backend's own ``grad_stats`` and
``adamw_update`` run on CPU tensors with every ``@triton.jit`` kernel of ``fusedlr.triton`` replaced
by a recorder, over configurations enumerated from the code's own types: every dtype of
``TL_DTYPES`` for params (grads have their param's dtype), every boolean field of ``GroupHyper``, with and without clipping,
AMP unscale and found_inf, a float lr and a 0-d float32/float64 tensor lr, with and without the
applied-LR output buffer, every ``schedules.Kind`` (and two ``SCHED_N`` values where the kind has
one), aligned and misaligned tensors, and every family of low-precision modes (``fusedlr.precision``:
master, remainder, stochastic rounding, moment dtypes) with all switches off and on, and the folded step
(``fusedlr.control.FoldedUpdate``: GradScaler's scale, reset, the step's outputs) for every dtype, aligned,
misaligned and mixed (a vectorized launch without the epilogue, then a scalar one with it), and with a tensor
LR, maximize and amsgrad read through its segment table. Each distinct launch (kernel + signature + constexprs) is then
compiled. ``coverage_gaps`` names the constexpr parameters that never took two values although they
could (a new flag the enumeration does not vary).

    python tests/triton_aot.py OUT_DIR 90 80     # writes OUT_DIR/<kernel>-<hash>.sm_<arch>.cubin
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

__all__ = ["Launch", "record_launches", "compile_launch", "coverage_gaps", "main"]


@dataclasses.dataclass(frozen=True)
class Launch:
    """One specialization: kernel (module, name), signature and constexprs, compile options."""

    module: str
    name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, object], ...]

    @property
    def key(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]


_TYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def _arg_type(value: object, annotation: str) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, float):
        return "fp64" if "64" in annotation else "fp32"
    if isinstance(value, int):
        return "i64" if not -(2**31) <= value < 2**31 or "64" in annotation else "i32"
    raise TypeError(f"cannot type a kernel argument {value!r}")


def _launch_of(kernel, module: str, args: tuple, kwargs: dict) -> Launch:
    params = kernel.params
    values = dict(zip([p.name for p in params], args))
    options = {k: v for k, v in kwargs.items() if k not in {p.name for p in params}}
    values.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    signature, constexprs = [], []
    for p in params:
        v = values[p.name] if p.name in values else p.default
        if p.is_constexpr:
            signature.append((p.name, "constexpr"))
            constexprs.append((p.name, v))
        else:
            signature.append((p.name, _arg_type(v, str(p.annotation))))
    return Launch(module, kernel.fn.__name__, tuple(signature), tuple(constexprs), tuple(sorted(options.items())))


def _configurations():
    """Optimizer configurations, enumerated from the types the code defines."""
    from fusedlr.control import GroupHyper
    from fusedlr.schedules import Kind
    from fusedlr.triton.grad_stats import TL_DTYPES

    flags = [f.name for f in dataclasses.fields(GroupHyper) if f.type in (bool, "bool")]
    dtypes = list(TL_DTYPES)
    kinds = [None, *Kind]
    # lr: a float, or a 0-d tensor of each dtype the optimizer accepts (read on the device);
    # applied: the applied-LR output buffer (the optimizer always passes one; backend callers may not)
    lrs = [None, torch.float32, torch.float64]
    base = dict(p=torch.float32, g=torch.float32, kind=None, n=2, aligned=True, clip=False, scale=False, inf=False,
                lr=None, applied=True, master=False, sr=False, moments=None, fold=False)
    base.update({f: False for f in flags})
    switches = ["clip", "scale", "inf", *flags]
    # grads have their param's dtype (autograd and the .grad setter enforce it)
    # every dtype with all switches off and all on, aligned and not
    for p, on, aligned in itertools.product(dtypes, (False, True), (True, False)):
        yield {**base, "p": p, "g": p, "aligned": aligned, **{s: on for s in switches}}
    # every switch alone, for every dtype
    for p, s in itertools.product(dtypes, switches):
        yield {**base, "p": p, "g": p, s: True}
    # every lr type with and without the applied-LR buffer, for every dtype, aligned and not
    for p, lr, applied, aligned in itertools.product(dtypes, lrs, (True, False), (True, False)):
        yield {**base, "p": p, "g": p, "lr": lr, "applied": applied, "aligned": aligned}
    # every schedule kind (and two SCHED_N where the kind reads one), clipped with AMP, float and tensor lr
    for kind, n, lr in itertools.product(kinds, (2, 3), lrs):
        yield {**base, "kind": kind, "n": n, "clip": True, "scale": True, "inf": True, "lr": lr}
    # the folded step for every dtype, all switches off and all on, aligned, misaligned and mixed
    for p, on, aligned in itertools.product(dtypes, (False, True), (True, False, "mixed")):
        yield {**base, "p": p, "g": p, "aligned": aligned, "fold": True, "clip": on, "scale": on}
    # the folded step's hyperparameters read from its segment table: a tensor LR of each dtype, maximize, amsgrad
    for p, lr in itertools.product(dtypes, lrs[1:]):
        yield {**base, "p": p, "g": p, "fold": True, "clip": True, "scale": True, "lr": lr,
               **{f: True for f in flags}}
    # low-precision modes (master_weights, stochastic_rounding, moment dtype, param dtype): each family,
    # all switches on and aligned, all off and misaligned
    bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
    modes = [(True, False, None, bf16), (True, False, None, f16), ("remainder", False, None, bf16),
             (False, True, None, bf16), (False, False, bf16, f32), (False, True, bf16, f16), (False, False, f32, f64),
             (False, True, bf16, f64), ("remainder", True, bf16, bf16), (True, True, bf16, f16)]
    for (master, sr, moments, p), on in itertools.product(modes, (False, True)):
        yield {**base, "p": p, "g": p, "aligned": on, "master": master, "sr": sr, "moments": moments,
               **{s: on for s in switches}}


def _drive(cfg: dict) -> None:
    """One step of the triton backend's two passes on CPU tensors (the kernels are recorders)."""
    import fusedlr.triton as backend
    from fusedlr.bucket import Bucket
    from fusedlr.control import FoldedUpdate, GroupHyper, StepControl
    from fusedlr.precision import BucketPrecision

    sizes = [5000, 37]
    offs = {True: [0, 0], False: [1, 1], "mixed": [0, 1]}[cfg["aligned"]]  # elements off a 16-byte boundary
    s_dtype = cfg["moments"] or (torch.float64 if cfg["p"] == torch.float64 else torch.float32)
    make = lambda dt: [torch.zeros(n + off, dtype=dt)[off:] for n, off in zip(sizes, offs)]
    amsgrad = cfg.get("amsgrad", False)
    prec = None
    if cfg["master"] is not False or cfg["sr"] or cfg["moments"] is not None:
        prec = BucketPrecision(master=make(torch.float32) if cfg["master"] is True else None,
                               remainder=make(torch.int16) if cfg["master"] == "remainder" else None,
                               stochastic=cfg["sr"], seed=2**32 - 1, pids=torch.arange(len(sizes)))
    bucket = Bucket(make(cfg["p"]), make(s_dtype), make(s_dtype), make(s_dtype) if amsgrad else None,
                    torch.ones(len(sizes), dtype=torch.int64), prec)
    grads = make(cfg["g"])
    fields = {f.name for f in dataclasses.fields(GroupHyper)}
    lr = 1e-3 if cfg["lr"] is None else torch.tensor(1e-3, dtype=cfg["lr"])
    hyper = GroupHyper(**{"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01,
                          **{k: v for k, v in cfg.items() if k in fields and k != "lr"}, "lr": lr})
    schedule = None
    if cfg["kind"] is not None:
        schedule = type("S", (), {"kind": int(cfg["kind"]), "params": (0.5, float(cfg["n"])) + (1.0,) * 20})()
    stats = torch.zeros(2)
    fold = None
    if cfg.get("fold"):  # GradScaler's scale, its inf check and the step's outputs with the switches
        on = cfg["scale"]
        fold = FoldedUpdate(scale=torch.tensor(2.0) if on else None, skip_nonfinite=on, group=1, advance_k=on,
                            norm_out=torch.zeros(()) if on else None, found_inf_out=torch.zeros(()) if on else None)
    inv = torch.tensor(0.5) if cfg["scale"] and fold is None else None
    ctrl = StepControl(
        k=torch.zeros((), dtype=torch.int64),
        schedule=schedule,
        schedule_table=torch.zeros(24, dtype=torch.float64) if schedule is not None else None,
        stats=stats,
        max_norm=1.0 if cfg["clip"] else None,
        inv_scale=inv,
        found_inf=torch.zeros(()) if cfg["inf"] else None,
    )
    if fold is None:
        backend.grad_stats(bucket, grads, inv, stats)
    else:
        backend.grad_stats(bucket, grads, None, stats, scale=fold.scale, reset=True)
    applied_lr = None
    if cfg["applied"]:
        applied_lr = torch.full((2,), float("nan"), dtype=torch.float64)
        applied_lr = applied_lr if fold is not None else applied_lr[1]
    backend.prepare_update(bucket, grads, hyper, ctrl, applied_lr, fold)()


def record_launches() -> list[Launch]:
    """Every distinct launch of the triton backend over ``_configurations()``."""
    import triton

    import fusedlr.triton  # noqa: F401  (imports the kernel modules)

    launches: dict[Launch, None] = {}
    patched = []

    class Recorder:
        def __init__(self, kernel, module: str) -> None:
            self.kernel, self.module = kernel, module

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.setdefault(_launch_of(self.kernel, self.module, args, kwargs))

            return launch

    for name, module in list(sys.modules.items()):
        if name.startswith("fusedlr.triton.") and module is not None:
            for attr, value in list(vars(module).items()):
                if isinstance(value, triton.runtime.jit.JITFunction):
                    patched.append((module, attr, value))
                    setattr(module, attr, Recorder(value, name))
    try:
        for cfg in _configurations():
            _drive(cfg)
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
    return list(launches)


def coverage_gaps(launches: list[Launch]) -> list[str]:
    """Boolean constexprs of a launched kernel that never took both values."""
    gaps = []
    for module, name in {(la.module, la.name) for la in launches}:
        seen: dict[str, set] = {}
        for la in launches:
            if (la.module, la.name) == (module, name):
                for k, v in la.constexprs:
                    seen.setdefault(k, set()).add(v)
        gaps += [f"{name}.{k}" for k, vs in seen.items() if len(vs) == 1 and isinstance(next(iter(vs)), bool)]
    return sorted(gaps)


def compile_launch(launch: Launch, arch: int, out: Path) -> dict:
    """Compiles one launch for sm_<arch>; writes its cubin; returns its metadata summary."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(launch.module), launch.name)
    names = [n for n, _ in launch.signature]
    constexprs = {(names.index(k),): v for k, v in launch.constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (_, t) in enumerate(launch.signature) if t.startswith("*")}
    src = ASTSource(kernel, dict(launch.signature), constexprs, attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
    path = out / f"{launch.name}-{launch.key}.sm_{arch}.cubin"
    path.write_bytes(compiled.asm["cubin"])
    (out / f"{launch.name}-{launch.key}.json").write_text(
        json.dumps({"constexprs": {k: str(v) for k, v in launch.constexprs}, "signature": dict(launch.signature)})
    )
    return {"cubin": str(path), "seconds": time.perf_counter() - start, "shared": compiled.metadata.shared}


def _compile_one(job: tuple[Launch, int, str]) -> dict:
    return compile_launch(job[0], job[1], Path(job[2]))


def main(argv: list[str]) -> int:
    out, archs = Path(argv[0]), [int(a) for a in argv[1:]] or [90, 80]
    out.mkdir(parents=True, exist_ok=True)
    import triton

    start = time.perf_counter()
    launches = record_launches()
    print(f"triton {triton.__version__}: {len(launches)} distinct launches recorded in "
          f"{time.perf_counter() - start:.1f}s; coverage gaps: {coverage_gaps(launches) or 'none'}", flush=True)
    jobs = [(la, arch, str(out)) for la in launches for arch in archs]
    with ProcessPoolExecutor(2) as pool:
        results = list(pool.map(_compile_one, jobs))
    print(f"compiled {len(results)} cubins for sm_{archs} in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
