"""Checkpoint refusals: every entry point says in one line (exit 2) whether a checkpoint is missing,
truncated, not weights-only (refused, never run) or of another phase."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import REPO, TINY_FDE, TINY_LMAE, data_args
from microscope_pl.checkpointing import CheckpointError, read_checkpoint
from microscope_pl.cli import main


class _Payload:
    """Unpickling this calls os.system: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def payload(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "payload.ckpt"
    torch.save({"state_dict": {}, "microscope_phase": "phase1", "extra": _Payload(marker)}, path)
    return path, marker


def test_reader_refuses_and_says_why(payload: tuple[Path, Path]) -> None:
    path, marker = payload
    with pytest.raises(CheckpointError, match=r"is not weights-only: loading it would run the code it names "
                                              r"\(posix.system\), so it was refused and never loaded"):
        read_checkpoint(path)
    assert not marker.exists()


ENTRY_POINTS = ["test", "validate", "fit_resume", "fit_upstream", "generate", "latents"]


def _argv(command: str, path: Path, synth_root: Path, tmp_path: Path) -> list[str]:
    """`command` given the checkpoint `path` where it reads one (phase 1 configs, a phase-2 upstream)."""
    phase1 = ["--config", str(REPO / "configs/phase1_fde.yaml"), *data_args(synth_root), *TINY_FDE]
    return {
        "test": ["test", *phase1, "--ckpt_path", str(path)],
        "validate": ["validate", *phase1, "--ckpt_path", str(path)],
        "fit_resume": ["fit", *phase1, "--ckpt_path", str(path), "--trainer.max_steps", "1"],
        "fit_upstream": ["fit", "--config", str(REPO / "configs/phase2_lmae.yaml"), *data_args(synth_root),
                         *TINY_LMAE, "--model.init_args.fde_ckpt_path", str(path), "--trainer.fast_dev_run", "1"],
        "generate": ["generate", "--ckpt-path", str(path), "--image", "astronaut", "--audio",
                     str(next((synth_root / "videos").iterdir()) / "audio.wav"), "--out", str(tmp_path / "o.mp4")],
        "latents": ["latents", "cache", "--data", str(synth_root), "--ckpt-path", str(path),
                    "--out", str(tmp_path / "cache.pt")],
    }[command]


@pytest.mark.parametrize("command", ENTRY_POINTS)
@pytest.mark.parametrize("fault", ["missing", "truncated", "other_phase"])
def test_every_entry_point_says_what_is_wrong(command: str, fault: str, trained: Path, synth_root: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    phase1, phase2 = (trained / f"checkpoints/synth/{p}/last.ckpt" for p in ("phase1", "phase2"))
    if fault == "missing":
        path, expected = tmp_path / "nowhere.ckpt", "not found"
    elif fault == "truncated":
        path, expected = tmp_path / "half.ckpt", "is truncated or corrupt"
        path.write_bytes(phase1.read_bytes()[: phase1.stat().st_size // 2])
    else:  # phase 1 wanted everywhere but by `latents cache` (phase 2)
        path = phase1 if command == "latents" else phase2
        expected = {"latents": "is a phase1 checkpoint, expected a phase2", "generate": "expected a diffusion",
                    "fit_upstream": "is a phase2 checkpoint, expected a phase1"}.get(
            command, "is a phase2 checkpoint, this config's model is phase1")
    assert main(_argv(command, path, synth_root, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and expected in last, err
    assert "Does not validate" not in err and "Traceback" not in err and err.count("error: ") == 1
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "cache.pt").exists()


@pytest.mark.parametrize("command", ENTRY_POINTS)
def test_every_entry_point_refuses_in_one_line(command: str, payload: tuple[Path, Path], synth_root: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    path, marker = payload
    monkeypatch.chdir(tmp_path)
    assert main(_argv(command, path, synth_root, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (pytest may show a logging handler's own error about a closed capture above)
    assert last.startswith("error: ") and "is not weights-only" in last, err
    assert "Does not validate" not in err and err.count("error: ") == 1
    assert not marker.exists()
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "cache.pt").exists()
