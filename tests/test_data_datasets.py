"""FramePairDataset, ClipDataset and TalkingHeadDataModule on the session's tiny synthetic set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from microscope_pl.data.audio import loudness_envelope, read_wav
from microscope_pl.data.datamodule import ClipCurriculum, TalkingHeadDataModule
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
    out, _ = augment_pair(x, torch.Generator().manual_seed(0))
    assert torch.equal(out[0], out[1]) and out.shape == x.shape


def test_pair_mouth_box_follows_the_flip(synth_root: Path) -> None:
    """A flipped training pair carries the mirrored mouth box, an unflipped one the box itself."""
    plain = FramePairDataset(synth_root, "train", samples_per_video=1)
    flipped_ds = FramePairDataset(synth_root, "train", augment=True, samples_per_video=1)
    box = plain[0]["mouth_box"]
    assert box.shape == (4,) and bool((box >= 0).all())
    size = plain.image_size
    mirrored = torch.stack([size - box[2], box[1], size - box[0], box[3]])
    seen = set()
    for seed in range(8):  # both outcomes of the coin
        torch.manual_seed(seed)
        got = flipped_ds[0]["mouth_box"]
        seen.add(tuple(got.tolist()))
        assert torch.equal(got, box) or torch.equal(got, mirrored)
    assert len(seen) == 2 or torch.equal(box, mirrored)


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


# ---------------------------------------------------------------- the clip curriculum (DAWN's two stages)


def _fitting(epoch: int, reload: int = 1, fn: str = "fit") -> SimpleNamespace:
    """What the data module reads of a trainer: its state, epoch and reload setting."""
    return SimpleNamespace(state=SimpleNamespace(fn=fn), current_epoch=epoch, reload_dataloaders_every_n_epochs=reload)


def test_curriculum_switches_clip_length_and_reference_at_its_epoch(synth_root: Path) -> None:
    stage2 = ClipCurriculum(switch_epoch=2, min_frames=6, max_frames=10, reference="random", seed=3)
    assert stage2.clip_options(1, 12, "first") == (12, "first")
    lengths = [stage2.clip_options(epoch, 12, "first") for epoch in range(2, 12)]
    assert all(6 <= n <= 10 and ref == "random" for n, ref in lengths) and len({n for n, _ in lengths}) > 1
    assert lengths == [stage2.clip_options(epoch, 12, "first") for epoch in range(2, 12)], "drawn per epoch, seeded"

    dm = TalkingHeadDataModule(data_root=str(synth_root), mode="clips", num_frames=12, batch_size=2,
                               samples_per_video=1, val_samples=2,
                               curriculum={"switch_epoch": 2, "min_frames": 6, "max_frames": 10, "seed": 3})
    assert dm.hparams["curriculum"] == dataclasses.asdict(stage2), "a plain mapping in the checkpoint"
    dm.setup("fit")
    dm.trainer = _fitting(1)
    assert next(iter(dm.train_dataloader()))["frames"].shape[1] == 12 and dm.reference == "first"
    dm.trainer = _fitting(5)
    frames = next(iter(dm.train_dataloader()))["frames"].shape[1]
    assert (frames, dm.reference) == stage2.clip_options(5, 12, "first")
    assert next(iter(dm.val_dataloader()))["frames"].shape[1] == frames, "validation follows the epoch"
    dm.trainer = _fitting(0)
    assert next(iter(dm.train_dataloader()))["frames"].shape[1] == 12, "a restart from epoch 0 is stage 1 again"
    dm.trainer = _fitting(5, fn="validate")
    assert next(iter(dm.val_dataloader()))["frames"].shape[1] == 12, "only fitting follows the curriculum"
    dm.trainer = _fitting(5, reload=0)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1, got 0"):
        dm.train_dataloader()


def test_curriculum_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min_frames=9, max_frames=8"):
        ClipCurriculum(min_frames=9, max_frames=8)
    with pytest.raises(ValueError, match="reference"):
        ClipCurriculum(reference="last")
    with pytest.raises(ValueError, match="mode 'clips', got mode 'pairs'"):
        TalkingHeadDataModule(mode="pairs", curriculum=ClipCurriculum())
    with pytest.raises(ValueError, match="curriculum max_frames=300.*synth_seconds=8.0"):
        TalkingHeadDataModule(mode="clips", synth_seconds=8.0, curriculum={"max_frames": 300})
    with pytest.raises(ValueError, match="no setting.*frames"):
        TalkingHeadDataModule(mode="clips", curriculum={"frames": 30})


class _ClipLengths(pl.LightningModule):
    """Records (epoch, stage, clip length) of every batch; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, str, int]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.current_epoch, "train", batch["frames"].shape[1]))
        return self.weight.sum() * 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.seen.append((self.current_epoch, "val", batch["frames"].shape[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_trainer_sees_the_second_stage_from_switch_epoch(synth_root: Path) -> None:
    stage2 = ClipCurriculum(switch_epoch=2, min_frames=5, max_frames=7)
    dm = TalkingHeadDataModule(data_root=str(synth_root), mode="clips", num_frames=8, batch_size=1,
                               samples_per_video=1, val_samples=1, curriculum=stage2)
    module = _ClipLengths()
    trainer = pl.Trainer(max_epochs=4, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                         reload_dataloaders_every_n_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=dm)
    want = [(e, stage, stage2.clip_options(e, 8, "first")[0]) for e in range(4) for stage in ("train", "val")]
    assert module.seen == want and want[0][2] == 8 and all(5 <= n <= 7 for e, _, n in want if e >= 2)
