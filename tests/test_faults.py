"""Faults during training: one run per checkpoint folder, last.ckpt on a wall-clock interval,
and `kill -9` at random moments of each phase (the next run resumes from a last.ckpt that loads)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from helpers import REPO, TINY_FDE, TINY_LMAE, data_args
from microscope_pl import run_lock
from microscope_pl.callbacks import TimedLastCheckpoint
from microscope_pl.checkpointing import read_checkpoint
from microscope_pl.cli import main
from test_diffusion_cli import CLIPS, TINY_UNET

HOLD = "import sys, time; from microscope_pl import run_lock; run_lock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_is_refused_and_freed_when_its_run_is_killed(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints/synth/phase1"
    proc = _holder(folder)
    try:
        with pytest.raises(run_lock.RunLockedError, match=rf"is in use by run pid {proc.pid} on .*--run NAME"):
            run_lock.acquire(folder)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with run_lock.holding([folder, folder]):  # the same folder twice is one lock
        with pytest.raises(run_lock.RunLockedError, match="already in use by this process"):
            run_lock.acquire(folder)
    run_lock.acquire(folder)  # released by the block
    run_lock.release(folder)


class Slow(LightningModule):
    """A linear layer whose steps take 40 ms, so the wall-clock interval passes within a few steps."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.seen: list[tuple[int, int | None]] = []  # (step, global_step in last.ckpt)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        time.sleep(0.04)
        return self.layer(batch[0]).pow(2).mean()

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        last = Path(self.trainer.default_root_dir) / "ckpt/last.ckpt"
        saved = read_checkpoint(last)["global_step"] if last.exists() else None
        self.seen.append((self.trainer.global_step, saved))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_last_ckpt_is_also_written_on_a_wall_clock_interval(tmp_path: Path) -> None:
    model = Slow()
    steps = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=0, save_last=True, every_n_train_steps=1000)
    trainer = Trainer(max_steps=30, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[TimedLastCheckpoint(minutes=0.25 / 60), steps])
    data = DataLoader(TensorDataset(torch.randn(120, 4)), batch_size=4)
    trainer.fit(model, data)
    saved = [s for _, s in model.seen if s is not None]
    assert saved, "no last.ckpt during the run: the step interval alone (1000) never came"
    assert model.seen[len(model.seen) // 2][1] is not None, "nothing written in the first half"
    assert len(set(saved)) >= 3 and all(s <= step for step, s in model.seen if s is not None), model.seen
    with pytest.raises(ValueError, match="minutes must be > 0"):
        TimedLastCheckpoint(0)


# ------------------------------------------------------------------ kill -9
TIMED = ["--trainer.callbacks+=microscope_pl.callbacks.TimedLastCheckpoint", "--trainer.callbacks.minutes=0.003"]
PBNET_TINY = ["--model.init_args.network.d_model", "16", "--model.init_args.network.num_heads", "2",
              "--model.init_args.network.num_layers", "1", "--model.init_args.network.latent_dim", "8", *CLIPS]
PHASES = {  # phase: (config, tiny settings, random kills)
    "phase1": ("phase1_fde.yaml", TINY_FDE, 3),
    "phase2": ("phase2_lmae.yaml", TINY_LMAE, 1),
    "pbnet": ("pbnet.yaml", PBNET_TINY, 1),
    "diffusion": ("diffusion.yaml", TINY_UNET + CLIPS, 1),
}


def _fit_command(phase: str, root: Path, max_steps: int) -> list[str]:
    config, tiny, _ = PHASES[phase]
    return ["fit", "--config", str(REPO / "configs" / config), *data_args(root), *tiny, *TIMED,
            "--data.init_args.samples_per_video", "50", "--trainer.max_steps", str(max_steps),
            "--trainer.check_val_every_n_epoch", "1000"]


def _start(phase: str, root: Path, cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "microscope_pl", *_fit_command(phase, root, 100000)],
                                cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> None:
    """Until `proc` writes `path` (a new file or a new version of it)."""
    before, end = _mtime(path), time.monotonic() + timeout
    while _mtime(path) in (None, before):
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.005)


@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_at_random_moments_leaves_a_last_ckpt_that_loads_and_resumes(
        phase: str, trained: Path, synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Each run is killed at a random moment after training started (the first kill of phase 1
    while last.ckpt is being written); its last.ckpt must load and the next run resume from it."""
    work = tmp_path / "work"
    work.mkdir()
    if phase in ("phase2", "diffusion"):  # their frozen upstream phases
        upstream = {"phase2": ["phase1"], "diffusion": ["phase1", "phase2"]}[phase]
        for name in upstream:
            (work / f"checkpoints/synth/{name}").mkdir(parents=True)
            os.symlink(trained / f"checkpoints/synth/{name}/last.ckpt", work / f"checkpoints/synth/{name}/last.ckpt")
    folder = work / f"checkpoints/synth/{phase}"
    last = folder / "last.ckpt"
    rng = random.Random(f"kill-{phase}")
    steps = []
    for kill in range(PHASES[phase][2]):
        log = tmp_path / f"run{kill}.log"
        proc = _start(phase, synth_root, work, log)
        try:
            if kill == 0 and phase == "phase1":
                _wait_for(folder / "last.ckpt.tmp", proc, log)  # mid-write
            else:
                _wait_for(last, proc, log)
                time.sleep(rng.uniform(0.0, 2.0))
            if kill == 0:  # while the run holds its folder, a second run into it is refused in one line
                monkeypatch.chdir(work)
                capsys.readouterr()
                assert main(_fit_command(phase, synth_root, 5)) == 2
                assert f"is in use by run pid {proc.pid}" in capsys.readouterr().err
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert not (folder / "last.ckpt.tmp").exists() or last.exists()
        if kill:
            assert "resuming from" in log.read_text(), log.read_text()[-2000:]
        steps.append(read_checkpoint(last)["global_step"] if last.exists() else 0)
    assert steps == sorted(steps), f"a rerun started over: {steps}"
    log = tmp_path / "final.log"
    final = subprocess.run([sys.executable, "-m", "microscope_pl", *_fit_command(phase, synth_root, steps[-1] + 2)],
                           cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    if steps[-1]:
        assert "resuming from" in final.stdout, final.stdout[-2000:]
    assert read_checkpoint(last)["global_step"] == steps[-1] + 2
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"], "a resumed run wrote a last-v1.ckpt"
