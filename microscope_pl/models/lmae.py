"""Latent motion auto-encoder (LMAE), stage 2 of MICROSCOPE's MDCF.

The LMAE compresses the FDE dynamics ``[f; m]`` (``b 3 h w`` at H/4: an
absolute ``grid_sample`` grid in [-1, 1] and an occlusion map in [0, 1]) into a
KL-regularised latent ``z`` (``b 4 h/8 w/8``, i.e. H/32 overall). At
256 x 256 this is the paper's 768x compression (section 4.1).

:class:`KLAutoencoder` is the encoder / decoder core; :class:`LMAE` adds the
dynamics-specific input and output mapping, and ``pixel_vae.PixelVAE`` (the
"VAE d/32" ablation of Table 5) the image one.

Shapes use einops letters: b batch, c channels, h/w height/width.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .blocks import Downsample, SiLUResBlock, Upsample, apply_affine, identity_grid

__all__ = ["KLAutoencoder", "LMAE", "SelfAttention2d"]

# Posterior log-variance range, as in latent-diffusion's DiagonalGaussian:
# exp(-30) is numerically zero variance, exp(20) is far beyond anything the
# KL term lets survive; clamping only guards against inf/nan early on.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


# --------------------------------------------------------------------------
# Mid-block attention (GroupNorm everywhere: DDP-safe, batch-size independent)
# --------------------------------------------------------------------------


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


def _zero(layer: nn.Conv2d | nn.Linear) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _mid_block(channels: int, groups: int, dropout: float, attention: bool) -> nn.Sequential:
    layers: list[nn.Module] = [SiLUResBlock(channels, channels, groups, dropout)]
    if attention:
        layers.append(SelfAttention2d(channels, groups))
    layers.append(SiLUResBlock(channels, channels, groups, dropout))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------
# KL auto-encoder core (shared by LMAE and PixelVAE)
# --------------------------------------------------------------------------


class KLAutoencoder(nn.Module):
    """KL-regularised convolutional auto-encoder in the latent-diffusion layout.

    Encoder (``E_LE`` for the LMAE): conv in, ``num_down`` levels of res blocks
    each followed by a stride-2 downsample, a last level of res blocks, a mid
    block (res, optional self-attention, res), then GN/SiLU/conv to
    ``2 * latent_channels`` = (mu, logvar). The decoder (``LD``) mirrors it.

    Subclasses say how data enters and leaves the network: ``_to_input`` maps
    the data to the encoder input, ``_from_output`` the raw decoder output
    ``b c h w`` (and the pooled mid features ``b c'``) to bounded data.

    All residual branches (res blocks, attention) and the decoder's last conv
    are zero initialised, so the untrained network is close to a chain of
    identities and decodes a constant rather than noise (the "zero module"
    trick of diffusion U-Nets). Decoded tensors are returned in float32.

    Args:
        in_channels: channels of the data (3 for ``[f; m]`` or RGB); also the
            decoder's output width.
        latent_channels: channels of ``z`` (4 in the paper).
        num_down: number of 2x downsamplings.
        base_channels: width of the first level.
        channel_mult: per-level width multipliers, ``num_down + 1`` entries;
            ``None`` means ``min(2**i, 4)``, i.e. ``(1, 2, 4, 4)`` for three
            downsamplings.
        num_res_blocks: res blocks per level (encoder and decoder alike).
        norm_groups: GroupNorm groups; must divide every level width.
        mid_attention: add one self-attention layer at the lowest resolution
            in the encoder and decoder mid blocks.
        dropout: dropout inside res blocks.
        upsample: decoder upsampling, ``"nearest"`` (LDM's) or ``"bilinear"``.
    """

    def __init__(
        self,
        in_channels: int,
        latent_channels: int = 4,
        num_down: int = 3,
        base_channels: int = 64,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int = 1,
        norm_groups: int = 32,
        mid_attention: bool = True,
        dropout: float = 0.0,
        upsample: Literal["nearest", "bilinear"] = "nearest",
    ) -> None:
        super().__init__()
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample must be 'nearest' or 'bilinear', got {upsample!r}")
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
        g = norm_groups

        # ---- encoder: b c h w -> b 2*latent h/2^k w/2^k ------------------
        self.enc_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        enc: list[nn.Module] = []
        prev = widths[0]
        for i, wdt in enumerate(widths):
            for _ in range(num_res_blocks):
                enc.append(SiLUResBlock(prev, wdt, g, dropout))
                prev = wdt
            if i < num_down:
                enc.append(Downsample(prev))
        self.enc_blocks = nn.Sequential(*enc)
        self.enc_mid = _mid_block(prev, g, dropout, mid_attention)
        self.enc_out = nn.Sequential(
            nn.GroupNorm(g, prev, eps=1e-6), nn.SiLU(), nn.Conv2d(prev, 2 * latent_channels, 3, padding=1)
        )

        # ---- decoder: b latent h/2^k w/2^k -> b c h w --------------------
        self.dec_in = nn.Conv2d(latent_channels, widths[-1], 3, padding=1)
        self.dec_mid = _mid_block(widths[-1], g, dropout, mid_attention)
        dec: list[nn.Module] = []
        prev = widths[-1]
        for i in reversed(range(num_down + 1)):
            for _ in range(num_res_blocks):
                dec.append(SiLUResBlock(prev, widths[i], g, dropout))
                prev = widths[i]
            if i > 0:
                dec.append(Upsample(prev, upsample))
        self.dec_blocks = nn.Sequential(*dec)
        self.dec_out = nn.Sequential(
            nn.GroupNorm(g, prev, eps=1e-6), nn.SiLU(), nn.Conv2d(prev, in_channels, 3, padding=1)
        )
        # Zero init (res blocks zero their second conv themselves): the
        # untrained decoder emits a constant instead of random structure.
        for module in self.modules():
            if isinstance(module, SelfAttention2d):
                _zero(module.proj)
        _zero(self.dec_out[-1])
        self.mid_channels = widths[-1]

    # ------------------------------------------------------------------ shapes

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction of the auto-encoder alone (``2**num_down``)."""
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
            raise ValueError(f"input size {h}x{w} is not divisible by the {type(self).__name__} factor {f} "
                             f"(num_down={self.num_down})")

    # ------------------------------------------------------------ eq. 4 / 8

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters of ``q(z | x)``.

        Args:
            x: ``b c h w`` data (see the subclass for its range).

        Returns:
            ``(mu, logvar)``, each ``b latent h/2^k w/2^k``; logvar clamped to
            [-30, 20].
        """
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected b {self.in_channels} h w input, got shape {tuple(x.shape)}")
        self._check_size(x.shape[-2], x.shape[-1])
        h = self.enc_out(self.enc_mid(self.enc_blocks(self.enc_in(self._to_input(x)))))
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
        """Decoder: ``b latent h' w' -> b c (h' 2^k) (w' 2^k)``, float32."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected b {self.latent_channels} h w latent, got shape {tuple(z.shape)}")
        h = self.dec_mid(self.dec_in(z.to(self.dec_in.weight.dtype)))  # a float latent into a cast copy
        return self._from_output(self.dec_out(self.dec_blocks(h)).float(), h)

    def _posterior(self, x: Tensor, sample: bool,
                   generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(mu, logvar, z)`` with ``z`` drawn (eq. 4) or, for ``sample=False``, ``mu``."""
        mu, logvar = self.encode(x)
        z = self.sample(mu, logvar, generator) if sample else mu
        return mu, logvar, z

    # ------------------------------------------------- input/output mapping

    def _to_input(self, x: Tensor) -> Tensor:
        """Data ``b c h w`` -> encoder input ``b c h w``."""
        raise NotImplementedError

    def _from_output(self, o: Tensor, mid: Tensor) -> Tensor:
        """Raw decoder output ``o: b c h w`` (float32) and the decoder's mid
        features ``mid: b c' h' w'`` -> data ``b c h w``."""
        raise NotImplementedError


# --------------------------------------------------------------------------
# LMAE
# --------------------------------------------------------------------------


class LMAE(KLAutoencoder):
    """KL auto-encoder over the FDE dynamics ``[f; m]`` (paper section 3.1).

    Input and output parameterisation:

    - The encoder sees ``[(f - id) * flow_scale; 2 m - 1]``: the identity ramp
      carries no information, so only the displacement is fed, scaled from
      typical talking-head magnitudes (0.01-0.2 grid units) to order one so it
      is not drowned by the residual branches.
    - ``grid_mode="absolute"`` (the default): ``f^ = tanh(o[:2])``, the
      decoder emits the absolute grid, bounded in (-1, 1). The untrained
      decoder is far from the coordinate ramp, so the grid pathway gets a
      large gradient from the first step.
    - ``grid_mode="offset"``: ``f^ = clamp(id + o[:2] / flow_scale, -1, 1)``,
      the decoder emits a displacement and starts at "no motion". The clamp
      is exact in the forward pass and the identity in the backward pass;
      it loses nothing because the FDE clamps its grids and warps with
      border padding.
    - Occlusion: ``m^ = sigmoid(o[2])``.
    - ``affine_head``: the decoder also predicts one global affine
      displacement per sample (pooled mid features -> 6 numbers, zero
      initialised), added to the "offset" grid. A global head motion is a
      linear ramp in position, which convolutions rebuild from a coarse
      latent only slowly; a linear layer produces it directly. Not in the
      paper.

    Args:
        in_channels: must be 3 (grid x, y and occlusion); accepted so that
            configurations naming it keep working.
        latent_channels: channels of ``z`` (4 in the paper).
        num_down: number of 2x downsamplings (3: d/32 from H/4 dynamics; 2:
            the d/16 ablation).
        base_channels: width of the first level.
        channel_mult: per-level width multipliers, ``num_down + 1`` entries;
            ``None`` means ``min(2**i, 4)``, i.e. ``(1, 2, 4, 4)``.
        num_res_blocks: res blocks per level (encoder and decoder alike).
        norm_groups: GroupNorm groups; must divide every level width.
        mid_attention: self-attention at the lowest resolution.
        dropout: dropout inside res blocks.
        output: must be ``"dynamics"``; the image auto-encoder is
            ``pixel_vae.PixelVAE``. Accepted so that configurations naming it
            keep working.
        grid_mode: ``"absolute"`` (tanh of the predicted grid) or ``"offset"``
            (identity + predicted displacement, clamped).
        flow_scale: the encoder input displacement ``f - id`` is multiplied by
            it (and the "offset" output divided by it).
        upsample: decoder upsampling, ``"nearest"`` (LDM's) or ``"bilinear"``
            (smoother grids).
        affine_head: add the global affine displacement head (see above);
            off by default, needs ``grid_mode="offset"``.
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
        output: Literal["dynamics"] = "dynamics",
        grid_mode: Literal["absolute", "offset"] = "absolute",
        flow_scale: float = 10.0,
        upsample: Literal["nearest", "bilinear"] = "nearest",
        affine_head: bool = False,
    ) -> None:
        if output != "dynamics":
            raise ValueError(f"LMAE output must be 'dynamics' (use pixel_vae.PixelVAE for images), got {output!r}")
        if in_channels != 3:
            raise ValueError(f"LMAE needs in_channels=3 ([f; m]), got in_channels={in_channels}")
        if grid_mode not in ("absolute", "offset"):
            raise ValueError(f"grid_mode must be 'absolute' or 'offset', got {grid_mode!r}")
        if affine_head and grid_mode != "offset":
            raise ValueError(f"affine_head=True needs grid_mode='offset', got grid_mode={grid_mode!r}")
        if flow_scale <= 0:
            raise ValueError(f"flow_scale must be positive, got {flow_scale}")
        super().__init__(in_channels, latent_channels, num_down, base_channels, channel_mult,
                         num_res_blocks, norm_groups, mid_attention, dropout, upsample)
        self.grid_mode = grid_mode
        self.flow_scale = float(flow_scale)
        self.affine_head = nn.Linear(self.mid_channels, 6) if affine_head else None
        if self.affine_head is not None:  # starts at "no global motion"
            _zero(self.affine_head)

    def encode(self, dyn: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters of ``q(z | [f; m])`` (eq. 4).

        Args:
            dyn: ``b 3 h w`` dynamics (grid in [-1, 1], occlusion in [0, 1]).

        Returns:
            ``(mu, logvar)``, each ``b latent h/2^k w/2^k``; logvar clamped to
            [-30, 20].
        """
        return super().encode(dyn)

    def decode(self, z: Tensor) -> Tensor:
        """Decoder ``LD``: ``b latent h' w' -> b 3 (h' 2^k) (w' 2^k)``, float32:
        channels 0-1 the absolute grid in [-1, 1], channel 2 the occlusion in (0, 1)."""
        return super().decode(z)

    def forward(self, dyn: Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Encode, draw ``z`` (eq. 4, or take ``mu`` when ``sample=False``), decode.

        Args:
            dyn: ``b 3 h w`` dynamics.
            sample: draw ``z`` from the posterior (training) or use ``mu``
                (deterministic reconstruction, e.g. validation).
            generator: optional generator for the draw.

        Returns:
            ``dict(dynamics=b 3 h w, mu=b latent h' w', logvar=..., z=...)``.
        """
        mu, logvar, z = self._posterior(dyn, sample, generator)
        return {"dynamics": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    def _to_input(self, x: Tensor) -> Tensor:
        """``[f; m] -> [(f - id) * flow_scale; 2 m - 1]``."""
        grid = identity_grid(x.shape[-2], x.shape[-1], x.device, x.dtype)
        return torch.cat([(x[:, :2] - grid) * self.flow_scale, x[:, 2:] * 2 - 1], dim=1)

    def _from_output(self, o: Tensor, mid: Tensor) -> Tensor:
        """Raw decoder output ``b 3 h w`` -> bounded ``[f^; m^]`` (see the class docstring)."""
        if self.grid_mode == "offset":
            ident = identity_grid(o.shape[-2], o.shape[-1], o.device, o.dtype)
            grid = ident + o[:, :2] / self.flow_scale
            if self.affine_head is not None:
                affine = self.affine_head(mid.mean(dim=(2, 3))).float().view(-1, 2, 3)
                grid = grid + apply_affine(affine, ident[0])
            # straight-through clamp: exact [-1, 1] forward, identity backward
            grid = grid + (grid.clamp(-1.0, 1.0) - grid).detach()
        else:
            grid = torch.tanh(o[:, :2])
        return torch.cat([grid, torch.sigmoid(o[:, 2:])], dim=1)
