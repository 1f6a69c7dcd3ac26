"""Atomic checkpoint writes for training (Lightning's CheckpointIO plugin)."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from microscope_pl.checkpointing import save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `NAME.tmp` first and renames it, so a killed run never leaves a
    half-written `last.ckpt` that the next run would try to resume from."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        save_atomic(checkpoint, path, lambda obj, tmp: super(AtomicCheckpointIO, self).save_checkpoint(
            obj, tmp, storage_options))
