"""Non-finite losses: the step is skipped and counted; N in a row stop the run and leave last.ckpt alone."""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from microscope_pl.callbacks import NonFiniteLossError, NonFiniteLossGuard, TimedLastCheckpoint
from microscope_pl.modules.base import PhaseModule


class Toy(LightningModule):
    """A linear layer whose loss is NaN at the optimizer steps in ``nan_steps``."""

    def __init__(self, nan_steps: range) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_steps = nan_steps
        self.before: list[torch.Tensor] | None = None
        self.on_nan = lambda: None

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = (self.layer(batch[0]) - 1).pow(2).mean()
        self.before = None
        if self.trainer.global_step in self.nan_steps:
            self.before = [p.detach().clone() for p in self.parameters()]
            self.on_nan()
            loss = loss * float("nan")
        return loss

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        if self.before is not None:
            assert all(torch.equal(a, b) for a, b in zip(self.before, self.parameters())), "a skipped step moved"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.05)


def _trainer(max_steps: int, *callbacks: object) -> Trainer:
    return Trainer(max_steps=max_steps, callbacks=list(callbacks), accelerator="cpu", logger=False,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                   enable_progress_bar=False, enable_model_summary=False)


def _data() -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(64, 4, generator=torch.Generator().manual_seed(0))), batch_size=4)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    model, guard = Toy(range(3, 5)), NonFiniteLossGuard(max_consecutive=3)
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = _trainer(8, guard)
    trainer.fit(model, _data())
    assert trainer.global_step == 8 and guard.skipped == 2 and guard.streak == 0
    assert float(trainer.callback_metrics["train/nonfinite_steps"]) == 2.0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(initial, model.parameters())), "the finite steps trained"


def test_a_streak_stops_the_run_naming_steps_and_untouched_last_ckpt(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    last = tmp_path / "ckpt/last.ckpt"
    checkpoint = ModelCheckpoint(dirpath="ckpt", save_top_k=0, save_last=True, every_n_train_steps=3,
                                 save_on_exception=True)
    model = Toy(range(4, 10**6))
    seen: dict[str, str] = {}
    model.on_nan = lambda: seen.setdefault("sha256", _sha256(last))  # written at step 3, before the NaNs
    with pytest.raises(NonFiniteLossError) as err:
        _trainer(50, NonFiniteLossGuard(max_consecutive=5), checkpoint).fit(model, _data())
    assert str(err.value) == ("loss was non-finite for 5 steps in a row (steps 4-8); the last good checkpoint "
                              "is ckpt/last.ckpt (step 3), untouched")
    assert _sha256(last) == seen["sha256"], "no save during the streak (step 6) nor on the way out"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_phase_modules_get_a_guard_unless_configured() -> None:
    guard, timed = PhaseModule.configure_callbacks(SimpleNamespace(_trainer=None))
    assert isinstance(guard, NonFiniteLossGuard) and guard.max_consecutive == 10
    assert isinstance(timed, TimedLastCheckpoint) and timed.minutes == 5.0
    configured = SimpleNamespace(_trainer=SimpleNamespace(callbacks=[NonFiniteLossGuard(3)]))
    assert [type(c) for c in PhaseModule.configure_callbacks(configured)] == [TimedLastCheckpoint]
    with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
        NonFiniteLossGuard(0)
