"""Two-process CPU DDP (gloo): both ranks must end with identical weights."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_two_process_cpu_ddp_keeps_ranks_identical(synth_root, tmp_path):
    from helpers import SHORT_RUN, TINY_FDE, data_args

    cmd = [sys.executable, "-m", "microscope_pl", "fit", "--config", str(REPO / "configs/phase1_fde.yaml"),
           "--config", str(REPO / "configs/trainer/ddp_cpu.yaml"), *data_args(synth_root), *TINY_FDE, *SHORT_RUN,
           "--trainer.callbacks+=microscope_pl.callbacks.DDPConsistencyCheck"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ddp-consistency: weights identical on 2 ranks" in result.stdout
    assert (tmp_path / "checkpoints/synth/phase1/last.ckpt").is_file()
