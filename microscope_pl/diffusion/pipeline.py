"""The generation pipeline: codec + image condition + denoiser + noise schedule.

One plain `nn.Module` (no Lightning) that the diffusion LightningModule
trains, and that `microscope generate`, the benchmark and the ablations
sample from:

```
reference ─FDE encoder─► E(x_src) ─ImageCondition─► image_cond (latent size)
(image_cond, audio_1:N, pose_1:N, blink_1:N) ─3D U-Net, all N frames at once─► z_1:N   (eq. 10)
z_1:N ─(chunks of k frames) LMAE decode ─► [f; m] ─FDE decode(E(x_src))─► frames
```
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from microscope_pl.diffusion.samplers import ddim_sample, dpm_solver_pp_2m_sample, guided_model_fn
from microscope_pl.diffusion.schedule import DiffusionSchedule
from microscope_pl.models.config import DenoiserConfig, SamplingConfig, ScheduleConfig
from microscope_pl.models.mdcf import DynamicsCodec, ImageCondition

SAMPLERS = {"ddim": ddim_sample, "dpm": dpm_solver_pp_2m_sample}
Batch = dict[str, Tensor]


class TalkingHeadPipeline(nn.Module):
    """Denoises z_1:N given E(x_src), audio, pose and blink, and decodes frames.

    Args:
        codec: the frozen MDCF (or the H/4 baseline) with its latent `scale`.
        image_cond: E(x_src) at FDE's bottleneck -> the latent resolution.
        denoiser: the 3D U-Net.
        schedule: the noise schedule.
        sampling: sampler, steps, guidance scales and decode chunk (defaults of `sample_latents`).
        image_size: frame size H = W.
    """

    def __init__(self, codec: DynamicsCodec, image_cond: nn.Module, denoiser: nn.Module,
                 schedule: DiffusionSchedule, sampling: SamplingConfig, image_size: int) -> None:
        super().__init__()
        if sampling.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampling.sampler!r}")
        if image_size % codec.latent_down:
            raise ValueError(f"image_size {image_size} is not divisible by the latent factor {codec.latent_down}")
        self.codec = codec
        self.image_cond = image_cond
        self.denoiser = denoiser
        self.schedule = schedule
        self.sampling = sampling
        self.image_size = image_size

    @classmethod
    def build(cls, codec: DynamicsCodec, denoiser: DenoiserConfig, schedule: ScheduleConfig,
              sampling: SamplingConfig, image_size: int) -> "TalkingHeadPipeline":
        """Untrained image condition and denoiser around `codec`."""
        fde = codec.fde
        extra_down = int(math.log2(codec.latent_down // fde.downsample))  # H/d features -> latent size
        image_cond = ImageCondition(fde.feature_channels[-1], denoiser.image_cond_channels, extra_down)
        return cls(codec, image_cond, denoiser.build(codec.latent_channels), schedule.build(), sampling, image_size)

    def latent_shape(self, batch: int, frames: int) -> tuple[int, int, int, int, int]:
        side = self.image_size // self.codec.latent_down
        return batch, self.codec.latent_channels, frames, side, side

    # ------------------------------------------------------------ conditions
    def conditions(self, batch: Batch) -> dict[str, Tensor]:
        """E(x_src) at the latent resolution plus per-frame audio `b n d`, pose `b n 6`, blink `b n 2`."""
        with torch.no_grad():
            features = self.codec.fde.encode(batch["reference"])
        return {"image_cond": self.image_cond(features[-1]), "audio": batch["audio"], "pose": batch["pose"],
                "blink": batch["blink"]}

    # ------------------------------------------------------ DDPM loss (eq. 10)
    def denoising_error(self, z0: Tensor, batch: Batch, drop_prob: float) -> Tensor:
        """Squared error `b c n h w` of the denoiser's target at random timesteps, with audio
        and (separately) pose/blink dropped with probability `drop_prob` for guidance."""
        b = z0.shape[0]
        t = self.schedule.sample_timesteps(b, device=z0.device)
        noise = torch.randn_like(z0)
        drop_audio = torch.rand(b, device=z0.device) < drop_prob
        drop_motion = torch.rand(b, device=z0.device) < drop_prob
        out = self.denoiser(self.schedule.q_sample(z0, t, noise), t, **self.conditions(batch),
                            drop_audio=drop_audio, drop_motion=drop_motion)
        return (out.float() - self.schedule.target(z0, noise, t).float()).pow(2)

    # ------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(
        self, batch: Batch, generator: torch.Generator | None = None, steps: int | None = None,
        audio_scale: float | None = None, motion_scale: float | None = None, drop_audio: bool = False,
        progress: Callable[[int, int], None] | None = None, sampler: str | None = None,
        guidance_every: int | None = None,
    ) -> Tensor:
        """Denoise all N frames together (non-autoregressive); normalised latents `b c n h w`.

        `batch` holds reference `b 3 H W`, audio `b n d`, pose `b n 6`, blink `b n 2`.
        `drop_audio` samples with the learned null audio token (motion kept): the
        "no audio" control of the test. Unset scales, steps, sampler ("ddim", "dpm") and
        guidance_every take `self.sampling`.
        """
        cfg = self.sampling
        cond = self.conditions(batch)
        b, n = batch["audio"].shape[:2]
        device = batch["audio"].device
        if drop_audio:
            drops = {"drop_audio": torch.ones(b, dtype=torch.bool, device=device),
                     "drop_motion": torch.zeros(b, dtype=torch.bool, device=device)}
            model_fn = lambda x, t: self.denoiser(x, t, **cond, **drops)  # noqa: E731
        else:
            model_fn = guided_model_fn(
                self.denoiser, cond["image_cond"], cond["audio"], cond["pose"], cond["blink"],
                audio_scale=cfg.audio_scale if audio_scale is None else audio_scale,
                motion_scale=cfg.motion_scale if motion_scale is None else motion_scale, batch_branches=n <= 64,
                guidance_every=cfg.guidance_every if guidance_every is None else guidance_every)
        name = sampler or cfg.sampler
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
        return SAMPLERS[name](model_fn, self.latent_shape(b, n), self.schedule, steps=steps or cfg.steps,
                                     generator=generator, progress=progress, device=device)

    # ------------------------------------------------------------- decoding
    @torch.no_grad()
    def decode_chunks(self, reference: Tensor, z: Tensor, chunk: int | None = None,
                      dtype: torch.dtype | None = None) -> Iterator[Tensor]:
        """Frames `k 3 H W` in [0, 1] of one clip, `chunk` at a time: reference `1 3 H W`,
        latents `1 c n h w`. E(x_src) is computed once; memory outside the latents
        does not grow with n. `dtype`: see `DynamicsCodec.decode_chunks`."""
        features = self.codec.fde.encode(reference)
        yield from self.codec.decode_chunks(features, z, chunk or self.sampling.decode_chunk, dtype)

    @torch.no_grad()
    def decode_clips(self, reference: Tensor, z: Tensor) -> Tensor:
        """Latents `b c n h w` -> frames `b n 3 H W`, each clip against its reference `b 3 H W`."""
        return torch.stack([torch.cat(list(self.decode_chunks(reference[i:i + 1], z[i:i + 1])))
                            for i in range(z.shape[0])])

    @torch.no_grad()
    def generate_clip(self, batch: Batch, generator: torch.Generator | None = None, **kwargs) -> Tensor:
        """Frames `b n 3 H W` for a batch of conditions (`sample_latents` options in kwargs)."""
        return self.decode_clips(batch["reference"], self.sample_latents(batch, generator=generator, **kwargs))

    @torch.no_grad()
    def codec_round_trip(self, reference: Tensor, frames: Tensor) -> Tensor:
        """Ground-truth clips `b n 3 H W` encoded to latents and decoded again: what a
        perfect denoiser over this latent could show."""
        return self.decode_clips(reference, self.codec.encode(reference, frames))
