"""Reading checkpoint files safely (weights only, one clear line on failure).

No Lightning import: generation reads checkpoints through this module alone;
the atomic writer for training is modules/checkpoint_io.py.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
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
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))  # an object only full unpickling (running code) builds
        if named:
            raise CheckpointError(f"{path} is not weights-only: loading it would run the code it names "
                                  f"({named.group(1)}), so it was refused and never loaded (a checkpoint of "
                                  "this project holds tensors and plain settings only)") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a torch checkpoint)") from None
    except Exception as err:  # truncated zip, foreign files
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({_first_line(err)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


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
