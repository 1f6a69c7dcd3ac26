"""Single-stage pixel VAE, the "VAE d/32" ablation of the paper (Table 5).

MDCF reaches its H/32 latent in two stages (FDE dynamics at H/4, then the
LMAE); this baseline compresses the frame itself to the same latent size
(4 channels, five 2x downsamplings) with the same KL auto-encoder core
(:class:`~microscope_pl.models.lmae.KLAutoencoder`), so the comparison
isolates what the motion representation buys.

Shapes use einops letters: b batch, h/w height/width.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .lmae import KLAutoencoder

__all__ = ["PixelVAE"]


class PixelVAE(KLAutoencoder):
    """KL auto-encoder on RGB frames in [0, 1]: ``b 3 H W -> b c h w -> b 3 H W``.

    ``h, w = H/2^k, W/2^k`` with ``k = num_down``. The encoder sees the
    zero-centred ``2 x - 1`` and every decoded channel goes through a sigmoid,
    so reconstructions lie in (0, 1); the untrained decoder (zero-initialised
    last conv) emits a uniform grey. The mid blocks carry self-attention and
    the decoder upsamples with nearest neighbours, as in the LMAE's default.

    Args:
        latent_channels: channels of ``z`` (4, as MDCF).
        num_down: 2x downsamplings on pixels (5: H/32, as MDCF's latent).
        base_channels: width of the first level.
        channel_mult: per-level width multipliers, ``num_down + 1`` entries;
            ``None`` means ``min(2**i, 4)``, i.e. ``(1, 2, 4, 4, 4, 4)``.
        num_res_blocks: res blocks per level (encoder and decoder alike).
        norm_groups: GroupNorm groups; must divide every level width.
    """

    def __init__(
        self,
        latent_channels: int = 4,
        num_down: int = 5,
        base_channels: int = 32,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int = 1,
        norm_groups: int = 8,
    ) -> None:
        super().__init__(3, latent_channels, num_down, base_channels, channel_mult, num_res_blocks,
                         norm_groups, mid_attention=True, dropout=0.0, upsample="nearest")

    def encode(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior parameters of ``q(z | x)`` for ``frames: b 3 H W`` in [0, 1].

        Returns:
            ``(mu, logvar)``, each ``b latent H/2^k W/2^k``; logvar clamped to
            [-30, 20].
        """
        return super().encode(frames)

    def decode(self, z: Tensor) -> Tensor:
        """``b latent h w -> b 3 (h 2^k) (w 2^k)`` in (0, 1), float32."""
        return super().decode(z)

    def forward(self, frames: Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Encode, draw ``z`` (or take ``mu`` when ``sample=False``), decode.

        Args:
            frames: ``b 3 H W`` in [0, 1].
            sample: draw ``z`` from the posterior (training) or use ``mu``.
            generator: optional generator for the draw.

        Returns:
            ``dict(frame=b 3 H W in (0, 1), mu=b latent h w, logvar=..., z=...)``.
        """
        mu, logvar, z = self._posterior(frames, sample, generator)
        return {"frame": self.decode(z), "mu": mu, "logvar": logvar, "z": z}

    def _to_input(self, x: Tensor) -> Tensor:
        return x * 2 - 1

    def _from_output(self, o: Tensor, mid: Tensor) -> Tensor:
        return torch.sigmoid(o)
