"""The VGG19 perceptual loss L_vgg of paper eqs. 5 and 7 (+ optional MRAA equivariance).

``PerceptualLoss`` compares ``relu1_1 .. relu5_1`` features of a VGG19 with
an L1 distance, weight 10 per layer, over an image pyramid (1, 1/2, 1/4, 1/8)
built with anti-aliased downsampling (Johnson et al. 2016 as used by
FOMM/MRAA/LFDM/DAWN). Shapes: b batch, c channels, h/w height/width.

Weights: the paper's loss needs ImageNet VGG19 weights, which cannot be
downloaded on every machine. ``weights="imagenet"`` looks for torchvision's
file locally, then tries torchvision's download, then fails with a message
naming the file; ``"random"`` is an explicit, loudly-warned fallback for
tests and demos; any other string is a path to a state dict.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import antialias_resize, identity_grid

__all__ = ["VGG19Features", "PerceptualLoss", "EquivarianceLoss", "VGG19_FILENAME",
           "default_vgg19_path"]

VGG19_FILENAME = "vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1 file name
_ENV_VAR = "MICROSCOPE_VGG19_WEIGHTS"
# torchvision VGG19 config "E" up to conv5_1; "M" is a 2x2 max pool. Layer
# indices of the resulting nn.Sequential match torchvision's ``features``.
_VGG19_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                               512, 512, 512, 512, "M", 512]
_RELU_INDICES = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def default_vgg19_path() -> Path:
    """Where ``weights="imagenet"`` looks first: ``$MICROSCOPE_VGG19_WEIGHTS``
    or ``<torch hub dir>/checkpoints/vgg19-dcbb9e9d.pth``
    (``~/.cache/torch/hub/checkpoints/`` unless ``TORCH_HOME`` is set)."""
    env = os.environ.get(_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILENAME


def _download_vgg19() -> dict[str, Tensor]:
    """torchvision's own download of the ImageNet VGG19 state dict (a
    separate function so tests can make it fail without a network)."""
    from torchvision.models import VGG19_Weights

    return VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False)


def _features_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep the ``features.*`` part of a full VGG19 state dict (or accept a
    features-only one) with the ``features.`` prefix stripped."""
    if any(k.startswith("features.") for k in state):
        return {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    return dict(state)


# --------------------------------------------------------------------------
# VGG19 feature extractor (frozen)
# --------------------------------------------------------------------------


class VGG19Features(nn.Module):
    """Frozen VGG19 (torchvision architecture) returning relu1_1..relu{n}_1.

    Args:
        weights: ``"imagenet"``, ``"random"`` or a path to a state dict (full
            torchvision VGG19 or its ``features`` part), see module docstring.
        num_layers: how many of relu1_1..relu5_1 to return (1..5); deeper
            layers are not built, which saves time when a loss does not use them.
        seed: seed of the ``"random"`` initialisation (deterministic, and it
            does not touch the global RNG).

    ``forward(x: b 3 h w in [0, 1]) -> [b 64 h w, b 128 h/2 w/2, ...]``;
    ImageNet normalisation is applied inside.
    """

    def __init__(self, weights: str = "imagenet", num_layers: int = 5, seed: int = 0) -> None:
        super().__init__()
        if not 1 <= num_layers <= 5:
            raise ValueError(f"num_layers must be in 1..5, got {num_layers}")
        self.num_layers = num_layers
        last = _RELU_INDICES[num_layers - 1]
        layers: list[nn.Module] = []
        cin = 3
        for v in _VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.ReLU()]
                cin = int(v)
        full = nn.Sequential(*layers)  # indices 0..29, as torchvision's features[:30]
        self._load(full, weights, seed)
        self.layers = full[: last + 1]
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def _load(net: nn.Sequential, weights: str, seed: int) -> None:
        if weights == "random":
            warnings.warn(
                "PerceptualLoss/VGG19Features uses RANDOMLY INITIALISED VGG19 weights "
                "(perceptual_weights: random). This is NOT the paper's perceptual loss; "
                "results are only meaningful for tests and demos. Put torchvision's "
                f"{VGG19_FILENAME} at {default_vgg19_path()} for the real loss.",
                UserWarning, stacklevel=3)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for m in net.modules():
                    if isinstance(m, nn.Conv2d):  # torchvision's VGG init
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                        nn.init.zeros_(m.bias)
            return
        if weights == "imagenet":
            path = default_vgg19_path()
            if path.is_file():
                state = _load_state_file(path)
            elif os.environ.get(_ENV_VAR):
                raise RuntimeError(
                    f"VGG19 weights not found at {path} (set by ${_ENV_VAR}). Download "
                    f"torchvision's {VGG19_FILENAME} on a machine with internet and put it "
                    "there, or set `perceptual_weights: random` (not the paper's loss).")
            else:
                try:
                    state = _download_vgg19()
                except Exception as err:  # no network, proxy, disk ... all end the same way
                    raise RuntimeError(
                        f"VGG19 ImageNet weights are missing: {path} does not exist and "
                        f"torchvision's download failed ({type(err).__name__}: {err}). "
                        f"Download {VGG19_FILENAME} on a machine with internet and copy it "
                        f"to {path} (or point ${_ENV_VAR} at it), or set "
                        "`perceptual_weights: random` (not the paper's loss).") from err
        else:
            state = _load_state_file(Path(weights).expanduser())
        state = _features_state(state)
        wanted = net.state_dict().keys()
        missing = [k for k in wanted if k not in state]
        if missing:
            raise RuntimeError(f"VGG19 state dict lacks {missing[:4]}{'...' if len(missing) > 4 else ''}"
                               f" (have e.g. {list(state)[:4]}); expected torchvision's vgg19 keys")
        try:
            net.load_state_dict({k: state[k] for k in wanted})
        except RuntimeError as err:
            raise RuntimeError(f"VGG19 state dict does not fit the VGG19 architecture: {err}") from err

    def train(self, mode: bool = True) -> "VGG19Features":
        """Always stays in eval mode (frozen backbone)."""
        return super().train(False)

    def forward(self, x: Tensor) -> list[Tensor]:
        """``b 3 h w`` in [0, 1] -> list of ``num_layers`` relu feature maps."""
        h = (x - self.mean) / self.std
        feats: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i in _RELU_INDICES:
                feats.append(h)
        return feats


def _load_state_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"VGG19 weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"could not read VGG19 weights from {path} "
                           f"(corrupt or not a state dict): {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RuntimeError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


# --------------------------------------------------------------------------
# eq. 5 / eq. 7: L_vgg = sum_scales sum_layers w_l * |phi_l(pred) - phi_l(target)|_1
# --------------------------------------------------------------------------


class PerceptualLoss(nn.Module):
    """Multi-scale VGG19 perceptual loss ``loss(pred, target) -> scalar``.

    Args:
        weights: VGG19 weights, ``"imagenet"`` | ``"random"`` | path (see
            ``VGG19Features``).
        scales: image pyramid scales; each scale must leave at least 16
            pixels per side when relu5_1 is used (four 2x2 poolings).
        layer_weights: weights of relu1_1..relu5_1 (default 10 each, the
            baseline's). Trailing zeros drop the deeper layers entirely
            (not computed), e.g. ``(10, 10, 10, 0, 0)``.
        l1_weight: weight of an extra pixel L1 term (0 = the paper's loss).
        l1_scales: pyramid scales of that L1 term, each weighted ``l1_weight``
            (default: full resolution only). Coarse scales widen the reach of
            the warp's gradient: on a 1/8 image an 8 px displacement is 1 px,
            where bilinear sampling still sees it.
        seed: seed of the ``"random"`` weights.

    Per layer the L1 distance is the mean over all elements. The target's
    features are computed without gradient (it is the ground truth). The
    backbone is frozen and *not persistent*: it is held outside the module
    tree, so it is absent from ``state_dict()``/``parameters()`` (checkpoints
    stay small and the optimizer never sees it) but follows ``.to()``/
    ``.cuda()``/``.half()``.
    """

    def __init__(self, weights: str = "imagenet", scales: Sequence[float] = (1.0, 0.5, 0.25, 0.125),
                 layer_weights: Sequence[float] = (10.0, 10.0, 10.0, 10.0, 10.0),
                 l1_weight: float = 0.0, l1_scales: Sequence[float] = (1.0,), seed: int = 0) -> None:
        super().__init__()
        if not l1_scales or any(not 0 < s <= 1 for s in l1_scales):
            raise ValueError(f"l1_scales must be non-empty and in (0, 1], got {list(l1_scales)}")
        layer_weights = [float(w) for w in layer_weights]
        if not 1 <= len(layer_weights) <= 5:
            raise ValueError(f"layer_weights needs 1..5 entries, got {len(layer_weights)}")
        if not scales or any(not 0 < s <= 1 for s in scales):
            raise ValueError(f"scales must be non-empty and in (0, 1], got {list(scales)}")
        while layer_weights and layer_weights[-1] == 0.0:
            layer_weights.pop()
        self.layer_weights = layer_weights
        self.scales = [float(s) for s in scales]
        self.l1_weight = float(l1_weight)
        self.l1_scales = [float(s) for s in l1_scales]
        backbone = VGG19Features(weights, num_layers=max(1, len(layer_weights)), seed=seed) \
            if layer_weights else None
        # plain attribute, not a submodule: excluded from state_dict/parameters
        object.__setattr__(self, "backbone", backbone)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # keep the hidden backbone on the same device/dtype as the module
        super()._apply(fn, recurse)
        if self.backbone is not None:
            self.backbone._apply(fn)
        return self

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """``pred, target: b 3 h w`` in [0, 1] -> scalar loss."""
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        loss = pred.new_zeros(())
        h, w = pred.shape[-2:]
        for s in self.l1_scales if self.l1_weight else ():
            size = (max(1, round(h * s)), max(1, round(w * s)))
            loss = loss + self.l1_weight * (antialias_resize(pred, size) - antialias_resize(target, size)).abs().mean()
        if self.backbone is None:
            return loss
        min_side = 2 ** (len(self.layer_weights) - 1)
        for s in self.scales:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            if min(size) < min_side:
                raise ValueError(f"scale {s} of a {h}x{w} image is {size[0]}x{size[1]}, "
                                 f"smaller than the {min_side} px needed by relu"
                                 f"{len(self.layer_weights)}_1; drop the scale")
            fp = self.backbone(antialias_resize(pred, size))
            with torch.no_grad():
                ft = self.backbone(antialias_resize(target, size))
            for wgt, a, b in zip(self.layer_weights, fp, ft):
                if wgt:
                    loss = loss + wgt * (a - b).abs().mean()
        return loss


# --------------------------------------------------------------------------
# optional extra (not in eq. 5): MRAA shift equivariance of the regions
# --------------------------------------------------------------------------


class EquivarianceLoss(nn.Module):
    """Region centres must move with a random warp of the image (MRAA/FOMM).

    A random transform ``T`` (affine with std ``sigma_affine`` around the
    identity plus a thin-plate spline with ``points_tps``^2 control points and
    std ``sigma_tps``) maps coordinates of the warped image ``x'(z) = x(T(z))``
    into the original. A region at ``mu`` in ``x`` sits at ``mu'`` in ``x'``
    with ``T(mu') = mu``, so the loss is ``|T(mu') - mu|_1`` (shift part only;
    the affine part of MRAA's equivariance is not implemented).

    ``forward(region_fn, image, shift)``: ``region_fn(b 3 h w) -> b k 2``
    (e.g. ``lambda x: fde.regions(x)["shift"]``), ``image: b 3 h w``, and
    ``shift: b k 2`` the centres already computed on ``image``.
    """

    def __init__(self, sigma_affine: float = 0.05, sigma_tps: float = 0.005,
                 points_tps: int = 5) -> None:
        super().__init__()
        self.sigma_affine = sigma_affine
        self.sigma_tps = sigma_tps
        self.points_tps = points_tps

    def _transform(self, b: int, like: Tensor) -> Callable[[Tensor], Tensor]:
        """Random ``T: b n 2 -> b n 2`` (per batch element)."""
        theta = torch.eye(2, 3, device=like.device, dtype=like.dtype) \
            + self.sigma_affine * torch.randn(b, 2, 3, device=like.device, dtype=like.dtype)
        ctrl = identity_grid(self.points_tps, self.points_tps, like.device, like.dtype)
        ctrl = ctrl.flatten(2).transpose(1, 2)[0]  # p 2
        wts = self.sigma_tps * torch.randn(b, ctrl.shape[0], 2, device=like.device, dtype=like.dtype)

        def apply(z: Tensor) -> Tensor:
            out = z @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
            r2 = ((z[:, :, None] - ctrl[None, None]) ** 2).sum(-1)  # b n p
            u = r2 * torch.log(r2 + 1e-6)  # TPS kernel r^2 log r^2
            return out + u @ wts

        return apply

    def forward(self, region_fn: Callable[[Tensor], Tensor], image: Tensor, shift: Tensor) -> Tensor:
        b, _, h, w = image.shape
        t = self._transform(b, image)
        grid = t(identity_grid(h, w, image.device, image.dtype).expand(b, -1, -1, -1).flatten(2).transpose(1, 2))
        warped = F.grid_sample(image, grid.view(b, h, w, 2), mode="bilinear",
                               padding_mode="reflection", align_corners=False)
        return (t(region_fn(warped)) - shift).abs().mean()
