"""Per-frame reconstruction metrics: PSNR, SSIM (torchmetrics) and LPIPS (lpips package).

:func:`frame_psnr` and :func:`frame_ssim` are the one place a frame's PSNR and
SSIM are computed; :func:`image_quality` groups them (plus an optional LPIPS)
as tensors for LightningModules to log, and :func:`psnr` / :func:`ssim` are
float wrappers for reports. The wrappers take images ``b 3 h w`` or clips
``b n 3 h w`` in [0, 1]; clips are flattened to frames and the metric is
averaged over frames (the usual convention for video reconstruction tables).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from typing import Callable, Iterator, Union

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from microscope_pl.metrics.common import MetricUnavailable

# (pred, target) -> mean LPIPS: LPIPSMetric, a module's network, or a test stand-in.
LPIPSFn = Callable[[Tensor, Tensor], Union[Tensor, float]]


def _frames(x: torch.Tensor) -> torch.Tensor:
    """``b 3 h w`` or ``b n 3 h w`` -> ``(b n) 3 h w`` float."""
    if x.ndim == 5:
        x = x.flatten(0, 1)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected b 3 h w or b n 3 h w, got {tuple(x.shape)}")
    return x.float()


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return _frames(pred), _frames(target)


# ---------------------------------------------------------------- PSNR / SSIM


def _check_frames(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"expected frames b 3 h w, got {tuple(pred.shape)}")
    if not (pred.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"expected float frames in [0, 1], got {pred.dtype} and {target.dtype} "
                         "(divide uint8 frames by 255 first)")


def frame_psnr(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of each frame (data range 1): ``b 3 h w`` pairs -> ``b``.

    One MSE per frame (``dim=(1, 2, 3)``), not one over the batch, so a single
    bad frame is not averaged away before the log. Identical frames give
    ``inf``; callers that average clip it (``.clamp(max=100.0)``) first.
    Inputs are used as given (no clamping or casting).
    """
    _check_frames(pred, target)
    return peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3), reduction="none")


def frame_ssim(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM of each frame (Gaussian window 11, sigma 1.5, data range 1): ``b 3 h w`` pairs -> ``b``.

    Computed in float32 even inside autocast (a bf16-mixed validation or test step): its
    window sums are convolutions, and ``E[x^2] - E[x]^2`` in bf16 cancels to noise on smooth
    images (a face's SSIM came out negative).
    """
    _check_frames(pred, target)
    with torch.autocast(pred.device.type, enabled=False):
        return structural_similarity_index_measure(pred.float(), target.float(), data_range=1.0,
                                                   reduction="none")


def image_quality(pred: Tensor, target: Tensor, lpips: LPIPSFn | None = None) -> dict[str, Tensor]:
    """PSNR, SSIM and (when ``lpips`` is given) LPIPS of a frame batch, as tensors to log.

    Args:
        pred: ``b 3 h w`` predictions, cast to float and clamped to [0, 1].
        target: ``b 3 h w`` ground truth in [0, 1], cast to float.
        lpips: ``(pred, target) -> mean LPIPS`` (tensor or float), or None to leave it out.

    Returns:
        ``{"psnr": b (per frame, uncapped), "ssim": scalar mean, "lpips": scalar mean}``.
    """
    pred = pred.float().clamp(0, 1)
    target = target.float()
    out = {"psnr": frame_psnr(pred, target), "ssim": frame_ssim(pred, target).mean()}
    if lpips is not None:
        with torch.autocast(pred.device.type, enabled=False):  # float32 like the other metrics
            value = lpips(pred, target)
        out["lpips"] = value.mean() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
    return out


def psnr(pred: torch.Tensor, target: torch.Tensor, cap: float | None = None) -> float:
    """Mean over frames of :func:`frame_psnr` in dB (data range 1).

    Args:
        pred, target: ``b 3 h w`` or ``b n 3 h w`` in [0, 1].
        cap: if given, each frame's PSNR is clipped to it before averaging, so
            one identical frame (``inf``) does not make the mean infinite.
    """
    p, t = _check_pair(pred, target)
    val = frame_psnr(p, t)
    if cap is not None:
        val = val.clamp(max=cap)
    return float(val.mean())


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over frames of :func:`frame_ssim`.

    Args:
        pred, target: ``b 3 h w`` or ``b n 3 h w`` in [0, 1].
    """
    p, t = _check_pair(pred, target)
    return float(frame_ssim(p, t).mean())


# ---------------------------------------------------------------- LPIPS

# torchvision file names of the ImageNet backbones lpips builds on.
_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


def lpips_backbone_path(net: str) -> Path:
    """Where torchvision's hub cache keeps the ImageNet weights for ``net``.

    ``$TORCH_HOME/hub/checkpoints/<file>`` (``torch.hub.get_dir()``), the same
    place ``torchvision.models.alexnet(weights=...)`` would download to.
    """
    if net not in _BACKBONE_FILES:
        raise ValueError(f"net must be one of {sorted(_BACKBONE_FILES)}, got {net!r}")
    return Path(torch.hub.get_dir()) / "checkpoints" / _BACKBONE_FILES[net]


class LPIPSMetric:
    """LPIPS distance (Zhang et al. 2018) with offline weight loading.

    The ``lpips`` package ships its calibrated linear heads (``weights/v0.1``),
    but the ImageNet backbone comes from torchvision, which would download it.
    We build lpips with a random backbone (so nothing is fetched) and then load
    the backbone from the torch hub cache; if that file is missing,
    :class:`MetricUnavailable` names it.

    Args:
        net: "alex" (the common choice for evaluation) or "vgg".
        pretrained_backbone: False builds a randomly initialised backbone
            (tests only: values are not LPIPS) and warns.
        backbone_path: explicit backbone file instead of the hub cache.
        device: where to run.
        chunk: frames per forward, bounds memory on long clips.
    """

    def __init__(
        self,
        net: str = "alex",
        pretrained_backbone: bool = True,
        backbone_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        chunk: int = 32,
    ) -> None:
        try:
            import lpips  # imported lazily: it prints on construction and pulls torchvision
        except ImportError as e:  # pragma: no cover - lpips is a hard dependency
            raise MetricUnavailable(f"LPIPS: the lpips package is not installed ({e})") from e
        if net not in _BACKBONE_FILES:
            raise ValueError(f"net must be one of {sorted(_BACKBONE_FILES)}, got {net!r}")
        path = Path(backbone_path) if backbone_path is not None else lpips_backbone_path(net)
        if pretrained_backbone and not path.is_file():
            raise MetricUnavailable(
                f"LPIPS-{net}: torchvision ImageNet backbone weights not found: {path} "
                f"(copy {path.name} there, or pass backbone_path)"
            )
        with warnings.catch_warnings():
            # torchvision warns about the deprecated `pretrained=` argument lpips uses.
            warnings.simplefilter("ignore")
            model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        if pretrained_backbone:
            self._load_backbone(model, net, path)
        else:
            warnings.warn(
                f"LPIPSMetric(net={net!r}, pretrained_backbone=False): random backbone, "
                "the values are NOT LPIPS (use only in tests)",
                stacklevel=2,
            )
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.chunk = chunk
        self.net = net

    # nn.Module-like handles, so a LightningModule can move and freeze it (modules/base.py)
    def to(self, device: str | torch.device) -> "LPIPSMetric":
        """Run on ``device`` from now on; returns self."""
        self.model = self.model.to(device)
        self.device = torch.device(device)
        return self

    def eval(self) -> "LPIPSMetric":
        """The network is always in eval mode; returns self."""
        self.model.eval()
        return self

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters of the lpips network (backbone and linear heads)."""
        return self.model.parameters()

    @staticmethod
    def _load_backbone(model: torch.nn.Module, net: str, path: Path) -> None:
        """Copy torchvision ``features.<i>`` weights into lpips' ``slice<k>.<i>`` modules."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        # lpips splits torchvision's `features` Sequential into slices but keeps
        # the original child indices as module names, so index i maps directly.
        feats: dict[str, dict[str, torch.Tensor]] = {}
        for key, val in state.items():
            if key.startswith("features."):
                _, idx, pname = key.split(".", 2)
                feats.setdefault(idx, {})[pname] = val
        loaded = 0
        for name, module in model.net.named_modules():
            idx = name.rsplit(".", 1)[-1]
            if name.startswith("slice") and "." in name and idx in feats:
                module.load_state_dict(feats[idx])
                loaded += 1
        if loaded != len(feats):
            raise MetricUnavailable(
                f"LPIPS-{net}: {path} does not match the {net} backbone ({loaded} of {len(feats)} layers loaded)"
            )

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> float:
        """Mean LPIPS over frames.

        Args:
            pred, target: ``b 3 h w`` or ``b n 3 h w`` in [0, 1] (mapped to
                [-1, 1], the range lpips expects).
        """
        p, t = _check_pair(pred, target)
        total, count = 0.0, 0
        for i in range(0, p.shape[0], self.chunk):
            a = p[i : i + self.chunk].to(self.device) * 2 - 1
            b = t[i : i + self.chunk].to(self.device) * 2 - 1
            d = self.model(a, b)  # b 1 1 1
            total += float(d.sum())
            count += d.shape[0]
        return total / max(count, 1)
