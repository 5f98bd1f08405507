"""PyTorch's generic optimizer checks (the ``TestOptimRenewed`` CPU tests of PyTorch's ``test/test_optim.py``)
run against ``fusedlr.AdamW``, driven by an ``OptimizerInfo`` cloned from torch's own AdamW entry in
``torch.testing._internal.common_optimizers`` (shipped in the torch wheel): the same configurations, error
inputs and scheduler inputs, with only the configurations that set torch's global implementation flags
(foreach, fused, capturable, differentiable) filtered out. See README.md here for what is covered and why
PyTorch's file itself is not vendored.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal import common_optimizers as co

import fusedlr
from fusedlr import backends

DEVICE = "cpu"
GLOBAL_FLAGS = ("foreach", "fused", "capturable", "differentiable")
TORCH_ADAMW_INFO = next(info for info in co.optim_db if info.optim_cls is torch.optim.AdamW)

#: Error inputs whose expectation fusedlr deliberately changes (issue 12, defect F): torch only warns about
#: a parameter listed twice in one group and then updates it twice per step; fusedlr refuses it.
CHANGED_ERRORS = {
    "a param group cannot have duplicate parameters": (ValueError, "lists a parameter more than once"),
}


def _no_global_flags(kwargs: dict) -> bool:
    return not any(flag in kwargs for flag in GLOBAL_FLAGS)


class FusedlrAdamWInfo(co.OptimizerInfo):
    """torch's AdamW ``OptimizerInfo`` with ``fusedlr.AdamW`` as the class and the global flags filtered."""

    def __init__(self) -> None:
        self.__dict__.update(copy.copy(TORCH_ADAMW_INFO.__dict__))
        self.optim_cls = fusedlr.AdamW
        self.optim_inputs_func = self._inputs
        self.optim_error_inputs_func = self._error_inputs
        self.supported_impls = ()
        self.not_og_supported_flags = tuple(f for f in TORCH_ADAMW_INFO.not_og_supported_flags if f not in GLOBAL_FLAGS)
        self.has_capturable_arg = False
        self.supports_fused_on = ()

    @property
    def name(self) -> str:
        return "fusedlr.AdamW"

    @staticmethod
    def _inputs(device: str, dtype: torch.dtype | None = None) -> list[co.OptimizerInput]:
        return [i for i in TORCH_ADAMW_INFO.optim_inputs_func(device, dtype) if _no_global_flags(i.kwargs)]

    @staticmethod
    def _error_inputs(device: str, dtype: torch.dtype) -> list[co.ErrorOptimizerInput]:
        inputs = []
        for e in TORCH_ADAMW_INFO.optim_error_inputs_func(device, dtype):
            if not _no_global_flags(e.optimizer_error_input.kwargs):
                continue
            if e.optimizer_error_input.desc in CHANGED_ERRORS:
                e.error_type, e.error_regex = CHANGED_ERRORS[e.optimizer_error_input.desc]
            inputs.append(e)
        return inputs


INFO = FusedlrAdamWInfo()


BACKENDS = [name for name in ("torch", "cpu") if backends.unavailable(name, torch.device(DEVICE)) is None]


def make(backend: str, params, **kwargs) -> fusedlr.AdamW:
    return INFO.optim_cls(params, backend=backend, **kwargs)


def inputs(dtype: torch.dtype = torch.float32) -> list[co.OptimizerInput]:
    return INFO.optim_inputs_func(device=DEVICE, dtype=dtype)


def linear_params(contiguous: bool = True, dtype: torch.dtype = torch.float32) -> tuple[Parameter, Parameter]:
    if contiguous:
        return Parameter(torch.randn(10, 5, dtype=dtype)), Parameter(torch.randn(10, dtype=dtype))
    return Parameter(torch.randn(10, 5, 2, dtype=dtype)[..., 0]), Parameter(torch.randn(10, 2, dtype=dtype)[..., 0])


def run_schedulers(schedulers: list, loss: torch.Tensor) -> None:
    for s in schedulers:
        s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()


# ------------------------------------------------------------------ the OptimizerInfo itself
def test_info_is_torchs_adamw_entry_minus_global_flags() -> None:
    expected = [i.desc for i in TORCH_ADAMW_INFO.optim_inputs_func(DEVICE, torch.float32) if _no_global_flags(i.kwargs)]
    assert [i.desc for i in inputs()] == expected and expected
    assert INFO.supports_complex and INFO.supports_param_groups
    assert INFO.scheduler_inputs is TORCH_ADAMW_INFO.scheduler_inputs


# ------------------------------------------------------------------ errors
def test_errors() -> None:
    for error_input in INFO.optim_error_inputs_func(device=DEVICE, dtype=torch.float32):
        optim_input = error_input.optimizer_error_input
        params = optim_input.params if optim_input.params is not None else [Parameter(torch.randn(1, 1))]
        expect = (
            pytest.warns(error_input.error_type, match=error_input.error_regex)
            if issubclass(error_input.error_type, Warning)
            else pytest.raises(error_input.error_type, match=error_input.error_regex)
        )
        with expect:
            if error_input.error_on == co.OptimizerErrorEnum.CONSTRUCTION_ERROR:
                INFO.optim_cls(params, **optim_input.kwargs)
            else:
                INFO.optim_cls(params, **optim_input.kwargs).step()


# ------------------------------------------------------------------ the update goes the right way
def loss_change(backend: str, contiguous: bool, groups, kwargs: dict, scheduler_constructors) -> tuple[float, float]:
    """(initial, final) loss of ``|W x + b|^2`` over 20 steps; ``groups`` maps (W, b) to the params argument."""
    torch.manual_seed(0)
    weight, bias = linear_params(contiguous)
    x = torch.randn(5)
    opt = make(backend, groups(weight, bias), **kwargs)
    schedulers = [s(opt) for s in scheduler_constructors]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(20):
        run_schedulers(schedulers, opt.step(closure))
    return initial, closure().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_lrsched", [True, False])
@pytest.mark.parametrize("contiguous", [True, False])
def test_forloop_goes_right_direction(backend: str, with_lrsched: bool, contiguous: bool) -> None:
    for scheduler_constructors in INFO.scheduler_inputs if with_lrsched else [[]]:
        for optim_input in inputs():
            initial, final = loss_change(backend, contiguous, lambda w, b: [w, b], optim_input.kwargs,
                                         scheduler_constructors)
            assert final > initial if optim_input.kwargs.get("maximize", False) else final < initial, optim_input.desc


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_group_with_lrscheduler_goes_right_direction(backend: str) -> None:
    for scheduler_constructors in INFO.scheduler_inputs:
        initial, final = loss_change(backend, True, lambda w, b: [{"params": [w]}, {"params": [b], "lr": 0.01}], {},
                                     scheduler_constructors)
        assert final < initial


# ------------------------------------------------------------------ against torch's forloop AdamW
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_forloop(backend: str) -> None:
    """torch's suite checks each fast implementation against the forloop one: fusedlr against torch's forloop
    AdamW, params and states, with a layer frozen for two iterations and an iteration without gradients."""
    for optim_input in inputs():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(2, 3), torch.nn.Sigmoid(), torch.nn.Linear(3, 1), torch.nn.Sigmoid()
        )
        twin = copy.deepcopy(model)
        x = torch.rand(2)
        ours = make(backend, model.parameters(), **optim_input.kwargs)
        ref = torch.optim.AdamW(twin.parameters(), foreach=False, **optim_input.kwargs)
        for i in range(7):
            for m, o in ((model, ours), (twin, ref)):
                o.zero_grad()
                if i == 3:
                    m[2].requires_grad_(False)
                if i == 5:
                    m[2].requires_grad_(True)
                if i != 2:
                    m(x).sum().backward()
                o.step()
            for p, r in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p, r, msg=lambda m: f"{optim_input.desc}, iteration {i}: {m}")
                for key, value in ref.state[r].items():
                    if key == "step":
                        assert int(ours.state[p][key]) == int(value)
                    else:
                        torch.testing.assert_close(ours.state[p][key], value)


# ------------------------------------------------------------------ tensor lr
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_lr(backend: str) -> None:
    """A tensor lr (read on the device by every backend) equals the float lr."""
    for optim_input in inputs():
        torch.manual_seed(0)
        weight, bias = linear_params()
        weight_c, bias_c = _copies(weight, bias)
        x = torch.randn(5)
        kwargs = {**optim_input.kwargs, "lr": 1e-3}
        opt_r = make(backend, [weight, bias], **kwargs)
        opt = make(backend, [weight_c, bias_c], **{**kwargs, "lr": torch.tensor(1e-3)})
        for _ in range(5):
            for o, w, b in ((opt_r, weight, bias), (opt, weight_c, bias_c)):
                o.zero_grad()
                (w.mv(x) + b).pow(2).sum().backward()
                o.step()
            torch.testing.assert_close(weight, weight_c)
            torch.testing.assert_close(bias, bias_c)


# ------------------------------------------------------------------ complex
@pytest.mark.parametrize("backend", BACKENDS)
def test_complex(backend: str) -> None:
    """Complex params (mixed with a real one) step exactly as their view_as_real twins."""
    for optim_input in inputs(torch.complex64):
        torch.manual_seed(0)
        complex_params = [torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, 5, requires_grad=True)]
        real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                       for p in complex_params]
        complex_opt = make(backend, complex_params, **optim_input.kwargs)
        real_opt = make(backend, real_params, **optim_input.kwargs)
        for _ in range(3):
            for c, r in zip(complex_params, real_params):
                r.grad = torch.randn_like(r)
                c.grad = torch.view_as_complex(r.grad) if c.is_complex() else r.grad.clone()
            real_opt.step()
            complex_opt.step()
            for c, r in zip(complex_params, real_params):
                assert torch.equal(torch.view_as_real(c) if c.is_complex() else c, r), optim_input.desc


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_2d(backend: str) -> None:
    """A complex param and its real and imaginary parts as two real params follow the same path."""
    for optim_input in inputs(torch.complex64):
        torch.manual_seed(0)
        a1 = torch.randn(2, dtype=torch.complex64, requires_grad=True)
        a1_real = a1.real.detach().clone().requires_grad_()
        a1_imag = a1.imag.detach().clone().requires_grad_()
        opt1 = make(backend, [a1], **optim_input.kwargs)
        opt2 = make(backend, [a1_real, a1_imag], **optim_input.kwargs)
        rosenbrock = lambda t: (1 - t[0]) ** 2 + 100 * (t[1] - t[0] ** 2) ** 2  # noqa: E731
        for _ in range(3):
            opt1.zero_grad()
            opt2.zero_grad()
            rosenbrock(a1).abs().backward()
            rosenbrock(torch.complex(a1_real, a1_imag)).abs().backward()
            torch.testing.assert_close(a1.grad.real, a1_real.grad)
            torch.testing.assert_close(a1.grad.imag, a1_imag.grad)
            opt1.step()
            opt2.step()
            torch.testing.assert_close(a1.real, a1_real)
            torch.testing.assert_close(a1.imag, a1_imag)


# ------------------------------------------------------------------ no-op steps
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_noop_when_params_have_no_grad(backend: str) -> None:
    for optim_input in inputs():
        params = [torch.randn(2, 3, requires_grad=True) for _ in range(2)]
        old = [p.detach().clone() for p in params]
        opt = make(backend, params, **optim_input.kwargs)
        opt.step()
        assert all(torch.equal(p, o) for p, o in zip(params, old)) and len(opt.state) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_is_noop_for_zero_grads(backend: str) -> None:
    for optim_input in inputs():
        if optim_input.kwargs.get("weight_decay", 1e-2) != 0:  # AdamW decays params even with zero grads
            optim_input.kwargs["weight_decay"] = 0.0
        param = torch.randn(5, 1, requires_grad=True)
        old = param.detach().clone()
        opt = make(backend, [param], **optim_input.kwargs)
        param.grad = torch.zeros_like(param)
        opt.step()
        assert torch.equal(param, old), optim_input.desc


def test_optimizer_can_be_printed() -> None:
    opt = make("torch", [Parameter(torch.randn(2, 3))], lr=0.5)
    assert "AdamW" in repr(opt) and "lr: 0.5" in repr(opt)


# ------------------------------------------------------------------ state_dict
def _train(opt, params: list[torch.Tensor], steps: int, x: torch.Tensor) -> None:
    for _ in range(steps):
        opt.zero_grad()
        (params[0].mv(x) + params[1]).pow(2).sum().backward()
        opt.step()


def _trained(backend: str, kwargs: dict, steps: int) -> tuple[fusedlr.AdamW, Parameter, Parameter, torch.Tensor]:
    """A seeded linear model's (weight, bias) after ``steps`` updates, its optimizer and input."""
    torch.manual_seed(0)
    weight, bias = linear_params()
    x = torch.randn(5)
    opt = make(backend, [weight, bias], **kwargs)
    _train(opt, [weight, bias], steps, x)
    return opt, weight, bias, x


def _copies(weight: Parameter, bias: Parameter) -> tuple[Parameter, Parameter]:
    return Parameter(weight.detach().clone()), Parameter(bias.detach().clone())


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_deterministic(backend: str) -> None:
    for optim_input in inputs():
        opt, weight, bias, x = _trained(backend, optim_input.kwargs, 3)
        weight_c, bias_c = _copies(weight, bias)
        opt_c = make(backend, [weight_c, bias_c], **optim_input.kwargs)
        sd = copy.deepcopy(opt.state_dict())
        sd_c = copy.deepcopy(opt.state_dict())
        opt_c.load_state_dict(sd_c)
        for _ in range(5):
            _train(opt, [weight, bias], 1, x)
            _train(opt_c, [weight_c, bias_c], 1, x)
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
        torch.testing.assert_close(sd, sd_c)  # loading did not modify it
        torch.testing.assert_close(opt.state_dict(), opt_c.state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_can_load_older_state_dict(backend: str) -> None:
    """A state dict from before the flags were added (no ``maximize``), with a python-number step."""
    for optim_input in inputs():
        opt, weight, bias, x = _trained(backend, optim_input.kwargs, 3)
        sd = copy.deepcopy(opt.state_dict())
        for group in sd["param_groups"]:
            for flag in INFO.not_og_supported_flags:
                group.pop(flag, None)
        for state in sd["state"].values():
            state["step"] = state["step"].item()
        weight_c, bias_c = _copies(weight, bias)
        opt_c = make(backend, [weight_c, bias_c], **optim_input.kwargs)
        opt_c.load_state_dict(sd)
        _train(opt_c, [weight_c, bias_c], 2, x)
        _train(opt, [weight, bias], 2, x)
        if not optim_input.kwargs.get("maximize", False):  # an old checkpoint cannot say it maximized
            assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c), optim_input.desc


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_equality_with_weights_only(backend: str) -> None:
    for optim_input in inputs():
        opt, _, _, _ = _trained(backend, optim_input.kwargs, 2)
        sd = opt.state_dict()
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        torch.testing.assert_close(loaded, sd)
        opt.load_state_dict(loaded)
        torch.testing.assert_close(opt.state_dict(), sd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepcopy_copies_all_public_attrs(backend: str) -> None:
    for optim_input in inputs():
        opt = make(backend, [Parameter(torch.randn(2, 3))], **optim_input.kwargs)
        public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
        assert public(opt) == public(copy.deepcopy(opt))


# ------------------------------------------------------------------ param groups
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key,values", [("lr", (1e-2, 1e-3)), ("weight_decay", (0.1, 0.0))])
def test_param_groups_equal_separate_optimizers(backend: str, key: str, values: tuple[float, float]) -> None:
    """Two groups with different ``key`` behave as two optimizers, one per group."""
    for optim_input in inputs():
        torch.manual_seed(0)
        params = [Parameter(torch.randn(4, 3)), Parameter(torch.randn(3))]
        twins = [Parameter(p.detach().clone()) for p in params]
        kwargs = {k: v for k, v in optim_input.kwargs.items() if k != key}
        grouped = make(backend, [{"params": [p], key: v} for p, v in zip(params, values)], **kwargs)
        separate = [make(backend, [t], **{**kwargs, key: v}) for t, v in zip(twins, values)]
        for step in range(4):
            g = torch.Generator().manual_seed(step)
            for p, t in zip(params, twins):
                p.grad = torch.randn(p.shape, generator=g)
                t.grad = p.grad.clone()
            grouped.step()
            for o in separate:
                o.step()
        for p, t in zip(params, twins):
            assert torch.equal(p, t), optim_input.desc


# ------------------------------------------------------------------ hooks
def test_all_hooks_fire_in_order() -> None:
    """Step pre/post hooks, global ones, state_dict and load_state_dict hooks: torch's machinery, kept."""
    param = Parameter(torch.randn(3))
    param.grad = torch.ones(3)
    opt = make("torch", [param])
    calls: list[str] = []
    handles = [
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
        opt.register_state_dict_pre_hook(lambda o: (calls.append("sd pre"), o.state.__setitem__("test", 1))),
        opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd post")),
        opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre")),
        opt.register_load_state_dict_post_hook(lambda o: calls.append("load post")),
    ]
    try:
        opt.step()
        sd = opt.state_dict()
        assert sd["state"]["test"] == 1  # an entry a hook adds to the state is saved, and loaded back
        del opt.state["test"]
        opt.load_state_dict(sd)
        assert opt.state["test"] == 1
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", "post", "global post", "sd pre", "sd post", "load pre", "load post"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_empty_state(backend: str) -> None:
    for optim_input in inputs():
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        opt = make(backend, model.parameters(), **optim_input.kwargs)
        model(torch.randn(4, 2)).sum().backward()
        opt.step()
        for p in model.parameters():
            assert opt.state[p] and all(isinstance(v, torch.Tensor) for v in opt.state[p].values())
        assert len(opt.state_dict()["state"]) == 4
