"""The phase registry: finding, refusing and freezing upstream checkpoints."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from microscope_pl.checkpointing import CheckpointError, file_sha256, read_checkpoint
from microscope_pl.modules.checkpoint_io import AtomicCheckpointIO
from microscope_pl.phases import (
    ORDER,
    PHASES,
    count_parameters,
    find_checkpoint,
    load_frozen,
    load_upstream,
    require_equal,
    sub_state_dict,
)


def _save(path, phase, state=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state or {"fde.w": torch.ones(2)}, "microscope_phase": phase,
                "hyper_parameters": {"image_size": 64}}, path)
    return path


def test_registry_order_and_upstreams():
    assert ORDER == ["phase1", "phase2", "pbnet", "diffusion"]
    assert PHASES["phase2"].upstream == "phase1" and PHASES["diffusion"].upstream == "phase2"
    for phase in PHASES.values():
        assert phase.config.startswith("configs/") and phase.config.endswith(".yaml")


def test_find_checkpoint_prefers_explicit_then_best_then_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="no phase1 checkpoint"):
        find_checkpoint("phase1")
    last = _save(tmp_path / "checkpoints/synth/phase1/last.ckpt", "phase1")
    assert find_checkpoint("phase1") == last.relative_to(tmp_path)
    best = _save(tmp_path / "checkpoints/synth/phase1/best.ckpt", "phase1")
    assert find_checkpoint("phase1") == best.relative_to(tmp_path)
    other = _save(tmp_path / "elsewhere.ckpt", "phase1")
    assert find_checkpoint("phase1", str(other)) == other
    with pytest.raises(CheckpointError, match="not found"):
        find_checkpoint("phase1", str(tmp_path / "missing.ckpt"))


def test_load_upstream_refuses_wrong_phase_and_records_sha(tmp_path):
    path = _save(tmp_path / "p2.ckpt", "phase2")
    with pytest.raises(CheckpointError, match="is a phase2 checkpoint, expected a phase1 checkpoint"):
        load_upstream("phase1", str(path))
    good = _save(tmp_path / "p1.ckpt", "phase1")
    ckpt, info = load_upstream("phase1", str(good))
    assert info == {"path": str(good), "sha256": file_sha256(good)}
    assert sub_state_dict(ckpt, "fde")["w"].sum() == 2


def test_truncated_and_foreign_checkpoints_give_one_line_errors(tmp_path):
    good = _save(tmp_path / "good.ckpt", "phase1")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        read_checkpoint(truncated)
    assert "\n" not in str(err.value)
    text = tmp_path / "text.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(text)


def test_require_equal_names_both_values():
    require_equal("image_size", 128, 128)
    with pytest.raises(ValueError, match="this phase has 128, the upstream checkpoint has 256"):
        require_equal("image_size", 128, 256)


def test_load_frozen_stays_in_eval_without_gradients():
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3))
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    frozen = load_frozen(net, state)
    parent = nn.Module()
    parent.frozen = frozen
    parent.live = nn.Linear(2, 2)
    parent.train()
    assert not frozen.training and all(not m.training for m in frozen.modules())
    assert parent.live.training
    assert count_parameters(parent) == (6, 12 + 6)
    assert torch.equal(frozen[0].weight, torch.zeros(3, 3))


def test_atomic_checkpoint_io_leaves_no_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1)}}, target)
    assert read_checkpoint(target)["state_dict"]["w"].item() == 1.0

    def boom(*args, **kwargs):
        tmp = tmp_path / "last.ckpt.tmp"
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1)}}, target)
    assert not (tmp_path / "last.ckpt.tmp").exists()
    assert read_checkpoint(target)["state_dict"]["w"].item() == 1.0  # old file intact
