"""FramePairDataset, ClipDataset and TalkingHeadDataModule on the session's tiny synthetic set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from microscope_pl.data.audio import loudness_envelope, read_wav
from microscope_pl.data.datamodule import TalkingHeadDataModule
from microscope_pl.data.datasets import ClipDataset, FramePairDataset, augment_pair


def test_frame_pairs_shapes_and_determinism(synth_root: Path) -> None:
    train = FramePairDataset(synth_root, "train", samples_per_video=4, augment=True)
    assert len(train) == 3 * 4
    item = train[5]
    for key in ("source", "driving"):
        x = item[key]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    val = FramePairDataset(synth_root, "val", samples_per_video=3)
    a, b = val[1], val[1]
    assert torch.equal(a["source"], b["source"]) and torch.equal(a["driving"], b["driving"])
    assert not torch.equal(a["source"], a["driving"]), "two different frames"
    small = FramePairDataset(synth_root, "test", image_size=32)[0]
    assert small["source"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="split"):
        FramePairDataset(synth_root, "holdout")


def test_augmentation_is_shared_by_both_frames() -> None:
    x = torch.rand(1, 3, 8, 8).repeat(2, 1, 1, 1)
    out = augment_pair(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], out[1]) and out.shape == x.shape


def test_clip_alignment_and_relative_conditions(synth_root: Path) -> None:
    ds = ClipDataset(synth_root, "train", num_frames=10, reference="first", samples_per_video=2)
    item = ds[3]
    n = 10
    assert item["frames"].shape == (n, 3, 64, 64) and item["reference"].shape == (3, 64, 64)
    assert item["audio"].shape == (n, 80) and item["pose"].shape == (n, 6) and item["blink"].shape == (n, 2)
    assert item["loudness"].shape == (n,)
    assert all(item[k].dtype == torch.float32 for k in ("frames", "reference", "audio", "pose", "blink", "loudness"))
    assert float(item["frames"].min()) >= 0 and float(item["frames"].max()) <= 1
    # reference "first": the reference is the clip's first frame and the deltas vanish there.
    assert item["ref_index"] == item["start"]
    assert torch.equal(item["reference"], item["frames"][0])
    assert torch.all(item["pose"][0] == 0) and torch.all(item["blink"][0] == 0)

    folder = synth_root / "videos" / item["name"]
    start, span = item["start"], slice(item["start"], item["start"] + n)
    feats, pose = np.load(folder / "audio_feats.npy"), np.load(folder / "pose.npy")
    np.testing.assert_allclose(item["audio"].numpy(), feats[span])
    np.testing.assert_allclose(item["pose"].numpy(), pose[span] - pose[start], atol=1e-6)
    meta = json.loads((folder / "meta.json").read_text())
    wave, _ = read_wav(folder / "audio.wav")
    loud = loudness_envelope(wave, meta["frames"])
    np.testing.assert_allclose(item["loudness"].numpy(), loud[span])
    assert np.corrcoef(loud, meta["mouth_open"])[0, 1] > 0.6, "loudness follows the drawn mouth opening"


def test_clip_random_reference(synth_root: Path) -> None:
    ds = ClipDataset(synth_root, "test", num_frames=8, reference="random", samples_per_video=6)
    refs = set()
    for i in range(len(ds)):
        item = ds[i]
        folder = synth_root / "videos" / item["name"]
        pose, blink = np.load(folder / "pose.npy"), np.load(folder / "blink.npy")
        span = slice(item["start"], item["start"] + 8)
        np.testing.assert_allclose(item["pose"].numpy(), pose[span] - pose[item["ref_index"]], atol=1e-6)
        np.testing.assert_allclose(item["blink"].numpy(), blink[span] - blink[item["ref_index"]], atol=1e-6)
        refs.add(item["ref_index"] - item["start"])
    assert len(refs) > 1, "random references are not always the first frame"
    again = ds[2]
    assert again["ref_index"] == ds[2]["ref_index"], "val/test items are deterministic"
    with pytest.raises(ValueError, match="num_frames=500"):
        ClipDataset(synth_root, "train", num_frames=500)


def test_datamodule_synthesises_when_missing(tmp_path: Path) -> None:
    root = tmp_path / "auto"
    dm = TalkingHeadDataModule(data_root=str(root), mode="clips", num_frames=12, batch_size=2, samples_per_video=2,
                               val_samples=3, synth_videos=2, synth_seconds=1.0, synth_size=32)
    dm.prepare_data()
    assert (root / "manifest.json").is_file()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (2, 12, 3, 32, 32) and batch["audio"].shape == (2, 12, 80)
    assert len(dm.val_set) == 3  # type: ignore[arg-type]
    dm.set_clip_options(num_frames=6, reference="random")
    assert next(iter(dm.val_dataloader()))["frames"].shape[1] == 6

    with pytest.raises(ValueError, match="synthesize_if_missing"):
        TalkingHeadDataModule(data_root=str(tmp_path / "none"), synthesize_if_missing=False).prepare_data()
    with pytest.raises(ValueError, match="mode"):
        TalkingHeadDataModule(mode="triples")
    with pytest.raises(ValueError, match="num_frames=200.*synth_seconds=4.0"):
        TalkingHeadDataModule(mode="clips", num_frames=200)


def test_pairs_through_a_worker_process(synth_root: Path) -> None:
    dm = TalkingHeadDataModule(data_root=str(synth_root), mode="pairs", image_size=32, batch_size=3,
                               num_workers=1, samples_per_video=2)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, DataLoader) and loader.persistent_workers
    batch = next(iter(loader))
    assert batch["source"].shape == (3, 3, 32, 32) and batch["driving"].shape == (3, 3, 32, 32)
