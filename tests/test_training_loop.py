"""The training loop around the step: the applied LR and the step history (against torch's AdamW +
LambdaLR + clip_grad_norm_ computed step by step), the double-schedule warning, resuming a torch
scheduler checkpoint, print(opt), param_groups against Hugging Face Trainer, get_schedule's Hugging
Face arguments, and the LR finder."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import fusedlr
from fusedlr.param_groups import decay_parameter_names

LR = 0.05


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(n)]


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch[0]), batch[1])


# ---------------------------------------------------------------- applied LR and history
def test_applied_lr_and_history_match_torch_step_by_step() -> None:
    """applied_lr is the LR of the update just applied (LambdaLR's LR before its step), the history
    holds the last N steps' LR, pre-clip norm and clip coefficient (clip_grad_norm_'s)."""
    sched = fusedlr.get_schedule("cosine", num_warmup_steps=2, num_training_steps=10)
    ref_model, model = _model(), _model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=LR)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, sched)
    opt = fusedlr.AdamW(model.parameters(), lr=LR, schedule=sched, max_grad_norm=0.5, history=4)
    assert math.isnan(float(opt.applied_lr()))
    expected = []
    for batch in _batches(7):
        _loss(ref_model, batch).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5))
        lr = ref.param_groups[0]["lr"]
        ref.step()
        ref.zero_grad()
        ref_sched.step()
        _loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
        assert float(opt.applied_lr()) == pytest.approx(lr, rel=1e-12)
        expected.append((lr, norm, min(1.0, 0.5 / (norm + 1e-6))))
    records = opt.read_history()
    assert records.step == [3, 4, 5, 6] and records.schedule_index == [3, 4, 5, 6]
    assert [r[0] for r in records.lr] == pytest.approx([e[0] for e in expected[3:]], rel=1e-12)
    assert records.grad_norm == pytest.approx([e[1] for e in expected[3:]], rel=1e-5)
    assert records.clip_coef == pytest.approx([e[2] for e in expected[3:]], rel=1e-5)
    assert records.skipped == [False] * 4


def test_a_skipped_step_keeps_the_applied_lr_and_is_recorded() -> None:
    model = _model()
    opt = fusedlr.AdamW(model.parameters(), lr=LR, schedule=fusedlr.get_schedule("linear", 0, 4), history=8)
    for i, batch in enumerate(_batches(3)):
        _loss(model, batch).backward()
        opt.found_inf = torch.tensor(1.0 if i == 1 else 0.0)  # GradScaler's attribute contract
        opt.step()
        opt.zero_grad()
        if i == 0:
            assert float(opt.applied_lr()) == pytest.approx(LR)
        if i == 1:
            assert float(opt.applied_lr()) == pytest.approx(LR)  # unchanged by the skipped step
    records = opt.read_history()
    assert records.skipped == [False, True, False]
    assert records.schedule_index == [0, 1, 1]
    assert [r[0] for r in records.lr] == pytest.approx([LR, LR, LR * 0.75])
    assert math.isnan(records.grad_norm[0])  # no reduction pass ran
    assert records.clip_coef == [1.0, 1.0, 1.0]


def test_history_needs_opting_in_and_a_positive_size() -> None:
    with pytest.raises(RuntimeError, match="history=N"):
        fusedlr.AdamW(_model().parameters()).read_history()
    with pytest.raises(ValueError, match="history"):
        fusedlr.AdamW(_model().parameters(), history=0)


def test_applied_lr_grows_with_add_param_group() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = fusedlr.AdamW([a], lr=LR, history=2)
    opt.add_param_group({"params": [b], "lr": 2 * LR})
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert float(opt.applied_lr(1)) == pytest.approx(2 * LR)
    assert opt.read_history().lr == [[LR, 2 * LR]]


# ---------------------------------------------------------------- double schedule, checkpoints, repr
def test_a_scheduler_changing_lr_with_schedule_set_warns_once() -> None:
    model = _model()
    opt = fusedlr.AdamW(model.parameters(), lr=LR, schedule=fusedlr.get_schedule("linear", 0, 10))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in _batches(4):
            _loss(model, batch).backward()
            opt.step()
            sched.step()
    messages = [str(w.message) for w in caught if "applied twice" in str(w.message)]
    assert len(messages) == 1 and "schedule=None" in messages[0] and "constant_scheduler" in messages[0]


def test_a_constant_scheduler_does_not_warn() -> None:
    from fusedlr.integrations import constant_scheduler

    model = _model()
    opt = fusedlr.AdamW(model.parameters(), lr=LR, schedule=fusedlr.get_schedule("linear", 0, 10))
    sched = constant_scheduler(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in _batches(3):
            _loss(model, batch).backward()
            opt.step()
            sched.step()


def test_torch_checkpoint_resumes_with_initial_lr_as_the_peak() -> None:
    """torch AdamW(fused=True) + a decayed LR scheduler: lr restored to initial_lr, torch-only flags dropped."""
    ref_model = _model()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=LR, fused=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=10)
    for batch in _batches(4):
        _loss(ref_model, batch).backward()
        ref.step()
        sched.step()
    assert ref.param_groups[0]["lr"] < LR
    model = _model()
    opt = fusedlr.AdamW(model.parameters(), lr=1.0, schedule=fusedlr.from_torch_scheduler(sched))
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))
    group = opt.param_groups[0]
    assert group["lr"] == LR and "fused" not in group and "foreach" not in group
    expected_next = ref.param_groups[0]["lr"]  # what torch applies to update 4
    model.load_state_dict(ref_model.state_dict())
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    assert float(opt.applied_lr()) == pytest.approx(expected_next, rel=1e-12)


def test_repr_shows_schedule_clipping_and_the_backend_that_runs() -> None:
    opt = fusedlr.AdamW(_model().parameters(), schedule=fusedlr.get_schedule("linear", 1, 10), max_grad_norm=1.0,
                        backend="torch")
    text = repr(opt)
    assert "schedule: linear(1, 10)" in text and "max_grad_norm: 1.0" in text and "runs: torch" in text
    auto = fusedlr.AdamW(_model().parameters())
    from fusedlr import backends

    assert auto.resolved_backend == backends.resolve("auto", torch.device("cpu")).NAME != "auto"


# ---------------------------------------------------------------- get_schedule with Hugging Face's arguments
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    "name,kwargs",
    [("polynomial", {"lr_end": 1e-4, "power": 2.0}), ("polynomial", {}), ("cosine_with_min_lr", {"min_lr": 0.005}),
     ("cosine_warmup_with_min_lr", {"min_lr": 0.005})],
)
def test_absolute_lrs_come_from_the_optimizer_as_in_get_scheduler(name: str, kwargs: dict) -> None:
    """No lr_init: the schedule takes the peak from the optimizer it is given to, as HF does."""
    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    hf = transformers.get_scheduler(name, torch_opt, num_warmup_steps=3, num_training_steps=20,
                                    scheduler_specific_kwargs=dict(kwargs))
    expected = []
    for _ in range(24):
        expected.append(torch_opt.param_groups[0]["lr"])
        torch_opt.step()
        hf.step()
    sched = fusedlr.get_schedule(name, 3.0, 20.0, scheduler_specific_kwargs=dict(kwargs))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = fusedlr.AdamW([p], lr=LR, schedule=sched, backend="torch")
    got = []
    for _ in range(24):
        p.grad = torch.ones(1)
        opt.step()
        got.append(float(opt.applied_lr()))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="absolute LRs"):
        sched(0)


@pytest.mark.parametrize("total", [None, 0, 2.5, -1])
def test_missing_and_bad_step_counts_read_alike(total: object) -> None:
    with pytest.raises(ValueError, match=r"num_training_steps must be a positive int, got"):
        fusedlr.get_schedule("linear", 0, total)


def test_a_polynomial_end_above_the_optimizer_lr_is_refused() -> None:
    sched = fusedlr.get_schedule("polynomial", 0, 10, lr_end=0.5)
    with pytest.raises(ValueError, match="lr_end"):
        fusedlr.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1, schedule=sched)


# ---------------------------------------------------------------- param_groups against Trainer
class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = torch.nn.Linear(4, 4)
        self.layer_norm = torch.nn.LayerNorm(4)
        self.norm = torch.nn.Linear(4, 4)  # a "norm" name: Trainer exempts it
        self.q_norm = torch.nn.Parameter(torch.ones(4))
        self.rmsnorm_scale = torch.nn.Parameter(torch.ones(4))
        self.LayerNormLike = torch.nn.Parameter(torch.ones(4))
        self.normalizer = torch.nn.Linear(4, 4)  # not a norm: decays


def test_param_groups_split_as_trainer() -> None:
    model = torch.nn.Sequential(_Block(), torch.nn.Embedding(5, 4), _Block())
    model[0].attn.bias.requires_grad_(False)
    args = transformers.TrainingArguments(output_dir="unused", report_to=[], use_cpu=True)
    trainer = transformers.Trainer(model=model, args=args)
    expected = set(trainer.get_decay_parameter_names(model))
    assert set(decay_parameter_names(model)) == expected
    groups = fusedlr.param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == expected and "0.attn.bias" not in no_decay
    assert decay | no_decay == {n for n, p in model.named_parameters() if p.requires_grad}
    fusedlr.AdamW(groups, lr=LR)


# ---------------------------------------------------------------- the LR finder
def test_lr_find_ramps_as_the_formula_and_restores_everything() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    model.eval()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _loss(model, _batches(1)[0]).backward()
    torch_opt.step()  # the optimizer has state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    opt_before = copy.deepcopy(torch_opt.state_dict())
    result = fusedlr.lr_find(model, _loss, _batches(3), start_lr=1e-5, end_lr=1.0, num_iter=20, optimizer=torch_opt,
                             diverge_factor=1e9)
    want = [1e-5 * (1.0 / 1e-5) ** (i / 19) for i in range(20)]
    assert result.lrs == pytest.approx(want, rel=1e-12) and len(result.losses) == 20
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not model.training
    after = torch_opt.state_dict()
    for i, s in opt_before["state"].items():
        for key, value in s.items():
            assert torch.equal(after["state"][i][key], value)


def test_lr_find_suggests_a_working_lr_and_stops_on_divergence() -> None:
    """Linear regression, one full batch: the suggestion trains well; a huge end_lr diverges."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen)
    y = x @ torch.randn(8, 1, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    result = fusedlr.lr_find(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), [(x, y)],
                             start_lr=1e-6, end_lr=100.0, num_iter=100)
    assert result.diverged and len(result.lrs) < 100
    assert 1e-3 <= result.suggested_lr <= 1.0

    def final_loss(lr: float) -> float:
        torch.manual_seed(0)
        m = torch.nn.Linear(8, 1)
        opt = fusedlr.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
        for _ in range(50):
            loss = torch.nn.functional.mse_loss(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(loss.detach())

    assert final_loss(result.suggested_lr) < 0.5 * final_loss(result.suggested_lr / 100)


def test_lr_find_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="start_lr < end_lr"):
        fusedlr.lr_find(_model(), _loss, _batches(1), start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="empty"):
        fusedlr.lr_find(_model(), _loss, [], num_iter=5)


def test_the_plain_loop_example_runs() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "plain_loop.py"
    spec = importlib.util.spec_from_file_location("plain_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    logged = module.main(steps=2 * module.LOG_EVERY)
    assert len(logged) == 2 and all(math.isfinite(v) for v in logged)
