"""Building blocks and grid helpers shared by every network in ``models/``.

Everything here is a plain ``nn.Module`` or a pure function; nothing imports
Lightning. Shapes use einops letters: b batch, c channels, k regions,
h/w height/width.

Two residual blocks exist because the networks come from two lineages:

- :class:`ReLUResBlock`, constant width, norm/ReLU (MRAA/LFDM): the FDE
  generator bottleneck;
- :class:`SiLUResBlock`, GroupNorm/SiLU with an optional width change,
  dropout and scale-shift modulation (LDM/ADM): the KL auto-encoders
  (``lmae.py``, ``pixel_vae.py``) and, extended with a temporal conv, the
  3D U-Net (``unet3d.py``).

Grid convention (docs/interfaces.md): a sampling grid is an absolute
coordinate map ``b 2 h w`` in [-1, 1], channel 0 is x (width), channel 1 is y
(height), used with ``F.grid_sample(align_corners=False)``. With
``align_corners=False`` the value -1 is the *outer edge* of the first pixel,
so pixel ``i`` of an ``n``-pixel axis has its centre at ``(2 i + 1) / n - 1``.
Every resize and warp in this package uses that convention; mixing it with
``align_corners=True`` would shift images by half a pixel per resize.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "group_count",
    "make_norm",
    "ConvBlock",
    "DownBlock",
    "UpBlock",
    "ReLUResBlock",
    "Hourglass",
    "SiLUResBlock",
    "Downsample",
    "Upsample",
    "nearest_upsample_conv",
    "identity_grid",
    "apply_affine",
    "resize_grid",
    "resize_map",
    "antialias_resize",
    "warp",
]


# --------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest GroupNorm group count ``<= max_groups`` that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


def make_norm(kind: str, channels: int) -> nn.Module:
    """Return a 2-D normalisation layer for ``channels`` channels.

    ``"group"`` (default of the FDE) uses GroupNorm with at most 32 groups and
    at least 4 channels per group: the hourglass bottleneck can be 1 x 1, and
    a group of a single channel at 1 x 1 would normalise every value to zero.
    GroupNorm is batch-size independent and needs no DDP synchronisation.
    ``"batch"`` uses BatchNorm2d as the MRAA/LFDM baseline does.
    """
    if kind == "group":
        groups = max(1, min(32, channels // 4))
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be 'group' or 'batch', got {kind!r}")


# --------------------------------------------------------------------------
# conv blocks (MRAA/LFDM layout: conv -> norm -> ReLU)
# --------------------------------------------------------------------------


class ConvBlock(nn.Module):
    """``conv(k x k) -> norm -> ReLU`` at constant resolution: ``b c h w -> b c' h w``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 norm: str = "group") -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm = make_norm(norm, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(self.conv(x)), inplace=True)


class DownBlock(nn.Module):
    """``conv3x3 -> norm -> ReLU -> avgpool 2``: ``b c h w -> b c' h/2 w/2``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group") -> None:
        super().__init__()
        self.block = ConvBlock(in_channels, out_channels, 3, norm)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.block(x), 2)


# Rows (or columns) of a 3-tap kernel that land on source pixels i-1, i (phase 0)
# and i, i+1 (phase 1) of a nearest 2x upsampling: output 2i reads upsampled
# 2i-1, 2i, 2i+1 = source i-1, i, i; output 2i+1 reads source i, i, i+1.
_NEAREST_PHASES = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
                   ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def nearest_upsample_conv(x: Tensor, conv: nn.Conv2d, size: Sequence[int] | None = None) -> Tensor:
    """``conv(interpolate(x, size, "nearest"))`` for a 3x3, stride-1, padding-1 conv.

    For an exact 2x upsampling each of the four output phases (even/odd row,
    even/odd column) is a 2x2 conv of ``x`` itself with summed taps, so the
    conv runs at the source resolution with 16 instead of 36 multiplies per
    source pixel and channel pair: the same result (to float rounding) at
    about half the cost. Other sizes and kernels take the plain path.
    """
    h, w = x.shape[-2:]
    exact = size is None or (int(size[0]), int(size[1])) == (2 * h, 2 * w)
    if not exact or conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != (1, 1) \
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
        up = F.interpolate(x, size=tuple(size) if size is not None else None,
                           scale_factor=None if size is not None else 2.0, mode="nearest")
        return conv(up)
    co = conv.out_channels
    taps = torch.tensor(_NEAREST_PHASES, device=x.device, dtype=conv.weight.dtype)  # phase, 2, 3
    kernel = torch.einsum("aik,ockl,bjl->abocij", taps, conv.weight, taps).reshape(4 * co, -1, 2, 2)
    bias = None if conv.bias is None else conv.bias.repeat(4)
    y = F.conv2d(x, kernel, bias, padding=1).unflatten(1, (2, 2, co))  # b, row, column phase, c, h+1, w+1
    out = y.new_empty(x.shape[0], co, h, 2, w, 2)
    for a in (0, 1):
        for b in (0, 1):
            out[:, :, :, a, :, b] = y[:, a, b, :, a:a + h, b:b + w]
    return out.view(x.shape[0], co, 2 * h, 2 * w)  # b c h 2 w 2 -> b c 2h 2w


class UpBlock(nn.Module):
    """Nearest upsampling to ``size`` then ``conv3x3 -> norm -> ReLU``.

    The target size is passed explicitly (the matching skip's size) so odd
    sizes survive the down/up round trip: ``b c h w -> b c' H W``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "group") -> None:
        super().__init__()
        self.block = ConvBlock(in_channels, out_channels, 3, norm)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return F.relu(self.block.norm(nearest_upsample_conv(x, self.block.conv, size)), inplace=True)


class ReLUResBlock(nn.Module):
    """Pre-activation residual block ``x + conv(relu(norm(conv(relu(norm(x))))))``.

    Constant width ``b c h w -> b c h w`` (MRAA's ``ResBlock2d``); ``norm`` as
    in :func:`make_norm`. The FDE generator stacks them at its bottleneck.
    """

    def __init__(self, channels: int, norm: str = "group") -> None:
        super().__init__()
        self.norm1 = make_norm(norm, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = make_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.relu(self.norm1(x), inplace=True))
        h = self.conv2(F.relu(self.norm2(h), inplace=True))
        # in place where the dtypes agree (autograd allows it: a conv's backward needs its
        # input, not its output); under autocast x stays float32 and the sum is promoted to it
        return h.add_(x) if h.dtype == x.dtype else x + h


class Hourglass(nn.Module):
    """U-Net style hourglass used by the region and pixelwise flow predictors.

    ``num_blocks`` down blocks with channels ``min(max_features, e * 2**(i+1))``
    (e = ``block_expansion``), then mirrored up blocks, each followed by a
    concatenation with the encoder feature of the same resolution. The output
    is ``b (e + c_in) h w``: the last concatenation appends the input itself,
    so the heads see the raw input next to the decoded context (MRAA layout).
    """

    def __init__(self, in_channels: int, block_expansion: int, max_features: int,
                 num_blocks: int, norm: str = "group") -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"hourglass num_blocks must be >= 1, got {num_blocks}")
        # channels of the encoder outputs at levels 0 (the input) .. num_blocks
        enc = [in_channels] + [min(max_features, block_expansion * 2 ** (i + 1))
                               for i in range(num_blocks)]
        self.down = nn.ModuleList(DownBlock(enc[i], enc[i + 1], norm) for i in range(num_blocks))
        up: list[UpBlock] = []
        cur = enc[-1]
        for i in reversed(range(num_blocks)):
            out = min(max_features, block_expansion * 2 ** i)
            up.append(UpBlock(cur, out, norm))
            cur = out + enc[i]
        self.up = nn.ModuleList(up)
        self.out_channels = cur
        self.num_blocks = num_blocks

    def forward(self, x: Tensor) -> Tensor:
        """``b c h w -> b (e + c) h w``; needs ``min(h, w) >= 2**num_blocks``."""
        if min(x.shape[-2:]) < 2 ** self.num_blocks:
            raise ValueError(
                f"hourglass input {tuple(x.shape[-2:])} is too small for "
                f"num_blocks={self.num_blocks} (needs >= {2 ** self.num_blocks} pixels); "
                "use fewer motion blocks or a larger motion_scale")
        skips = [x]
        for block in self.down:
            skips.append(block(skips[-1]))
        out = skips.pop()
        for block in self.up:
            skip = skips.pop()
            out = torch.cat([block(out, skip.shape[-2:]), skip], dim=1)
        return out


# --------------------------------------------------------------------------
# GroupNorm/SiLU blocks (LDM/ADM layout): KL auto-encoders and the 3D U-Net
# --------------------------------------------------------------------------


class SiLUResBlock(nn.Module):
    """Pre-activation GroupNorm/SiLU residual block: ``b cin h w -> b cout h w``.

    ::

        h = conv3x3(SiLU(GN(x)))
        h = GN(h)                                   # then * (1 + scale) + shift
        out = skip(x) + conv3x3(dropout(SiLU(h)))   # zero-initialised conv

    The skip is a 1x1 conv when the widths differ. The second conv starts at
    zero, so a fresh block is its skip path and a deep stack of fresh blocks
    passes its input through instead of scrambling it (the "zero module" of
    diffusion U-Nets). With ``emb_dim``, ``self.emb`` maps an embedding to a
    per-channel ``(scale, shift)`` applied after the second norm (ADM's
    scale-shift modulation); the caller applies it and passes the result to
    ``forward``, since only the caller knows how the embedding is batched.
    """

    def __init__(self, cin: int, cout: int, groups: int | None = None, dropout: float = 0.0,
                 emb_dim: int | None = None) -> None:
        """
        Args:
            cin, cout: input and output widths.
            groups: GroupNorm groups of both norms (must divide ``cin`` and
                ``cout``); None picks :func:`group_count` of each width.
            dropout: dropout before the second conv.
            emb_dim: width of the modulation embedding; None for no modulation.
        """
        super().__init__()
        self.norm1 = nn.GroupNorm(groups or group_count(cin), cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout) if emb_dim is not None else None
        self.norm2 = nn.GroupNorm(groups or group_count(cout), cout, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, scale_shift: Tensor | None = None) -> Tensor:
        """``x: b cin h w``; ``scale_shift: b (2 cout) 1 1`` from ``self.emb``, or None."""
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if scale_shift is not None:
            scale, shift = scale_shift.chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv: ``b c h w -> b c ceil(h/2) ceil(w/2)`` (learned, unlike pooling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Interpolate then 3x3 conv: ``b c h w -> b c 2h 2w``, or ``b c H W`` for ``size``.

    Interpolation followed by a conv, rather than a transposed conv, leaves no
    checkerboard pattern. ``mode`` is ``"nearest"`` (LDM's) or ``"bilinear"``
    (smoother, for outputs that are smooth fields such as flow grids).
    Passing ``size`` (the matching skip's size) lets odd sizes survive the
    round trip through :class:`Downsample`, which rounds up.
    """

    def __init__(self, channels: int, mode: str = "nearest") -> None:
        super().__init__()
        if mode not in ("nearest", "bilinear"):
            raise ValueError(f"upsample mode must be 'nearest' or 'bilinear', got {mode!r}")
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.mode = mode

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        if self.mode == "nearest":
            return nearest_upsample_conv(x, self.conv, size)
        extra = {"align_corners": False}
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode=self.mode, **extra))
        return self.conv(F.interpolate(x, size=tuple(size), mode=self.mode, **extra))


# --------------------------------------------------------------------------
# grids, resizing and warping (the A(., f) operator of paper eq. 5)
# --------------------------------------------------------------------------


def identity_grid(h: int, w: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> Tensor:
    """The "no motion" sampling grid ``1 2 h w`` (x then y) at pixel centres.

    Values are ``(2 i + 1) / size - 1``, strictly inside (-1, 1), and
    ``F.grid_sample(x, identity_grid(h, w).permute(0, 2, 3, 1), align_corners=False)``
    returns ``x`` exactly. Callers that need a batch expand it
    (``.expand(b, -1, -1, -1)``, no copy). Coordinates are computed in
    float32 (float64 if asked for) and then cast: ``2 i + 1`` is not exact in
    bfloat16 beyond 256 pixels.
    """
    dtype = dtype or torch.float32
    work = torch.float64 if dtype == torch.float64 else torch.float32
    ys = (torch.arange(h, device=device, dtype=work) * 2 + 1) / h - 1
    xs = (torch.arange(w, device=device, dtype=work) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=0).unsqueeze(0).to(dtype)


def apply_affine(affine: Tensor, z: Tensor) -> Tensor:
    """Affines ``b 2 3`` applied to coordinates ``2 h w``: ``A z + t``, ``b 2 h w``."""
    return torch.einsum("bij,jhw->bihw", affine[:, :, :2], z) + affine[:, :, 2, None, None]


def antialias_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``b c h w -> b c H W``; anti-aliased when shrinking.

    Bilinear with ``antialias=True`` widens the filter to the scale factor
    when downsampling, so fine textures do not alias into the coarse image
    (the role of MRAA's Gaussian ``AntiAliasInterpolation2d``).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def resize_map(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a dense map (occlusion, features) ``b c h w -> b c H W``."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_grid(grid: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize an absolute grid ``b 2 h w -> b 2 H W``.

    The *displacement* from the identity grid is resized and the identity of
    the target size added back: resizing the absolute coordinates directly
    would bend the border (bilinear upsampling clamps at the edge, so the
    outermost pixel centres would move). Identity maps to identity exactly.
    """
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    h, w = grid.shape[-2:]
    disp = grid - identity_grid(h, w, grid.device, grid.dtype)
    disp = resize_map(disp, size)
    return disp + identity_grid(size[0], size[1], grid.device, grid.dtype)


def warp(x: Tensor, grid: Tensor, padding_mode: str = "border") -> Tensor:
    """Backward-warp ``x: b c h w`` with an absolute grid ``b 2 h' w'``.

    The grid is resized to the feature size first (``resize_grid``), so one
    grid warps every level of a feature pyramid. Border padding repeats the
    edge instead of pulling in zeros; it also makes coordinates outside
    [-1, 1] equivalent to the clamped ones, which is why the FDE can clamp
    its flow to [-1, 1] without changing the warp. ``x`` of batch 1 is
    broadcast (without a copy) to the grid's batch. Returns ``b c h w``.
    """
    grid = resize_grid(grid, x.shape[-2:])
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16) or grid.dtype in (torch.float16, torch.bfloat16):
        # sample positions in half precision are off by up to half a pixel at
        # 256 px (bf16 keeps 8 mantissa bits): sample in float32, cast back
        x, grid = x.float(), grid.float()
    if x.shape[0] == 1 and grid.shape[0] > 1:  # cast before expanding: one copy of the source
        x = x.expand(grid.shape[0], -1, -1, -1)
    out = F.grid_sample(x, grid.to(x.dtype).permute(0, 2, 3, 1), mode="bilinear",
                        padding_mode=padding_mode, align_corners=False)
    return out.to(dtype)
