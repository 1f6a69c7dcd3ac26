"""Checkpoints whose loading would run code are refused by every entry point, in one line, and never run."""
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


@pytest.mark.parametrize("command", ["test", "fit_upstream", "generate", "latents"])
def test_every_entry_point_refuses_in_one_line(command: str, payload: tuple[Path, Path], synth_root: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    path, marker = payload
    monkeypatch.chdir(tmp_path)
    argv = {
        "test": ["test", "--config", str(REPO / "configs/phase1_fde.yaml"), *data_args(synth_root), *TINY_FDE,
                 "--ckpt_path", str(path)],
        "fit_upstream": ["fit", "--config", str(REPO / "configs/phase2_lmae.yaml"), *data_args(synth_root),
                         *TINY_LMAE, "--model.init_args.fde_ckpt_path", str(path), "--trainer.fast_dev_run", "1"],
        "generate": ["generate", "--ckpt-path", str(path), "--image", "astronaut", "--audio",
                     str(next((synth_root / "videos").iterdir()) / "audio.wav"), "--out", str(tmp_path / "o.mp4")],
        "latents": ["latents", "cache", "--data", str(synth_root), "--ckpt-path", str(path),
                    "--out", str(tmp_path / "cache.pt")],
    }[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (pytest may show a logging handler's own error about a closed capture above)
    assert last.startswith("error: ") and "is not weights-only" in last, err
    assert "Does not validate" not in err and err.count("error: ") == 1
    assert not marker.exists()
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "cache.pt").exists()
