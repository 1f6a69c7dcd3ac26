"""LightningDataModule over a prepared or synthetic talking-head data set."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from microscope_pl.data.bad_samples import KEY as BAD_KEY
from microscope_pl.data.bad_samples import BadSampleLog, SkipBadSamples
from microscope_pl.data.datasets import ClipDataset, FramePairDataset, load_manifest
from microscope_pl.models.config import from_dict

MODES = ("pairs", "clips")
TEST_SPLITS = ("videos", "tail")
REFERENCES = ("first", "random")


@dataclass
class ClipCurriculum:
    """Stage 2 of DAWN's clip curriculum (mode "clips"). Stage 1 is the data module's
    own ``num_frames`` and ``reference``; from ``switch_epoch`` on, every training epoch
    draws one clip length in ``[min_frames, max_frames]`` and takes its reference frame
    per ``reference``. Validation during fit follows the same epochs.

    Args:
        switch_epoch: first epoch of stage 2 (0-based, as ``trainer.current_epoch``).
        min_frames: shortest stage-2 clip.
        max_frames: longest stage-2 clip.
        reference: stage-2 reference frame, "random" (any frame of the video, DAWN's) or "first".
        seed: seed of the per-epoch clip length.
    """

    switch_epoch: int = 20
    min_frames: int = 30
    max_frames: int = 40
    reference: str = "random"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.switch_epoch < 0:
            raise ValueError(f"curriculum switch_epoch must be >= 0, got {self.switch_epoch}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"curriculum needs 1 <= min_frames <= max_frames, got min_frames={self.min_frames}, "
                             f"max_frames={self.max_frames}")
        if self.reference not in REFERENCES:
            raise ValueError(f"curriculum reference must be one of {REFERENCES}, got {self.reference!r}")

    def clip_options(self, epoch: int, num_frames: int, reference: str) -> tuple[int, str]:
        """(clip length, reference) of ``epoch``, given the stage-1 ``num_frames`` and ``reference``."""
        if epoch < self.switch_epoch:
            return num_frames, reference
        return random.Random(self.seed + epoch).randint(self.min_frames, self.max_frames), self.reference


def as_curriculum(value: ClipCurriculum | dict[str, Any] | None) -> ClipCurriculum | None:
    """A ClipCurriculum from the CLI's instance, a plain mapping (a checkpoint's), or None."""
    return None if value is None else from_dict(ClipCurriculum, value)


class TalkingHeadDataModule(pl.LightningDataModule):
    """Frame pairs (phases 1-2) or aligned clips (diffusion, PBNet) from ``data_root``.

    Train items come from the manifest's train split; validation and test both
    come from its test split (identities unseen in training), deterministically.
    When ``data_root`` has no manifest, ``prepare_data`` synthesises the
    embedded data set there (unless ``synthesize_if_missing`` is False).
    """

    def __init__(
        self,
        data_root: str = "data/synth",
        mode: str = "pairs",
        image_size: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        num_frames: int = 20,
        reference: str = "first",
        samples_per_video: int = 16,
        val_samples: int = 32,
        augment: bool = True,
        cache_mb: float = 256.0,
        max_bad_fraction: float = 0.05,
        synthesize_if_missing: bool = True,
        synth_videos: int = 8,
        synth_seconds: float = 4.0,
        synth_size: int = 128,
        synth_seed: int = 0,
        latent_cache: str | None = None,
        curriculum: Optional[ClipCurriculum] = None,
        holdout_seconds: float = 0.0,
        test_split: str = "videos",
    ) -> None:
        """
        Args:
            data_root: data set folder holding manifest.json (docs/interfaces.md layout).
            mode: "pairs" -> {"source", "driving"} frames; "clips" -> ClipDataset items.
            image_size: frame size fed to the model; None keeps the stored size, else torch-resized.
            batch_size: items per batch (per device).
            num_workers: DataLoader worker processes (persistent when > 0).
            num_frames: clip length N in frames (mode "clips").
            reference: "first" (clip's first frame) or "random" (any frame of the video) (mode "clips").
            samples_per_video: training items drawn per train video per epoch.
            val_samples: total validation (and test) items, spread over the test videos.
            augment: flip + colour jitter on training pairs (mode "pairs").
            cache_mb: per-worker budget for decoded videos kept in memory.
            max_bad_fraction: share of the train clips that may fail to load or hold non-finite
                values; their items are replaced by other clips' and reported (logs and
                ``bad_samples.json`` in the log folder). Past it the run stops naming the worst
                clips. Bad val/test clips are skipped and reported only.
            synthesize_if_missing: synthesise the embedded data set when data_root has no manifest.
            synth_videos: videos to synthesise.
            synth_seconds: length of each synthetic video in seconds.
            synth_size: frame size of the synthetic videos.
            synth_seed: seed of the synthetic data set.
            latent_cache: a file from `microscope latents cache`; training clips then carry
                cached latents instead of frames (mode "clips", train split only).
            curriculum: stage 2 of the clip curriculum (mode "clips"; null: one stage).
                Needs ``trainer.reload_dataloaders_every_n_epochs: 1``.
            holdout_seconds: the last seconds of every training video are left out of training.
            test_split: what validation and test draw from: "videos" (the held-out videos,
                identities never seen) or "tail" (the held-out seconds of the training videos).
        """
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got batch_size={batch_size}, "
                             f"num_workers={num_workers}")
        if samples_per_video < 1 or val_samples < 1:
            raise ValueError(f"samples_per_video={samples_per_video} and val_samples={val_samples} must be >= 1")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        if image_size is not None and image_size < 8:
            raise ValueError(f"image_size must be >= 8 or None, got {image_size}")
        if latent_cache and mode != "clips":
            raise ValueError(f"latent_cache needs mode 'clips', got mode {mode!r}")
        if holdout_seconds < 0 or test_split not in TEST_SPLITS:
            raise ValueError(f"need holdout_seconds >= 0 and test_split in {TEST_SPLITS}, got "
                             f"holdout_seconds={holdout_seconds}, test_split={test_split!r}")
        if test_split == "tail" and holdout_seconds <= 0:
            raise ValueError("test_split 'tail' needs holdout_seconds > 0 (the held-out end of each training video)")
        stage2 = as_curriculum(curriculum)
        if stage2 is not None and mode != "clips":
            raise ValueError(f"curriculum needs mode 'clips', got mode {mode!r}")
        synth_frames = int(round(synth_seconds * 25))
        if mode == "clips" and synthesize_if_missing:
            longest = max(num_frames, stage2.max_frames if stage2 else 0)
            name = "num_frames" if longest == num_frames else "curriculum max_frames"
            if longest > synth_frames:
                raise ValueError(f"{name}={longest} is longer than the synthetic videos "
                                 f"(synth_seconds={synth_seconds} -> {synth_frames} frames)")
        curriculum = dataclasses.asdict(stage2) if stage2 else None  # plain: weights-only checkpoints load it
        self.save_hyperparameters()
        self.curriculum = stage2
        self.stage1 = (num_frames, reference)
        self.data_root = Path(data_root)
        self.mode = mode
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.num_frames = num_frames
        self.reference = reference
        self.samples_per_video = samples_per_video
        self.val_samples = val_samples
        self.augment = augment
        self.cache_mb = cache_mb
        self.max_bad_fraction = max_bad_fraction
        self.bad_samples = BadSampleLog()  # items replaced in this process's loaders, by split and clip
        self.split_clips: dict[str, int] = {}  # clips per split, of the loaders made
        self.replaced: dict[str, int] = {}  # items replaced by stage ("train", "val", "test"), as logged
        self.synthesize_if_missing = synthesize_if_missing
        self.synth_args = {"videos": synth_videos, "seconds": synth_seconds, "size": synth_size,
                           "seed": synth_seed}
        self.latent_cache = latent_cache
        self.tail_frames = int(round(holdout_seconds * 25))  # prepared and synthetic sets are 25 fps
        self.eval_split = "tail" if test_split == "tail" else "test"
        self.cache: dict | None = None  # the loaded latent cache
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ------------------------------------------------------------ data

    def prepare_data(self) -> None:
        """Synthesise the default data set into ``data_root`` when it has no manifest.json."""
        if (self.data_root / "manifest.json").is_file():
            return
        if not self.synthesize_if_missing:
            raise ValueError(f"{self.data_root / 'manifest.json'} not found and synthesize_if_missing=False; "
                             "run `microscope data synth` or `microscope data prepare` first")
        from microscope_pl.data.synth import synthesize

        print(f"synthesising the embedded data set into {self.data_root} ({self.synth_args})")
        synthesize(self.data_root, **self.synth_args)

    def _make(self, split: str) -> Dataset:
        split = split if split == "train" else self.eval_split
        tail = self.tail_frames
        if self.mode == "pairs":
            if split == "train":
                return FramePairDataset(self.data_root, split, self.image_size, augment=self.augment,
                                        samples_per_video=self.samples_per_video, cache_mb=self.cache_mb,
                                        tail_frames=tail)
            per_video = self._eval_per_video()
            return FramePairDataset(self.data_root, split, self.image_size, augment=False,
                                    samples_per_video=per_video, cache_mb=self.cache_mb, tail_frames=tail)
        per_video = self.samples_per_video if split == "train" else self._eval_per_video()
        latents = None
        if split == "train" and self.latent_cache:
            if self.cache is None:
                from microscope_pl.data.latent_cache import load_cache

                self.cache = load_cache(self.latent_cache)
            latents = self.cache["videos"]
        return ClipDataset(self.data_root, split, self.num_frames, self.reference, self.image_size,
                           samples_per_video=per_video, cache_mb=self.cache_mb, latents=latents, tail_frames=tail)

    def _eval_per_video(self) -> int:
        manifest = load_manifest(self.data_root)
        videos = len(manifest["train" if self.eval_split == "tail" else "test"])
        if videos == 0:
            raise ValueError(f"{self.data_root}: the test split is empty; validation needs at least one "
                             "test video (prepare at least 2 videos)")
        return max(1, -(-self.val_samples // videos))

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a ``stage`` needs ("fit", "validate", "test", "predict" or None: all)."""
        load_manifest(self.data_root)  # a clear error when prepare_data was skipped
        if stage in ("fit", None):
            self.train_set = self._make("train")
        if stage in ("fit", "validate", None):
            self.val_set = self._make("val")
        if stage in ("test", "predict", None):
            self.test_set = self._make("test")

    def set_clip_options(self, num_frames: int | None = None, reference: str | None = None) -> None:
        """Change clip length / reference (curriculum) and rebuild the datasets already built.

        The trainer must reload dataloaders (``reload_dataloaders_every_n_epochs``) to see it.
        """
        if reference is not None and reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        self.num_frames = self.num_frames if num_frames is None else int(num_frames)
        self.reference = self.reference if reference is None else reference
        if self.train_set is not None:
            self.train_set = self._make("train")
        if self.val_set is not None:
            self.val_set = self._make("val")
        if self.test_set is not None:
            self.test_set = self._make("test")

    def follow_curriculum(self) -> None:
        """Set the clip options of the trainer's current epoch (while fitting, with a curriculum)."""
        trainer = self.trainer
        if self.curriculum is None or trainer is None or trainer.state.fn != "fit":
            return
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("data.curriculum needs trainer.reload_dataloaders_every_n_epochs=1, got "
                             f"{trainer.reload_dataloaders_every_n_epochs} (or set data.curriculum to null)")
        frames, reference = self.curriculum.clip_options(trainer.current_epoch, *self.stage1)
        if (frames, reference) != (self.num_frames, self.reference):
            self.set_clip_options(num_frames=frames, reference=reference)

    # ------------------------------------------------------------ loaders

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for dataloaders")
        dataset = dataset if isinstance(dataset, SkipBadSamples) else SkipBadSamples(dataset)
        self.split_clips[dataset.split] = len(dataset.names)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          drop_last=train and len(dataset) >= self.batch_size)  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        self.follow_curriculum()
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        self.follow_curriculum()
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    # ------------------------------------------------------------ bad samples

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take the ``bad_samples`` records off a batch (models never see them), count and log
        them, and stop when more than ``max_bad_fraction`` of the train clips are bad."""
        if not isinstance(batch, dict) or BAD_KEY not in batch:
            return batch
        records = batch.pop(BAD_KEY)
        trainer = self.trainer
        zero = trainer is None or trainer.is_global_zero
        for split, name, reason in self.bad_samples.add(records):
            if zero:
                print(f"bad sample: {split} clip {name} skipped ({reason}); its items come from other clips",
                      flush=True)
        replaced = sum(1 for text in records if text)
        if trainer is not None and replaced:  # items of this stage taken from other clips so far
            stage = "train" if trainer.training else "test" if trainer.testing else "val"
            self.replaced[stage] = self.replaced.get(stage, 0) + replaced
            for logger in trainer.loggers:
                logger.log_metrics({f"{stage}/bad_samples": float(self.replaced[stage])}, step=trainer.global_step)
        clips = self.split_clips.get("train", 0)
        over = self.bad_samples.too_many("train", clips, self.max_bad_fraction)
        if trainer is not None and trainer.training and trainer.world_size > 1:  # every rank stops, or none
            over = trainer.strategy.reduce_boolean_decision(over, all=False)
        if over:
            raise ValueError(self.bad_samples.too_many_message("train", clips, self.max_bad_fraction,
                                                               str(self.data_root)))
        return batch

    def teardown(self, stage: str) -> None:
        """End of fit/validate/test: the bad-sample report of every rank, printed and written by rank zero."""
        self._report(collective=True)

    def on_exception(self, exception: BaseException) -> None:
        self._report(collective=False)  # another rank may not be failing: no collectives here

    def _report(self, collective: bool) -> None:
        trainer, tally = self.trainer, self.bad_samples
        dist = torch.distributed
        if collective and trainer is not None and trainer.world_size > 1 and dist.is_available() \
                and dist.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, tally.counts())
            tally = BadSampleLog()
            for counts in gathered:
                tally.merge(counts)
        if not tally.splits:  # the same on every rank after the gather
            return
        folder = None
        if trainer is not None:
            logger = trainer.loggers[0] if trainer.loggers else None
            folder = trainer.log_dir if collective else getattr(logger, "log_dir", None)
            folder = folder or trainer.default_root_dir
            if not trainer.is_global_zero:
                return
        path = Path(folder or ".") / "bad_samples.json"
        tally.write(path, self.split_clips, str(self.data_root), self.max_bad_fraction)
        print(tally.report(self.split_clips, path), flush=True)
