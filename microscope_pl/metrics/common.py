"""Helpers shared by the metrics: the "metric unavailable" signal and input coercion.

Every metric that needs pretrained weights which cannot be downloaded here
raises :class:`MetricUnavailable` with a message naming the missing file (or
package). Callers such as :func:`microscope_pl.metrics.evaluate.evaluate_folders`
catch it and list the metric as skipped with that reason, so a number is never
faked with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = Union[np.ndarray, torch.Tensor]


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (missing weights file or optional package).

    The message is the reason shown to the user; it names what is missing.
    """


@dataclass(frozen=True)
class Skipped:
    """A metric that was not computed, with the reason (for reports)."""

    name: str
    reason: str


def require_file(path: Union[str, Path, None], what: str, hint: str = "") -> Path:
    """Return ``path`` as a Path if it is an existing file, else raise MetricUnavailable.

    Args:
        path: the candidate file (None means "not configured").
        what: human name of the weights, e.g. "SyncNet weights (syncnet_v2.model)".
        hint: how to provide it (argument / environment variable).
    """
    suffix = f" ({hint})" if hint else ""
    if path is None or str(path) == "":
        raise MetricUnavailable(f"{what}: no file given{suffix}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MetricUnavailable(f"{what}: file not found: {p}{suffix}")
    return p


def load_torchscript(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> torch.jit.ScriptModule:
    """``torch.jit.load`` in eval mode, without its deprecation warning.

    The metric networks people have on disk (TF-FID Inception, StyleGAN-V I3D,
    ArcFace exports) are TorchScript files; torch.export cannot read them.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def to_video_tensor(frames: ArrayLike) -> torch.Tensor:
    """Coerce a clip to a float tensor ``n 3 h w`` in [0, 1].

    Accepts ``n 3 h w`` or ``n h w 3`` (channel axis detected by size 3; if
    both axes are 3 the channels-first reading wins), uint8 in [0, 255] or
    float in [0, 1], as numpy array or torch tensor. A single image
    (3 dims) is treated as a one-frame clip.
    """
    x = torch.as_tensor(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"expected a clip of 4 dims (n 3 h w or n h w 3), got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float()


def resize_video(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize ``n 3 h w`` to ``n 3 size size`` (bilinear, antialiased); None keeps it.

    The paper resizes every video to 256x256 before evaluation; antialiasing
    matters when shrinking 512 -> 256, otherwise aliasing inflates FID.
    """
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-d arrays; 0.0 when either is constant."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"pearson: shapes differ: {a.shape} vs {b.shape}")
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    # A constant signal has no defined correlation; 0 is the honest neutral value.
    return float((a * b).sum() / den) if den > 1e-12 else 0.0
