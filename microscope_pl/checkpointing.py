"""Reading checkpoint files safely (weights only, one clear line on failure).

No Lightning import: generation reads checkpoints through this module alone;
the atomic writer for training is modules/checkpoint_io.py.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or of the wrong kind."""


def read_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with `weights_only=True`; raise CheckpointError
    naming the file when it is missing or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle errors, foreign files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({reason[:160]})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, recorded so a downstream phase names its upstream."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_atomic(obj: Any, path: str | os.PathLike, save: Callable[[Any, Path], None] | None = None) -> None:
    """Write `path` through `NAME.tmp` and a rename (`save(obj, tmp)`, default torch.save), so a
    killed writer never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        (save or torch.save)(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
