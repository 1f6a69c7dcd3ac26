"""Runs that cannot mix up: run folders, settings refused on resume, held-out seconds, the data check."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import REPO, SHORT_RUN, TINY_FDE, fit
from microscope_pl.checkpointing import CheckpointError
from microscope_pl.phases import find_checkpoint, first_difference, normalized_networks, run_phases


def _fake_checkpoint(path: Path, phase: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"microscope_phase": phase, "state_dict": {}}, path)
    return path


def test_upstream_found_in_a_folder_and_run_names_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    last = _fake_checkpoint(tmp_path / "checkpoints/real128/phase1/last.ckpt", "phase1")
    assert find_checkpoint("phase1", run="real128") == Path("checkpoints/real128/phase1/last.ckpt")
    assert find_checkpoint("phase1", str(last.parent)) == last.parent / "last.ckpt"
    best = _fake_checkpoint(last.parent / "best.ckpt", "phase1")
    assert find_checkpoint("phase1", str(last.parent)) == best
    with pytest.raises(CheckpointError, match="no phase1 checkpoint in checkpoints/synth/phase1"):
        find_checkpoint("phase1")
    with pytest.raises(ValueError, match="one folder name"):
        find_checkpoint("phase1", run="../elsewhere")


def test_orchestrator_skips_by_the_run_of_the_overlays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    _fake_checkpoint(tmp_path / "checkpoints/real128/phase1/last.ckpt", "phase1")
    assert run_phases("phase1", overlays="configs/real") == 0
    assert "[phase1] checkpoints/real128/phase1/last.ckpt exists: skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="overlay folder nowhere does not exist"):
        run_phases("phase1", overlays="nowhere")


def test_first_difference_names_the_setting() -> None:
    a = {"networks": {"fde": {"block_expansion": 8, "extras": {"source_skip": True}}}}
    b = {"networks": {"fde": {"block_expansion": 8, "extras": {"source_skip": False}}}}
    assert first_difference(a, b, "record") == "record.networks.fde.extras.source_skip: checkpoint True, config False"
    assert first_difference(a, a, "record") is None
    assert first_difference({"x": (1, 2)}, {"x": [1, 2]}, "r") is None  # YAML lists and tuples alike
    # a record written before a setting existed equals one holding that setting's default
    older = normalized_networks({"fde": {"block_expansion": 8, "extras": {"source_skip": True}}})
    newer = normalized_networks({"fde": {"block_expansion": 8, "extras": {"source_skip": True,
                                                                          "registration_init": False}}})
    assert first_difference(older, newer, "networks") is None


def test_resume_refuses_a_checkpoint_of_other_settings(trained: Path, synth_root: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    work = tmp_path / "work"
    last = work / "checkpoints/synth/phase1/last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes((trained / "checkpoints/synth/phase1/last.ckpt").read_bytes())
    monkeypatch.chdir(work)
    wider = [*TINY_FDE, "--model.init_args.network.block_expansion", "16", *SHORT_RUN]
    assert fit("phase1_fde.yaml", synth_root, *wider) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err == (f"error: {last} was trained with other settings than this config (networks.fde.block_expansion: "
                   "checkpoint 8, config 16); use another --run, or pass the checkpoint's settings")
    # another run name starts afresh beside it
    assert fit("phase1_fde.yaml", synth_root, *wider, "--run", "wide") == 0
    assert (work / "checkpoints/wide/phase1/last.ckpt").is_file()
    assert list((work / "logs/wide/phase1").iterdir())
    record = torch.load(work / "checkpoints/wide/phase1/last.ckpt", weights_only=True)["microscope"]
    assert record["data"]["framing"]["detector"] == "haar" and record["data"]["source"] == "synthetic"


def test_audio_feature_width_checked_before_the_first_step(synth_root: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    code = fit("pbnet.yaml", synth_root, "--model.init_args.network.audio_dim", "64", "--model.init_args.network.d_model",
               "32", "--data.init_args.num_frames", "8", "--trainer.fast_dev_run", "1")
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: the pbnet network takes 64-d audio features but the data set "
                   f"{synth_root} has 80-d logmel features")


def test_held_out_seconds_split_train_and_tail(synth_root: Path) -> None:
    from microscope_pl.data.datamodule import TalkingHeadDataModule
    from microscope_pl.data.datasets import ClipDataset, FramePairDataset

    manifest = json.loads((synth_root / "manifest.json").read_text())
    counts = {n: json.loads((synth_root / "videos" / n / "meta.json").read_text())["frames"] for n in manifest["train"]}
    tail = 10
    pairs = FramePairDataset(synth_root, "train", 64, samples_per_video=4, tail_frames=tail)
    assert pairs.spans == {n: (0, c - tail) for n, c in counts.items()}
    clips = ClipDataset(synth_root, "tail", num_frames=tail, samples_per_video=3, tail_frames=tail)
    assert clips.names == manifest["train"]
    for i in range(len(clips)):
        item = clips[i]
        assert item["start"] == counts[item["name"]] - tail == item["ref_index"]
    train = ClipDataset(synth_root, "train", num_frames=8, reference="random", samples_per_video=20, tail_frames=tail)
    for i in range(len(train)):
        item = train[i]
        assert item["start"] + 8 <= counts[item["name"]] - tail and item["ref_index"] < counts[item["name"]] - tail
    module = TalkingHeadDataModule(str(synth_root), mode="clips", num_frames=tail, holdout_seconds=tail / 25,
                                   test_split="tail", val_samples=6)
    module.setup("test")
    assert module.test_set.split == "tail" and len(module.test_set) == 6
    with pytest.raises(ValueError, match="test_split 'tail' needs holdout_seconds > 0"):
        TalkingHeadDataModule(str(synth_root), test_split="tail")
    with pytest.raises(ValueError, match="split 'tail' needs tail_frames > 0"):
        ClipDataset(synth_root, "tail", num_frames=4)


def test_make_clean_asks_before_deleting_checkpoints(tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    trained = tmp_path / "checkpoints/real128/phase1/last.ckpt"
    trained.parent.mkdir(parents=True)
    trained.write_bytes(b"weights")
    run = ["make", "-s", "-f", str(REPO / "Makefile"), "clean"]
    kept = subprocess.run(run, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert kept.returncode != 0 and "FORCE=1" in kept.stdout and trained.is_file()
    gone = subprocess.run([*run, "FORCE=1"], cwd=tmp_path, capture_output=True, text=True)
    assert gone.returncode == 0 and not trained.exists()
    assert "clean" in subprocess.run(["make", "-s", "-f", str(REPO / "Makefile"), "help"], capture_output=True,
                                     text=True).stdout
