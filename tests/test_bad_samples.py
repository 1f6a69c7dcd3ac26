"""Bad samples are skipped, replaced, counted and reported; too many stop the run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from microscope_pl.data.bad_samples import KEY, BadSampleLog, SkipBadSamples
from microscope_pl.data.datamodule import TalkingHeadDataModule
from microscope_pl.data.datasets import ClipDataset, FramePairDataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """6 videos (4 train, 2 test, 2 s, 64 px) with three train clips and one test clip damaged."""
    from microscope_pl.data.synth import synthesize

    root = synthesize(tmp_path_factory.mktemp("damaged"), videos=6, size=64, seconds=2.0, seed=0,
                      test_fraction=0.34, verbose=False)
    manifest = json.loads((root / "manifest.json").read_text())
    video, pose, audio = manifest["train"][:3]
    folder = root / "videos"
    mp4 = folder / video / "video.mp4"
    mp4.write_bytes(mp4.read_bytes()[:300])  # a truncated download
    track = np.load(folder / pose / "pose.npy")
    track[25] = np.nan  # one lost face: every 40-frame clip of 50 frames covers frame 25
    np.save(folder / pose / "pose.npy", track)
    feats = np.load(folder / audio / "audio_feats.npy")
    np.save(folder / audio / "audio_feats.npy", feats[:30])  # audio features shorter than the video
    test = manifest["test"][0]
    mp4 = folder / test / "video.mp4"
    mp4.write_bytes(mp4.read_bytes()[:300])
    return root, {"video": video, "pose": pose, "audio": audio, "test": test}


def test_bad_clips_are_replaced_and_recorded(damaged) -> None:
    root, bad = damaged
    clips = SkipBadSamples(ClipDataset(root, "train", num_frames=40, samples_per_video=2))
    tally = BadSampleLog()
    for i in range(len(clips)):
        item = clips[i]
        assert item["frames"].shape == (40, 3, 64, 64) and item["pose"].shape == (40, 6)
        assert all(torch.isfinite(item[k]).all() for k in ("frames", "audio", "pose", "blink", "loudness"))
        assert item["name"] not in (bad["video"], bad["pose"], bad["audio"])
        tally.add([item[KEY]])
    reasons = {name: reason for name, _, reason in tally.worst("train")}
    assert set(reasons) == {bad["video"], bad["pose"], bad["audio"]}
    assert "cannot read video" in reasons[bad["video"]]
    assert reasons[bad["pose"]] == "non-finite values in pose"
    assert "per-frame arrays have 30/50 rows" in reasons[bad["audio"]]
    assert str(root) not in reasons[bad["audio"]], "the clip's folder is not repeated"

    pairs = SkipBadSamples(FramePairDataset(root, "train", samples_per_video=2))
    tally = BadSampleLog()
    tally.add(pairs[i][KEY] for i in range(len(pairs)))
    assert [name for name, _, _ in tally.worst("train")] == [bad["video"]], "pairs use no pose or audio"

    val = SkipBadSamples(FramePairDataset(root, "val", samples_per_video=3))
    first, again = val[0], val[0]
    assert torch.equal(first["source"], again["source"]) and first["name"] != bad["test"]
    assert first[KEY].startswith(f"val\t{bad['test']}\tValueError: video.mp4: cannot read video")


def test_too_many_bad_train_clips_stop_naming_them(damaged) -> None:
    root, bad = damaged
    dm = TalkingHeadDataModule(data_root=str(root), mode="clips", num_frames=40, image_size=64, batch_size=2,
                               samples_per_video=1, max_bad_fraction=0.25)
    dm.setup("fit")
    with pytest.raises(ValueError, match=r"of 4 train clips of .* are bad .* > max_bad_fraction=0.25") as err:
        for batch in dm.train_dataloader():
            out = dm.on_before_batch_transfer(batch, 0)
            assert KEY not in out and out["frames"].shape[0] == 2
    message = str(err.value)
    assert "\n" not in message
    assert sum(name in message for name in (bad["video"], bad["pose"], bad["audio"])) >= 2

    lenient = TalkingHeadDataModule(data_root=str(root), mode="clips", num_frames=40, image_size=64, batch_size=2,
                                    samples_per_video=1, max_bad_fraction=0.8)
    lenient.setup("fit")
    for batch in lenient.train_dataloader():
        lenient.on_before_batch_transfer(batch, 0)
    assert len(lenient.bad_samples.worst("train")) == 3
    with pytest.raises(ValueError, match="max_bad_fraction must be in"):
        TalkingHeadDataModule(max_bad_fraction=1.5)


def test_fit_survives_bad_clips_and_reports_them(damaged, tmp_path) -> None:
    root, bad = damaged
    tiny = ["--model.init_args.network.d_model", "16", "--model.init_args.network.num_heads", "2",
            "--model.init_args.network.num_layers", "1", "--model.init_args.network.latent_dim", "8"]
    data = ["--data.init_args.data_root", str(root), "--data.init_args.image_size", "64",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "1",
            "--data.init_args.samples_per_video", "2", "--data.init_args.val_samples", "2",
            "--data.init_args.num_frames", "40", "--data.init_args.max_bad_fraction", "0.8"]
    run = ["--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1"]
    cmd = [sys.executable, "-m", "microscope_pl", "fit", "--config", str(REPO / "configs/pbnet.yaml"),
           *tiny, *data, *run]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in (bad["video"], bad["pose"], bad["audio"]):
        assert f"bad sample: train clip {name} skipped" in result.stdout
    assert "bad samples: 3 of 4 train clips skipped" in result.stdout
    reports = list(tmp_path.rglob("bad_samples.json"))
    assert len(reports) == 1, reports
    report = json.loads(reports[0].read_text())
    train = report["splits"]["train"]
    assert {c["name"] for c in train["bad"]} == {bad["video"], bad["pose"], bad["audio"]}
    assert train["clips"] == 4 and train["failed_loads"] == sum(c["count"] for c in train["bad"])
    assert 3 <= train["replaced_items"] <= train["failed_loads"]
    assert [c["name"] for c in report["splits"]["test"]["bad"]] == [bad["test"]], "validation skips it too"
    assert "cannot read video (Check failed" in result.stdout, "decord's source location is left out"
