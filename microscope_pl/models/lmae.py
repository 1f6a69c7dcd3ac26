"""Latent motion auto-encoder (LMAE), stage 2 of MICROSCOPE's MDCF.

The LMAE compresses the FDE dynamics ``[f; m]`` (``b 3 h w`` at H/4: an
absolute ``grid_sample`` grid in [-1, 1] and an occlusion map in [0, 1]) into a
KL-regularised latent ``z`` (``b 4 h/8 w/8``, i.e. H/32 overall). At
256 x 256 this is the paper's 768x compression (section 4.1).

The same class, with ``output="image"``, is the single-stage pixel VAE of the
ablation "VAE d/32" (Table 5): ``LMAE(in_channels=3, num_down=5,
output="image")`` applied to frames in [0, 1].

Shapes use einops letters: b batch, c channels, h/w height/width.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .blocks import apply_affine

__all__ = ["LMAE", "identity_grid"]

# Posterior log-variance range, as in latent-diffusion's DiagonalGaussian:
# exp(-30) is numerically zero variance, exp(20) is far beyond anything the
# KL term lets survive; clamping only guards against inf/nan early on.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def identity_grid(h: int, w: int, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """The "no motion" sampling grid for ``grid_sample(align_corners=False)``.

    Returns:
        ``1 2 h w`` with channel 0 = x and channel 1 = y, pixel centres at
        ``(2 i + 1) / size - 1``, so every value lies strictly inside (-1, 1).
    """
    xs = (torch.arange(w, device=device, dtype=torch.float32) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=device, dtype=torch.float32) * 2 + 1) / h - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=0).unsqueeze(0).to(dtype)


# --------------------------------------------------------------------------
# Building blocks (GroupNorm everywhere: DDP-safe, batch-size independent)
# --------------------------------------------------------------------------


class ResBlock(nn.Module):
    """Pre-activation residual block: (GN, SiLU, conv3) x 2 plus a skip.

    ``b cin h w -> b cout h w``; the skip is a 1x1 conv when widths differ.
    """

    def __init__(self, cin: int, cout: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Single-head spatial self-attention with a residual: ``b c h w -> b c h w``.

    Used once at the lowest resolution (8 x 8 tokens at 256 px), where it is
    cheap and gives every latent position a view of the whole face.
    """

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv: ``b c h w -> b c h/2 w/2`` (learned, unlike pooling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """2x ("nearest" or "bilinear") then 3x3 conv: ``b c h w -> b c 2h 2w`` (no checkerboard)."""

    def __init__(self, channels: int, mode: str = "nearest") -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        extra = {} if self.mode == "nearest" else {"align_corners": False}
        return self.conv(F.interpolate(x, scale_factor=2.0, mode=self.mode, **extra))


def _zero(conv: nn.Conv2d) -> None:
    nn.init.zeros_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _mid_block(channels: int, groups: int, dropout: float, attention: bool) -> nn.Sequential:
    layers: list[nn.Module] = [ResBlock(channels, channels, groups, dropout)]
    if attention:
        layers.append(SelfAttention2d(channels, groups))
    layers.append(ResBlock(channels, channels, groups, dropout))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------
# LMAE
# --------------------------------------------------------------------------


class LMAE(nn.Module):
    """KL auto-encoder over the FDE dynamics ``[f; m]`` (paper section 3.1).

    Encoder ``E_LE``: conv in, ``num_down`` levels of res blocks each followed by
    a stride-2 downsample, a last level of res blocks, a mid block (res,
    optional self-attention, res), then GN/SiLU/conv to ``2 * latent_channels``
    = (mu, logvar). The decoder ``LD`` mirrors it with nearest upsampling.

    Input / output parameterisation (``output="dynamics"``), chosen by
    measurement:

    - The encoder sees ``[(f - id) * flow_scale; 2 m - 1]``: the identity ramp
      carries no information, so only the displacement is fed, scaled from
      typical talking-head magnitudes (0.01-0.2 grid units) to order one.
      Unscaled, the small signal sits under the GroupNorm'd residual branches
      and the grid error after 1000 steps was about 5x higher.
    - ``grid_mode="absolute"`` (default): ``f^ = tanh(o[:2])``, the decoder
      emits the absolute grid, bounded in (-1, 1) by the tanh.
    - ``grid_mode="offset"``: ``f^ = clamp(id + o[:2] / flow_scale, -1, 1)``
      (clamp in the forward pass, straight-through gradient; lossless since
      FDE clamps its grids and warps with border padding).
    - Occlusion: ``m^ = sigmoid(o[2])``.

    We expected "offset" to win (identity at init, no ramp to synthesise) and
    measured the opposite. On smooth synthetic dynamics (random affine +
    low-frequency warp, smooth occlusion; fresh batches of 8, Adam 1e-3,
    base_channels=16, eq. 6 loss, held-out MSE): at 64 x 64 after 500 steps
    the grid MSE was 1.3e-3 for "absolute", 3.5e-3 for "offset" and 5.8e-3
    for ``tanh(atanh(id) + o)`` (identity baseline 1.2e-2); at 32 x 32 after
    1000 steps "absolute" reached 9.9e-4 while "offset" stayed at the
    identity baseline. With "offset" the untrained decoder already matches
    the grid to within the small displacement variance, so under eq. 6 the
    occlusion channel's larger error claims the shared capacity and the grid
    pathway is barely trained; "absolute" starts with a large grid error
    (the coordinate ramp), which trains that pathway early. "offset" did
    reconstruct the occlusion better (1.7e-3 vs 4.7e-3); the grid matters
    more, since it decides where every feature is warped from. The atanh
    variant lost because a uniform translation needs an offset growing as
    ``1 / (1 - id^2)`` toward the borders, i.e. position dependent.

    Under the full phase-2 loss on a trained FDE's dynamics (IGC image term
    included; configs/phase2_lmae.yaml, 10 CPU minutes at 128 px) the
    ranking flips: "offset" came within 0.23 dB PSNR of FDE alone, while
    "absolute" lost 1.9 dB in an earlier run (on an FDE that still copied its
    source). On the flows of an FDE with ``global_alignment`` (a global
    affine head motion everywhere) "offset" alone stayed at the identity
    (MDCF 23.06 dB, the same as copying the source) and ``affine_head`` with
    bilinear upsampling fixed it (26.17 dB against FDE's 26.73 dB). The CPU
    config uses all three; the default stays "absolute" until a GPU-scale
    run decides.

    All residual branches (res blocks, attention) and the decoder's last conv
    are zero initialised, so the untrained network is close to a chain of
    identities (the "zero module" trick of diffusion U-Nets); in our runs it
    roughly halved the error reached in a fixed number of steps.

    With ``output="image"`` the encoder sees ``2 x - 1`` and every output
    channel goes through a sigmoid, so the class doubles as a pixel VAE.

    Decoded tensors are returned in float32.

    Args:
        in_channels: channels of the input and of the output (3 for ``[f; m]``
            or RGB).
        latent_channels: channels of ``z`` (4 in the paper).
        num_down: number of 2x downsamplings (3 -> d/32 from H/4 dynamics; 2 is
            the d/16 ablation; 5 on frames is the "VAE d/32" ablation).
        base_channels: width of the first level.
        channel_mult: per-level width multipliers, ``num_down + 1`` entries;
            ``None`` means ``min(2**i, 4)``, i.e. ``(1, 2, 4, 4)`` for three
            downsamplings.
        num_res_blocks: res blocks per level (encoder and decoder alike).
        norm_groups: GroupNorm groups; must divide every level width.
        mid_attention: add one self-attention layer at the lowest resolution
            in the encoder and decoder mid blocks.
        dropout: dropout inside res blocks.
        output: ``"dynamics"`` (grid + occlusion, see above) or ``"image"``.
        grid_mode: ``"absolute"`` (tanh of the predicted grid) or ``"offset"``
            (identity + predicted displacement, clamped); dynamics only.
        flow_scale: the encoder input displacement ``f - id`` is multiplied by
            it (and the "offset" output divided by it); dynamics only.
        upsample: decoder upsampling, ``"nearest"`` (LDM's) or ``"bilinear"``.
        affine_head: the decoder also predicts one global affine displacement
            per sample (pooled mid features -> 6 numbers, zero initialised),
            added to the "offset" grid: a global head motion is a linear ramp
            in position, which convolutions rebuild from a coarse latent only
            slowly. Not in the paper (off by default); needs
            ``grid_mode="offset"``. Measured on a trained FDE's dynamics at
            32 x 32 (eq. 6 alone, 800 steps, two seeds): held-out grid MSE
            4.9e-4 / 5.8e-4 with it and bilinear upsampling, against
            1.1e-3 / 2.9e-3 for "absolute" and 4.6e-3 for the identity.
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        num_down: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int = 1,
        norm_groups: int = 32,
        mid_attention: bool = True,
        dropout: float = 0.0,
        output: Literal["dynamics", "image"] = "dynamics",
        grid_mode: Literal["absolute", "offset"] = "absolute",
        flow_scale: float = 10.0,
        upsample: Literal["nearest", "bilinear"] = "nearest",
        affine_head: bool = False,
    ) -> None:
        super().__init__()
        if output not in ("dynamics", "image"):
            raise ValueError(f"output must be 'dynamics' or 'image', got {output!r}")
        if grid_mode not in ("absolute", "offset"):
            raise ValueError(f"grid_mode must be 'absolute' or 'offset', got {grid_mode!r}")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
        if affine_head and (output != "dynamics" or grid_mode != "offset"):
            raise ValueError("affine_head needs output='dynamics' and grid_mode='offset'")
        if flow_scale <= 0:
            raise ValueError(f"flow_scale must be positive, got {flow_scale}")
        if output == "dynamics" and in_channels != 3:
            raise ValueError(f"output='dynamics' needs in_channels=3 ([f; m]), got in_channels={in_channels}")
        if num_down < 0 or latent_channels < 1 or base_channels < 1 or num_res_blocks < 0:
            raise ValueError(
                f"need num_down >= 0, latent_channels >= 1, base_channels >= 1, num_res_blocks >= 0; got "
                f"num_down={num_down}, latent_channels={latent_channels}, base_channels={base_channels}, "
                f"num_res_blocks={num_res_blocks}"
            )
        mult = tuple(channel_mult) if channel_mult is not None else tuple(min(2**i, 4) for i in range(num_down + 1))
        if len(mult) != num_down + 1:
            raise ValueError(f"channel_mult has {len(mult)} entries {mult}, num_down={num_down} needs {num_down + 1}")
        widths = [base_channels * m for m in mult]
        for wdt in widths:
            if wdt % norm_groups != 0:
                raise ValueError(f"norm_groups={norm_groups} does not divide level width {wdt} (widths {widths})")

        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.num_down = num_down
        self.output = output
        self.grid_mode = grid_mode
        self.flow_scale = float(flow_scale)
        g = norm_groups

        # ---- encoder E_LE: b c h w -> b 2*latent h/2^k w/2^k -------------
        self.enc_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        enc: list[nn.Module] = []
        prev = widths[0]
        for i, wdt in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(ResBlock(prev, wdt, g, dropout))
                prev = wdt
            if i < num_down:
                enc.append(Downsample(prev))
        self.enc_blocks = nn.Sequential(*enc)
        self.enc_mid = _mid_block(prev, g, dropout, mid_attention)
        self.enc_out = nn.Sequential(
            nn.GroupNorm(g, prev, eps=1e-6), nn.SiLU(), nn.Conv2d(prev, 2 * latent_channels, 3, padding=1)
        )

        # ---- decoder LD: b latent h/2^k w/2^k -> b c h w -----------------
        self.dec_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)
        self.dec_mid = _mid_block(widths[-1], g, dropout, mid_attention)
        dec: list[nn.Module] = []
        prev = widths[-1]
        for i in reversed(range(num_down + 1)):
            for _ in range(num_res_blocks):
                dec.append(ResBlock(prev, widths[i], g, dropout))
                prev = widths[i]
            if i > 0:
                dec.append(Upsample(prev, upsample))
        self.dec_blocks = nn.Sequential(*dec)
        self.dec_out = nn.Sequential(nn.GroupNorm(g, prev, eps=1e-6), nn.SiLU(), nn.Conv2d(prev, in_channels, 3, padding=1))
        # Zero init: every residual branch starts as the identity and the
        # untrained decoder emits a constant (grid 0 with "absolute", the
        # identity grid with "offset"; m = 0.5; a grey image) instead of
        # random warps. See the class docstring for the measured effect.
        for module in self.modules():
            if isinstance(module, ResBlock):
                _zero(module.conv2)
            elif isinstance(module, SelfAttention2d):
                _zero(module.proj)
        _zero(self.dec_out[-1])
        self.affine_head = nn.Linear(widths[-1], 6) if affine_head else None
        if self.affine_head is not None:  # starts at "no global motion"
            nn.init.zeros_(self.affine_head.weight)
            nn.init.zeros_(self.affine_head.bias)

    # ------------------------------------------------------------------ shapes

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the LMAE alone (8 for ``num_down=3``)."""
        return 2**self.num_down

    def latent_shape(self, h: int, w: int) -> tuple[int, int, int]:
        """Latent ``(c, h', w')`` for an input of spatial size ``h x w``."""
        self._check_size(h, w)
        f = self.downsample_factor
        return (self.latent_channels, h // f, w // f)

    @staticmethod
    def compression_ratio(image_shape: Sequence[int], latent_shape: Sequence[int]) -> float:
        """Compression ratio computed from shapes, never from constants.

        ``prod(image_shape) / prod(latent_shape)``. A 2-entry ``image_shape``
        ``(h, w)`` means an RGB image (3 channels); a 4-entry shape in either
        argument is treated as batched and its leading dimension dropped.
        At 256 x 256 RGB with a ``4 x 8 x 8`` latent this is 768 (paper's
        ``C_MDCF``); with ``4 x 16 x 16`` (d/16) it is 192.

        Args:
            image_shape: ``(c, h, w)``, ``(h, w)`` or ``(b, c, h, w)``.
            latent_shape: ``(c, h, w)`` or ``(b, c, h, w)``.
        """
        img = tuple(int(s) for s in image_shape)
        lat = tuple(int(s) for s in latent_shape)
        if len(img) == 4:
            img = img[1:]
        if len(lat) == 4:
            lat = lat[1:]
        if len(img) == 2:
            img = (3, *img)
        if len(img) != 3 or len(lat) != 3:
            raise ValueError(f"expected (c, h, w) shapes, got image_shape={image_shape} latent_shape={latent_shape}")
        return float(math.prod(img)) / float(math.prod(lat))

    def _check_size(self, h: int, w: int) -> None:
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"input size {h}x{w} is not divisible by the LMAE factor {f} (num_down={self.num_down})")

    # ------------------------------------------------------------ eq. 4 / 8

    def encode(self, dyn: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters of ``q(z | [f; m])``.

        Args:
            dyn: ``b 3 h w`` dynamics (grid in [-1, 1], occlusion in [0, 1]), or
                ``b c h w`` images in [0, 1] for ``output="image"``.

        Returns:
            ``(mu, logvar)``, each ``b latent h/2^k w/2^k``; logvar clamped to
            [-30, 20].
        """
        if dyn.ndim != 4 or dyn.shape[1] != self.in_channels:
            raise ValueError(f"expected b {self.in_channels} h w input, got shape {tuple(dyn.shape)}")
        self._check_size(dyn.shape[-2], dyn.shape[-1])
        h = self.enc_out(self.enc_mid(self.enc_blocks(self.enc_in(self._to_input(dyn)))))
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def sample(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised draw, paper eq. 4: ``z = mu + exp(0.5 logvar) * eps``.

        ``eps`` is drawn on the generator's device (so a CPU generator gives
        the same ``z`` on any accelerator) and moved to ``mu``'s device.

        Args:
            mu, logvar: ``b c h w`` each.
            generator: optional ``torch.Generator`` for reproducible draws.

        Returns:
            ``z``: ``b c h w``.
        """
        dev = generator.device if generator is not None else mu.device
        eps = torch.randn(mu.shape, generator=generator, device=dev, dtype=torch.float32)
        eps = eps.to(device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor) -> Tensor:
        """Decoder ``LD``: ``b latent h' w' -> b c (h' 2^k) (w' 2^k)``, float32.

        For ``output="dynamics"``: channels 0-1 the absolute grid in [-1, 1],
        channel 2 the occlusion in (0, 1). For ``"image"``: all in (0, 1).
        """
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected b {self.latent_channels} h w latent, got shape {tuple(z.shape)}")
        h = self.dec_mid(self.dec_in(z))
        o = self.dec_out(self.dec_blocks(h)).float()
        affine = None if self.affine_head is None else self.affine_head(h.mean(dim=(2, 3))).float().view(-1, 2, 3)
        return self._from_output(o, affine)

    def forward(self, dyn: Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Encode, draw ``z`` (eq. 4, or take ``mu`` when ``sample=False``), decode.

        Args:
            dyn: ``b 3 h w`` dynamics (or images, see ``encode``).
            sample: draw ``z`` from the posterior (training) or use ``mu``
                (deterministic reconstruction, e.g. validation).
            generator: optional generator for the draw.

        Returns:
            ``dict(dynamics=b 3 h w, mu=b latent h' w', logvar=..., z=...)``.
        """
        mu, logvar = self.encode(dyn)
        z = self.sample(mu, logvar, generator) if sample else mu
        return {"dynamics": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    # ------------------------------------------------- input/output transforms

    def _to_input(self, x: Tensor) -> Tensor:
        """``[f; m] -> [(f - id) * flow_scale; 2 m - 1]`` (dynamics) or ``2 x - 1`` (image)."""
        if self.output == "image":
            return x * 2 - 1
        grid = identity_grid(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return torch.cat([(x[:, :2] - grid) * self.flow_scale, x[:, 2:] * 2 - 1], dim=1)

    def _from_output(self, o: Tensor, affine: Tensor | None = None) -> Tensor:
        """Map raw decoder output ``b c h w`` (and the global affine displacement
        ``b 2 3`` of ``affine_head``) to bounded dynamics or an image."""
        if self.output == "image":
            return torch.sigmoid(o)
        if self.grid_mode == "offset":
            ident = identity_grid(o.shape[-2], o.shape[-1], o.device, o.dtype)
            grid = ident + o[:, :2] / self.flow_scale
            if affine is not None:
                grid = grid + apply_affine(affine, ident[0])
            # straight-through clamp: exact [-1, 1] forward, identity backward
            grid = grid + (grid.clamp(-1.0, 1.0) - grid).detach()
        else:
            grid = torch.tanh(o[:, :2])
        return torch.cat([grid, torch.sigmoid(o[:, 2:])], dim=1)
