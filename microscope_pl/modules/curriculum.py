"""DAWN's two-stage clip curriculum for the diffusion phase."""
from __future__ import annotations

import random

from lightning.pytorch import Callback, LightningModule, Trainer


class ClipCurriculum(Callback):
    """Stage 1: short clips with the first frame as reference (the datamodule's
    settings). From `switch_epoch` on: clips of `min_frames..max_frames`
    frames (drawn per epoch) with a reference frame from anywhere in the video.
    Needs `trainer.reload_dataloaders_every_n_epochs: 1`.
    """

    def __init__(self, switch_epoch: int = 20, min_frames: int = 30, max_frames: int = 40,
                 reference: str = "random", seed: int = 0) -> None:
        """
        Args:
            switch_epoch: first epoch of stage 2.
            min_frames: shortest stage-2 clip.
            max_frames: longest stage-2 clip.
            reference: stage-2 reference frame, "random" (DAWN) or "first".
            seed: seed of the per-epoch clip length.
        """
        if min_frames > max_frames:
            raise ValueError(f"min_frames {min_frames} > max_frames {max_frames}")
        self.switch_epoch = switch_epoch
        self.min_frames, self.max_frames = min_frames, max_frames
        self.reference = reference
        self.seed = seed

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set up the next epoch: Lightning builds its dataloader before the epoch's start hooks."""
        epoch = trainer.current_epoch + 1
        if epoch < self.switch_epoch:
            return
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("ClipCurriculum needs trainer.reload_dataloaders_every_n_epochs=1, "
                             f"got {trainer.reload_dataloaders_every_n_epochs}")
        frames = random.Random(self.seed + epoch).randint(self.min_frames, self.max_frames)
        trainer.datamodule.set_clip_options(num_frames=frames, reference=self.reference)
