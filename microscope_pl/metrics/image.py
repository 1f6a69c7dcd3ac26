"""Per-frame reconstruction metrics: PSNR, SSIM (torchmetrics) and LPIPS (lpips package).

All inputs are images ``b 3 h w`` or clips ``b n 3 h w`` in [0, 1]; clips are
flattened to frames and the metric is averaged over frames (the usual
convention for video reconstruction tables).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from microscope_pl.metrics.common import MetricUnavailable


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


def psnr(pred: torch.Tensor, target: torch.Tensor, cap: float | None = None) -> float:
    """Mean over frames of per-frame PSNR in dB (data range 1).

    Args:
        pred, target: ``b 3 h w`` or ``b n 3 h w`` in [0, 1].
        cap: if given, each frame's PSNR is clipped to it before averaging, so
            one identical frame (``inf``) does not make the mean infinite.

    Per-frame (``dim=(1, 2, 3)``) rather than one MSE over the whole batch, so
    a single bad frame is not averaged away before the log. Identical frames
    give ``inf``.
    """
    p, t = _check_pair(pred, target)
    val = peak_signal_noise_ratio(p, t, data_range=1.0, dim=(1, 2, 3), reduction="none")
    if cap is not None:
        val = val.clamp(max=cap)
    return float(val.mean())


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean SSIM over frames (Gaussian window 11, sigma 1.5, data range 1).

    Args:
        pred, target: ``b 3 h w`` or ``b n 3 h w`` in [0, 1].
    """
    p, t = _check_pair(pred, target)
    return float(structural_similarity_index_measure(p, t, data_range=1.0))


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
