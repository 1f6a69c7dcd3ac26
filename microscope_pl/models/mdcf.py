"""MDCF as a codec for diffusion: (reference, frames) <-> latent clips.

`latent="mdcf"`: z = LMAE mean (or a sample, eq. 4) of FDE's [f; m], 4 x H/32.
`latent="fde"`: the DAWN-style baseline that diffuses [f; m] at H/4 directly.
Both are normalised to unit scale with a stored `scale` buffer, so the same
denoiser and noise schedule fit either.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from einops import rearrange
from torch import Tensor, nn

from microscope_pl.models.fde import FDE
from microscope_pl.models.blocks import identity_grid
from microscope_pl.models.lmae import LMAE


def round_trip(fde: FDE, lmae: LMAE | None, source: Tensor, driving: Tensor,
               sample: bool = False) -> dict[str, Tensor]:
    """One frame pair through MDCF (eq. 6-9): [f; m] = FDE(source, driving) -> LMAE -> [f^; m^] -> FDE decode.

    `source`, `driving`: `b 3 H W`. Returns "frame" (the reconstruction
    `b 3 H W`), "dynamics" ([f^; m^]), "target_dynamics" ([f; m]), "mu",
    "logvar" (the LMAE posterior; `sample` draws z from it, eq. 4) and
    "features" (E(source)). FDE runs without gradients unless it is trainable
    (the w/o TPC ablation); a loss on "frame" reaches LMAE through FDE's
    decoder. Without LMAE (the H/4 baseline) "frame" is FDE's own reconstruction.
    """
    fde_trains = any(p.requires_grad for p in fde.parameters())
    with torch.set_grad_enabled(fde_trains and torch.is_grad_enabled()):
        target = fde.dynamics(source, driving)
        features = fde.encode(source)
    if lmae is None:
        return {"frame": fde.decode(features, target), "dynamics": target, "target_dynamics": target,
                "features": features}
    out = lmae(target, sample=sample)
    return {"frame": fde.decode(features, out["dynamics"]), "dynamics": out["dynamics"], "target_dynamics": target,
            "mu": out["mu"], "logvar": out["logvar"], "features": features}


#: On a CPU, each chunk is decoded this many pixels of frames at a time (at least 2 frames):
#: with two 256 x 256 frames per pass the generator's activations stay in the cache
#: (docs/results.md, frames per pass). The frames are the same; `decode_chunk` still sets
#: what is yielded.
CPU_DECODE_PIXELS = 2 * 256 * 256


class DynamicsCodec(nn.Module):
    """Frozen FDE (+ LMAE) turning motion from a reference frame into latents.

    Args:
        fde: the phase-1 network.
        lmae: the phase-2 network, or None for the H/4 baseline.
        latent_source: "mean" (deterministic) or "sample" (eq. 4) when encoding.
    """

    def __init__(self, fde: FDE, lmae: LMAE | None, latent_source: str = "mean") -> None:
        super().__init__()
        if latent_source not in ("mean", "sample"):
            raise ValueError(f"latent_source must be 'mean' or 'sample', got {latent_source!r}")
        self.fde = fde
        self.lmae = lmae
        self.latent_source = latent_source
        self.register_buffer("scale", torch.ones(()))  # set by calibrate(), saved in checkpoints

    @property
    def latent_channels(self) -> int:
        return self.lmae.latent_channels if self.lmae is not None else 3

    @property
    def latent_down(self) -> int:
        """Spatial factor between frames and latents (32 for MDCF, 4 for the baseline)."""
        return self.fde.downsample * (self.lmae.downsample_factor if self.lmae is not None else 1)

    def reconstruct(self, source: Tensor, driving: Tensor, sample: bool = False) -> dict[str, Tensor]:
        """Frame pairs through this codec: see :func:`round_trip`."""
        return round_trip(self.fde, self.lmae, source, driving, sample)

    # ---------------------------------------------------------------- encode
    @torch.no_grad()
    def encode_stats(self, reference: Tensor, frames: Tensor, chunk: int = 32) -> tuple[Tensor, Tensor | None]:
        """Raw latent statistics: reference `b 3 H W`, frames `b n 3 H W` ->
        (mean `b c n h w`, log-variance `b c n h w` or None for the baseline)."""
        b, n = frames.shape[:2]
        flat = rearrange(frames, "b n c h w -> (b n) c h w")
        ref = reference.repeat_interleave(n, dim=0)
        means, logvars = [], []
        for start in range(0, b * n, chunk):
            dyn = self.fde.dynamics(ref[start:start + chunk], flat[start:start + chunk])
            if self.lmae is None:  # centre the baseline: displacement from identity, occlusion in [-1, 1]
                grid = identity_grid(dyn.shape[-2], dyn.shape[-1], dyn.device, dyn.dtype)
                means.append(torch.cat([dyn[:, :2] - grid, dyn[:, 2:] * 2 - 1], dim=1))
            else:
                mu, logvar = self.lmae.encode(dyn)
                means.append(mu)
                logvars.append(logvar)
        mean = rearrange(torch.cat(means), "(b n) c h w -> b c n h w", b=b)
        logvar = rearrange(torch.cat(logvars), "(b n) c h w -> b c n h w", b=b) if logvars else None
        return mean, logvar

    def latent_from_stats(self, mean: Tensor, logvar: Tensor | None) -> Tensor:
        """The unscaled latent: the mean, or a sample of eq. 4 when `latent_source` is "sample"."""
        if self.latent_source == "sample" and logvar is not None:
            return LMAE.sample(mean, logvar)
        return mean

    @torch.no_grad()
    def encode_raw(self, reference: Tensor, frames: Tensor, chunk: int = 32) -> Tensor:
        """Unscaled latents: reference `b 3 H W`, frames `b n 3 H W` -> `b c n h w`."""
        return self.latent_from_stats(*self.encode_stats(reference, frames, chunk))

    def encode(self, reference: Tensor, frames: Tensor, chunk: int = 32) -> Tensor:
        """Normalised latents `b c n h w` for the diffusion model."""
        return self.encode_raw(reference, frames, chunk) * self.scale

    @torch.no_grad()
    def calibrate(self, raw: Tensor) -> float:
        """Set `scale` so the latents have unit standard deviation (LDM practice)."""
        self.scale.fill_(1.0 / raw.float().std().clamp_min(1e-6).item())
        return float(self.scale)

    # ---------------------------------------------------------------- decode
    def latent_to_dynamics(self, z: Tensor) -> Tensor:
        """`k c h w` normalised latents -> `k 3 H/4 W/4` dynamics."""
        z = z / self.scale
        if self.lmae is None:
            grid = identity_grid(z.shape[-2], z.shape[-1], z.device, z.dtype)
            return torch.cat([(z[:, :2] + grid).clamp(-1, 1), ((z[:, 2:] + 1) / 2).clamp(0, 1)], dim=1)
        return self.lmae.decode(z)

    def decoder_copy(self, dtype: torch.dtype) -> DynamicsCodec:
        """This codec cast to `dtype` for decoding, without the FDE's motion network
        (decoding does not use it); `scale` stays float32. A clip decoded by the copy
        skips the cast of every layer's input and output that autocast makes."""
        fde = self.fde
        motion = {id(m): None for m in (fde.region_predictor, fde.bg_predictor, fde.flow_predictor)
                  if m is not None}  # deepcopy's memo maps them to None: not copied
        codec = copy.deepcopy(self, memo=motion).to(dtype)
        codec.scale = self.scale.clone()
        return codec

    @torch.no_grad()
    def decode_chunks(self, features: list[Tensor], z: Tensor, chunk: int = 16,
                      dtype: torch.dtype | None = None) -> Iterator[Tensor]:
        """Yield frames `k 3 H W` in [0, 1] (float32) for latents `1 c n h w`, `chunk` at a time.

        `features` are `fde.encode(reference)` with batch 1; memory outside
        the latents does not grow with n. `dtype` (e.g. bfloat16) decodes with
        `decoder_copy(dtype)`; the features stay as they are (the FDE only warps
        them, and warps sample in float32).
        """
        if z.shape[0] != 1:
            raise ValueError(f"decode_chunks takes one clip (batch 1), got batch {z.shape[0]}")
        codec = self if dtype is None else self.decoder_copy(dtype)
        pixels = features[-1].shape[-2] * features[-1].shape[-1] * self.fde.downsample ** 2
        step = max(2, CPU_DECODE_PIXELS // pixels) if z.device.type == "cpu" else chunk
        for start in range(0, z.shape[2], chunk):
            part = rearrange(z[0, :, start:start + chunk], "c k h w -> k c h w")
            frames = [codec.fde.decode(features, codec.latent_to_dynamics(part[i:i + step]))
                      for i in range(0, part.shape[0], step)]
            yield frames[0] if len(frames) == 1 else torch.cat(frames)

    def decode(self, features: list[Tensor], z: Tensor, chunk: int = 16,
               dtype: torch.dtype | None = None) -> Tensor:
        """All frames at once: `1 c n h w` -> `n 3 H W` (tests and short clips)."""
        return torch.cat(list(self.decode_chunks(features, z, chunk, dtype)))


class ImageCondition(nn.Module):
    """E(x_src) brought to the latent resolution: FDE's bottleneck features
    `b C H/d W/d` -> `b out H/(d*2^k) W/(d*2^k)` with k stride-2 convs."""

    def __init__(self, in_channels: int, out_channels: int, num_down: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 3, padding=1)]
        for _ in range(num_down):
            layers += [nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)
