"""Drop-in use inside the frameworks our users train with: Hugging Face Trainer (which drives the LR
through its own scheduler and clips through Accelerate) trains identically with fusedlr.AdamW and with
torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch

import fusedlr

transformers = pytest.importorskip("transformers")

CLIP = 0.05  # small enough that every step clips
EPS = 1e-2  # large enough that the clipped gradient scale shows in the update (Adam is scale-invariant)
pytest.importorskip("accelerate")


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels) * 10.0, "logits": out}


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=gen)
        self.y = self.x.sum(-1).sin()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _train(tmp_path, make_opt, max_grad_norm: float = CLIP, constant_scheduler: bool = False) -> _Regression:
    model = _Regression()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=16, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=3, max_grad_norm=max_grad_norm, weight_decay=0.0,
        logging_steps=100, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0,
    )
    opt = make_opt(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0) if constant_scheduler else None
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), optimizers=(opt, sched))
    trainer.train()
    return model


def _assert_trained_alike(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    initial = _Regression()
    assert any(not torch.equal(p, q) for p, q in zip(ours.parameters(), initial.parameters()))
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_trainer_driving_lr_and_clipping_matches_torch_adamw(tmp_path) -> None:
    """schedule=None: Trainer's scheduler sets the LR and Accelerate clips, as with torch's AdamW."""
    ours = _train(tmp_path / "a", lambda m: fusedlr.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0, eps=EPS))
    ref = _train(tmp_path / "b", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0, eps=EPS))
    _assert_trained_alike(ours, ref)


def test_fused_schedule_and_clipping_inside_trainer_match_trainers_own(tmp_path) -> None:
    """The fused recipe: fusedlr owns the schedule and the clipping (Trainer: max_grad_norm=0 and a
    constant scheduler), and trains exactly as Trainer's cosine scheduler + clipping + torch AdamW."""
    sched = fusedlr.get_schedule("cosine", num_warmup_steps=3, num_training_steps=16)
    ours = _train(
        tmp_path / "a",
        lambda m: fusedlr.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0, eps=EPS, schedule=sched, max_grad_norm=CLIP),
        max_grad_norm=0.0,
        constant_scheduler=True,
    )
    ref = _train(tmp_path / "b", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0, eps=EPS))
    _assert_trained_alike(ours, ref)


def test_callback_logs_the_applied_lr_and_the_pre_clip_norm(tmp_path) -> None:
    """The fused recipe with FusedLRCallback: each training log's learning_rate is the LR the last
    update applied (Hugging Face's cosine for that update), with grad_norm and clip_coef."""
    from fusedlr.integrations import FusedLRCallback, constant_scheduler

    model = _Regression()
    opt = fusedlr.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, max_grad_norm=CLIP, history=4,
                        schedule=fusedlr.get_schedule("cosine", num_warmup_steps=3, num_training_steps=16))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=16, max_grad_norm=0.0, logging_steps=4,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(),
                                   optimizers=(opt, constant_scheduler(opt)), callbacks=[FusedLRCallback(opt)])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [4, 8, 12, 16]
    hf_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    hf = transformers.get_scheduler("cosine", hf_opt, num_warmup_steps=3, num_training_steps=16)
    applied = []
    for _ in range(16):
        applied.append(hf_opt.param_groups[0]["lr"])
        hf_opt.step()
        hf.step()
    for h in logs:
        assert h["learning_rate"] == pytest.approx(applied[h["step"] - 1], rel=1e-12)
        assert h["grad_norm"] > 0 and h["clip_coef"] == pytest.approx(min(1.0, CLIP / (h["grad_norm"] + 1e-6)))
        assert h["skipped_steps"] == 0
