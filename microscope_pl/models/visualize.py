"""Pictures of FDE outputs for TensorBoard: flow colour wheel and image rows.

Shapes use einops letters: b batch, c channels, h/w height/width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import identity_grid

__all__ = ["flow_to_color", "image_row"]


def flow_to_color(grid: Tensor, max_magnitude: float | None = None) -> Tensor:
    """Colour-code an absolute sampling grid ``b 2 h w`` as ``b 3 h w`` in [0, 1].

    The displacement from the identity grid (normalised units, x then y) is
    drawn on the HSV colour wheel: hue = direction, saturation = magnitude
    divided by ``max_magnitude`` (per image maximum when None), value 1. No
    motion is white.
    """
    if grid.dim() != 4 or grid.shape[1] != 2:
        raise ValueError(f"grid must be b 2 h w, got {tuple(grid.shape)}")
    b, _, h, w = grid.shape
    disp = grid.float() - identity_grid(h, w, grid.device)
    mag = disp.norm(dim=1)  # b h w
    scale = (mag.flatten(1).amax(1).view(b, 1, 1) if max_magnitude is None
             else torch.full((b, 1, 1), float(max_magnitude), device=grid.device))
    sat = (mag / scale.clamp_min(1e-8)).clamp(0, 1)
    hue = (torch.atan2(disp[:, 1], disp[:, 0]) / (2 * math.pi)) % 1.0  # [0, 1)
    # HSV -> RGB with V = 1: channel n is 1 - S * clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6 H) mod 6 for n = 5, 3, 1 (R, G, B)
    rgb = []
    for n in (5.0, 3.0, 1.0):
        k = (n + hue * 6.0) % 6.0
        rgb.append(1.0 - sat * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0))
    return torch.stack(rgb, dim=1)


def image_row(*tensors: Tensor) -> Tensor:
    """Concatenate images side by side into one ``3 H (W*k)`` image in [0, 1].

    Each argument is ``c h w`` or ``b c h w`` (then its first element is
    used). ``c = 1`` (occlusion maps, heatmaps) is repeated to RGB, ``c = 2``
    is taken as an absolute grid and colour-coded with ``flow_to_color``.
    Everything is resized (bilinear) to the first image's ``H x W``.
    """
    if not tensors:
        raise ValueError("image_row needs at least one image")
    items: list[Tensor] = []
    size: tuple[int, int] | None = None
    for t in tensors:
        t = t.detach()
        if t.dim() == 4:
            t = t[:1]
        elif t.dim() == 3:
            t = t[None]
        else:
            raise ValueError(f"expected c h w or b c h w, got {tuple(t.shape)}")
        t = t.float()
        if t.shape[1] == 2:
            t = flow_to_color(t)
        elif t.shape[1] == 1:
            t = t.expand(-1, 3, -1, -1)
        elif t.shape[1] != 3:
            raise ValueError(f"expected 1, 2 or 3 channels, got {t.shape[1]}")
        if size is None:
            size = (t.shape[-2], t.shape[-1])
        if tuple(t.shape[-2:]) != size:
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        items.append(t.clamp(0, 1).to(tensors[0].device))
    return torch.cat(items, dim=3)[0]
