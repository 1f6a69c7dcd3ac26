"""Training callbacks shared by the phases."""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class DDPConsistencyCheck(Callback):
    """At the end of fit, compare the weights of every rank and fail loudly if
    they differ (a desynchronised DDP run would otherwise go unnoticed)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        digest = weights_digest(pl_module)
        code = torch.tensor([int(digest[:15], 16)], dtype=torch.int64, device=pl_module.device)
        codes = pl_module.all_gather(code).reshape(-1).tolist()
        if len(set(codes)) != 1:
            raise RuntimeError(f"DDP ranks ended with different weights: {codes}")
        if trainer.is_global_zero:
            print(f"ddp-consistency: weights identical on {trainer.world_size} ranks (sha256 {digest[:16]})", flush=True)


class NonFiniteLossError(ValueError):
    """The loss stayed NaN/inf for ``max_consecutive`` steps (a ValueError: the CLI prints one line)."""


class NonFiniteLossGuard(Callback):
    """Skip optimizer steps whose loss is NaN or inf; stop after ``max_consecutive`` in a row.

    Every micro-batch's loss is checked before backward; at the optimizer step the
    verdict is agreed over all ranks (one non-finite rank skips the step on every
    rank, so DDP stays in step), the gradients are dropped (``grad = None``: the
    optimizer leaves those weights and its moments alone) and ``train/nonfinite_steps``
    counts it. While a streak lasts no checkpoint is written, so ``last.ckpt`` keeps
    the weights of before it; when the streak reaches ``max_consecutive`` the run
    stops with NonFiniteLossError naming the steps and that checkpoint, untouched
    (also with ModelCheckpoint's ``save_on_exception``).

    Args:
        max_consecutive: non-finite steps in a row that stop the run.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0  # steps skipped in this run
        self.streak = 0  # of them, in a row up to the last step
        self.streak_start = -1
        self._finite: torch.Tensor | None = None  # all micro-batch losses since the last step finite

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._finite is None or not pl_module.automatic_optimization:
            return
        local, self._finite = bool(self._finite), None
        if trainer.strategy.reduce_boolean_decision(local, all=True):
            self.streak = 0
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        step = trainer.global_step
        self.skipped += 1
        self.streak_start = step if self.streak == 0 else self.streak_start
        self.streak += 1
        if self.streak >= self.max_consecutive:
            for callback in trainer.checkpoint_callbacks:  # nothing is written on the way out
                if hasattr(callback, "save_on_exception"):
                    callback.save_on_exception = False
            raise NonFiniteLossError(self._message(trainer, step))
        if trainer.is_global_zero:
            where = " on another rank" if local else ""
            print(f"step {step}: the loss is non-finite{where}; optimizer step skipped "
                  f"({self.streak} in a row, {self.skipped} in all)", flush=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.log("train/nonfinite_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if self.streak:  # ModelCheckpoint (run after us) takes this step as saved and writes nothing
            for callback in trainer.checkpoint_callbacks:
                if hasattr(callback, "_last_global_step_saved"):
                    callback._last_global_step_saved = trainer.global_step

    def _message(self, trainer: Trainer, step: int) -> str:
        steps = f"steps {self.streak_start}-{step}" if step > self.streak_start else f"step {step}"
        path, saved = last_checkpoint(trainer)
        if path is None:
            where = "no checkpoint was written before it"
        else:
            where = f"the last good checkpoint is {path}{f' (step {saved})' if saved is not None else ''}, untouched"
        return f"loss was non-finite for {self.streak} steps in a row ({steps}); {where}"


def last_checkpoint(trainer: Trainer) -> tuple[str | None, int | None]:
    """(path, global step) of the run's newest checkpoint: a last.ckpt if there is one, else the best."""
    paths = []
    for callback in trainer.checkpoint_callbacks:
        last, dirpath = getattr(callback, "last_model_path", ""), getattr(callback, "dirpath", None)
        paths.append(last or (os.path.join(dirpath, "last.ckpt") if dirpath and callback.save_last else ""))
    paths += [getattr(callback, "best_model_path", "") for callback in trainer.checkpoint_callbacks]
    for path in paths:
        if path and os.path.isfile(path):
            try:
                step = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
            except Exception:  # noqa: BLE001 - any unreadable file: name it without a step
                step = None
            rel = os.path.relpath(path)
            return (rel if not rel.startswith("..") else path), step
    return None, None


class TimedLastCheckpoint(Callback):
    """Also write each save_last ModelCheckpoint's `last.ckpt` every `minutes` of wall-clock
    training, so a killed run loses at most that much, however slow its steps are.

    Rank 0's clock decides for all ranks (saving is collective). No save during a
    non-finite streak (NonFiniteLossGuard), so `last.ckpt` keeps the weights of before it.
    The write goes through the trainer's checkpoint IO (atomic, modules/checkpoint_io.py).

    Args:
        minutes: wall-clock interval between saves (> 0).
    """

    def __init__(self, minutes: float = 5.0) -> None:
        if not minutes > 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        self.minutes = float(minutes)
        self._since = time.monotonic()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._since = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        due = time.monotonic() - self._since >= self.minutes * 60.0
        if not trainer.strategy.broadcast(due, src=0):
            return
        if any(getattr(c, "streak", 0) for c in trainer.callbacks if isinstance(c, NonFiniteLossGuard)):
            return
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None)
            if getattr(callback, "save_last", False) and dirpath:
                # its last_model_path goes into the state saved, so the resumed callback writes
                # last.ckpt again (not a last-v1.ckpt beside a file it would not know as its own)
                callback.last_model_path = os.path.join(dirpath, "last.ckpt")
                trainer.save_checkpoint(callback.last_model_path, weights_only=False)  # full state: it resumes
        self._since = time.monotonic()
