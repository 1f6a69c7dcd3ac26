"""Phase 3: latent video diffusion over the MDCF latent (paper eq. 10)."""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
from einops import rearrange

from microscope_pl.diffusion.samplers import ddim_sample, dpm_solver_pp_2m_sample, guided_model_fn
from microscope_pl.diffusion.schedule import DiffusionSchedule
from microscope_pl.models.fde import FDE
from microscope_pl.models.lmae import LMAE
from microscope_pl.models.mdcf import DynamicsCodec, ImageCondition
from microscope_pl.models.unet3d import UNet3D
from microscope_pl.modules.base import PhaseModule
from microscope_pl.modules.media import log_images, log_video
from microscope_pl.modules.lmae_module import fde_from_upstream
from microscope_pl.phases import load_frozen, sub_state_dict

NUM_LOSS_BUCKETS = 10
SAMPLERS = {"ddim": ddim_sample, "dpm": dpm_solver_pp_2m_sample}


def mouth_loss_weights(boxes: torch.Tensor, image_size: int, latent_hw: tuple[int, int],
                       weight: float) -> torch.Tensor:
    """``b 1 1 h w`` loss weights: 1 + weight on the latent cells that the mouth box touches.

    Not in the paper: an option for data where the lips are a sliver of the
    motion, so that a plain loss gains little from the audio (it did not help
    on the earlier synthetic set, README "Measured here"). ``boxes``: ``b 4``
    (x0, y0, x1, y1) in pixels; samples without one (-1s) weigh uniformly.
    """
    h, w = latent_hw
    cell = image_size / w
    tops = torch.arange(h, device=boxes.device) * cell  # cell i spans [i cell, (i + 1) cell)
    lefts = torch.arange(w, device=boxes.device) * cell
    x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
    rows = (tops + cell > y0) & (tops < y1)  # b h: the cell overlaps the box
    cols = (lefts + cell > x0) & (lefts < x1)  # b w
    inside = rows[:, :, None] & cols[:, None, :] & (boxes >= 0).all(dim=1)[:, None, None]
    return (1.0 + weight * inside.float())[:, None, None]


class LatentDiffusionModule(PhaseModule):
    """Denoises z_1:N given E(x_src), audio y_1:N, pose and blink rho_1:N.

    The frozen MDCF (FDE + LMAE from phase 2) turns each training clip into
    latents online; `latent="fde"` is the DAWN-style baseline diffusing the
    H/4 dynamics of FDE (phase 1) with the same denoiser.
    """

    phase = "diffusion"

    def __init__(
        self,
        image_size: int = 128,
        latent: str = "mdcf",
        audio_dim: int = 80,
        audio_features: str = "logmel",
        audio_context: int = 0,
        base_channels: int = 64,
        channel_mult: list[int] = [1, 2],  # noqa: B006 (jsonargparse needs a literal default)
        num_res_blocks: int = 1,
        attn_levels: list[int] = [1],  # noqa: B006
        num_heads: int = 4,
        temporal_window: int | None = None,
        cond_mode: str = "cross_attn",
        cond_dim: int = 128,
        image_cond_channels: int = 64,
        dropout: float = 0.0,
        num_train_steps: int = 1000,
        schedule: str = "cosine",
        prediction: str = "eps",
        latent_source: str = "mean",
        latent_scale: float | None = None,
        cond_drop_prob: float = 0.1,
        mouth_weight: float = 0.0,
        ema_decay: float = 0.999,
        sampler: str = "ddim",
        sample_steps: int = 20,
        audio_scale: float = 1.0,
        motion_scale: float = 1.0,
        decode_chunk: int = 16,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        scheduler: str = "constant",
        warmup_steps: int = 100,
        lpips: str = "auto",
        mdcf_ckpt_path: str | None = None,
        fde_config: dict[str, Any] | None = None,
        lmae_config: dict[str, Any] | None = None,
        upstream: dict[str, Any] | None = None,
    ) -> None:
        """
        Args:
            image_size: frame size (square); must equal the upstream phases'.
            latent: "mdcf" (4 x H/32, paper) or "fde" (3 x H/4, DAWN-style baseline).
            audio_dim: per-frame audio feature width (80 log-mel, 1024 HuBERT).
            audio_features: the data set's audio features ("logmel" or "hubert:<id or dir>"),
                checked at fit start and used by `microscope generate`.
            audio_context: audio frames on each side that a frame's audio token sees.
            base_channels: denoiser width of the first level.
            channel_mult: denoiser width multipliers per level.
            num_res_blocks: residual blocks per level.
            attn_levels: levels with spatial self-attention.
            num_heads: attention heads.
            temporal_window: local temporal attention window (frames), None = global.
            cond_mode: "cross_attn" (per-frame tokens) or "film".
            cond_dim: width of the condition tokens.
            image_cond_channels: channels of E(x_src) at the latent resolution.
            dropout: dropout in residual blocks.
            num_train_steps: diffusion steps T (1000).
            schedule: "cosine" or "linear" betas.
            prediction: "eps" or "v".
            latent_source: encode clips with the LMAE "mean" or a "sample" (eq. 4).
            latent_scale: latent normalisation; null = calibrated on the first batch.
            cond_drop_prob: probability of dropping audio, and separately pose/blink,
                for classifier-free guidance.
            mouth_weight: extra loss weight of the latent cells under the data set's
                mouth box (0 = the paper's plain loss; see `mouth_loss_weights`).
            ema_decay: EMA decay of the denoiser weights used for sampling.
            sampler: "ddim" or "dpm" (DPM-Solver++ 2M).
            sample_steps: sampling steps (DDIM: 20).
            audio_scale: guidance scale of the audio condition.
            motion_scale: guidance scale of the pose/blink condition.
            decode_chunk: frames decoded at once by LMAE + FDE.
            lr: AdamW learning rate.
            betas: AdamW betas.
            weight_decay: AdamW weight decay.
            scheduler: "cosine" or "constant".
            warmup_steps: linear warm-up steps.
            lpips: "auto", "random" or "off".
            mdcf_ckpt_path: upstream checkpoint (phase 2, or phase 1 for latent="fde");
                default checkpoints/<phase>/{best,last}.ckpt.
            fde_config: filled in from the upstream checkpoint (leave empty).
            lmae_config: filled in from the upstream checkpoint (leave empty).
            upstream: filled in automatically: the upstream checkpoint's path and sha256.
        """
        super().__init__()
        self.save_hyperparameters()
        if latent not in ("mdcf", "fde"):
            raise ValueError(f"latent must be 'mdcf' or 'fde', got {latent!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        self.codec = self._build_codec()
        fde = self.codec.fde
        extra_down = int(math.log2(self.codec.latent_down // fde.downsample))  # H/4 features -> latent size
        self.image_cond = ImageCondition(fde.feature_channels[-1], image_cond_channels, extra_down)
        self.unet = UNet3D(
            in_channels=self.codec.latent_channels, image_cond_channels=image_cond_channels, audio_dim=audio_dim,
            base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
            attn_levels=attn_levels, num_heads=num_heads, temporal_window=temporal_window, cond_mode=cond_mode,
            cond_dim=cond_dim, dropout=dropout, audio_context=audio_context)
        self.ema = load_frozen(copy.deepcopy(self.unet))
        self.ema_image_cond = load_frozen(copy.deepcopy(self.image_cond))
        self.schedule = DiffusionSchedule(num_train_steps, schedule, prediction)
        if latent_scale is not None:
            self.codec.scale.fill_(latent_scale)
        self.register_buffer("calibrated", torch.tensor(latent_scale is not None))

    def _build_codec(self) -> DynamicsCodec:
        hp = self.hparams
        if hp.fde_config:  # restoring this phase's own checkpoint
            fde = load_frozen(FDE(**hp.fde_config))
            lmae = load_frozen(LMAE(**hp.lmae_config)) if hp.lmae_config else None
        elif hp.latent == "fde":
            fde, _ = fde_from_upstream(self, "phase1", hp.mdcf_ckpt_path)
            lmae = None
        else:
            fde, ckpt = fde_from_upstream(self, "phase2", hp.mdcf_ckpt_path)
            hp.lmae_config = dict(ckpt["lmae_config"])
            lmae = load_frozen(LMAE(**hp.lmae_config), sub_state_dict(ckpt, "lmae"))
        if hp.image_size % (fde.downsample * (lmae.downsample_factor if lmae else 1)):
            raise ValueError(f"image_size {hp.image_size} is not divisible by the latent factor")
        return DynamicsCodec(fde, lmae, hp.latent_source)

    # ------------------------------------------------------------ conditions
    def conditions(self, batch: dict[str, torch.Tensor], ema: bool = False) -> dict[str, torch.Tensor]:
        """E(x_src) at the latent resolution plus per-frame audio, pose, blink."""
        with torch.no_grad():
            features = self.codec.fde.encode(batch["reference"])
        image_cond = (self.ema_image_cond if ema else self.image_cond)(features[-1])
        return {"image_cond": image_cond, "audio": batch["audio"], "pose": batch["pose"], "blink": batch["blink"]}

    # ------------------------------------------------------ training (DDPM loss)
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z0 = self._latents(batch)
        b = z0.shape[0]
        t = self.schedule.sample_timesteps(b, device=z0.device)
        noise = torch.randn_like(z0)
        p = self.hparams.cond_drop_prob
        drop_audio = torch.rand(b, device=z0.device) < p
        drop_motion = torch.rand(b, device=z0.device) < p
        out = self.unet(self.schedule.q_sample(z0, t, noise), t, **self.conditions(batch),
                        drop_audio=drop_audio, drop_motion=drop_motion)
        err = (out.float() - self.schedule.target(z0, noise, t).float()).pow(2)
        boxes = batch.get("mouth_box")
        if self.hparams.mouth_weight and boxes is not None:
            weights = mouth_loss_weights(boxes, self.hparams.image_size, z0.shape[-2:], self.hparams.mouth_weight)
            loss = (err * weights).mean() / weights.mean()
        else:
            loss = err.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def _latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised latents `b c n h w`: from `latents cache` statistics when the
        batch carries them, else encoded online by the frozen MDCF."""
        if "latent_mean" in batch:
            raw = self.codec.latent_from_stats(batch["latent_mean"], batch.get("latent_logvar"))
            raw = rearrange(raw, "b n c h w -> b c n h w")
        else:
            raw = self.codec.encode_raw(batch["reference"], batch["frames"])
        if not bool(self.calibrated):
            std = self.trainer.strategy.reduce(raw.float().std(), reduce_op="mean") if self._trainer else raw.std()
            self.codec.scale.fill_(1.0 / float(std.clamp_min(1e-6)))
            self.calibrated.fill_(True)
            self.print(f"[diffusion] latent scale calibrated: {float(self.codec.scale):.4f}")
        return raw * self.codec.scale

    def _check_data(self) -> None:
        super()._check_data()
        data = getattr(self.trainer, "datamodule", None)
        path = getattr(data, "latent_cache", None)
        if path:
            from microscope_pl.data.latent_cache import check_cache, load_cache

            cache = data.cache if data.cache is not None else load_cache(path)
            upstream = (self.hparams.upstream or {}).get(cache["upstream"]["phase"], {})
            check_cache(cache, self.hparams.latent, self.hparams.image_size, upstream.get("sha256"), path)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        decay = self.hparams.ema_decay if self.global_step > self.hparams.warmup_steps else 0.0
        with torch.no_grad():
            for ema, live in ((self.ema, self.unet), (self.ema_image_cond, self.image_cond)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p.detach(), 1.0 - decay)

    # ------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
        steps: int | None = None, audio_scale: float | None = None, motion_scale: float | None = None,
        drop_audio: bool = False, progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Denoise all N frames together (non-autoregressive) with the EMA weights.

        `batch` holds reference `b 3 H W`, audio `b n d`, pose `b n 6`, blink `b n 2`.
        Returns normalised latents `b c n h w`.
        """
        hp = self.hparams
        cond = self.conditions(batch, ema=True)
        b, n = batch["audio"].shape[:2]
        side = hp.image_size // self.codec.latent_down
        if drop_audio:  # the learned null audio token, motion kept: the "no audio" control
            drops = {"drop_audio": torch.ones(b, dtype=torch.bool, device=self.device),
                     "drop_motion": torch.zeros(b, dtype=torch.bool, device=self.device)}
            model_fn = lambda x, t: self.ema(x, t, **cond, **drops)  # noqa: E731
        else:
            model_fn = guided_model_fn(
                self.ema, cond["image_cond"], cond["audio"], cond["pose"], cond["blink"],
                audio_scale=hp.audio_scale if audio_scale is None else audio_scale,
                motion_scale=hp.motion_scale if motion_scale is None else motion_scale, batch_branches=n <= 64)
        sampler = SAMPLERS[hp.sampler]
        return sampler(model_fn, (b, self.codec.latent_channels, n, side, side), self.schedule,
                       steps=steps or hp.sample_steps, generator=generator, progress=progress,
                       device=self.device)

    @torch.no_grad()
    def generate_clip(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                      **kwargs: Any) -> torch.Tensor:
        """Frames `b n 3 H W` for a batch of conditions (validation/test)."""
        return self.decode_clips(batch["reference"], self.sample_latents(batch, generator=generator, **kwargs))

    @torch.no_grad()
    def decode_clips(self, reference: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents `b c n h w` -> frames `b n 3 H W`, each clip against its reference `b 3 H W`."""
        return torch.stack([self.codec.decode(self.codec.fde.encode(reference[i:i + 1]), z[i:i + 1],
                                              self.hparams.decode_chunk) for i in range(z.shape[0])])

    # ---------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        z0 = self._latents(batch)
        b = z0.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(batch_idx)
        t = torch.randint(0, self.schedule.num_steps, (b,), generator=gen).to(z0.device)
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        cond = self.conditions(batch, ema=True)
        xt, target = self.schedule.q_sample(z0, t, noise), self.schedule.target(z0, noise, t).float()
        with torch.no_grad():
            out = self.ema(xt, t, **cond)
        per_sample = (out.float() - target).pow(2).mean(dim=(1, 2, 3, 4))
        self.log("val/loss", per_sample.mean(), prog_bar=True, sync_dist=True, batch_size=b)
        if b > 1:  # what the audio is worth: the same noisy clips denoised with another clip's audio
            with torch.no_grad():
                other = self.ema(xt, t, **{**cond, "audio": cond["audio"].roll(1, dims=0)})
            shuffled = (other.float() - target).pow(2).mean()
            self.log("val/audio_gain", (shuffled - per_sample.mean()) / shuffled, sync_dist=True, batch_size=b)
        buckets = (t * NUM_LOSS_BUCKETS // self.schedule.num_steps).tolist()
        for k in range(NUM_LOSS_BUCKETS):
            chosen = [i for i, bk in enumerate(buckets) if bk == k]
            if chosen:
                self.log(f"val/loss_t{k}", per_sample[chosen].mean(), batch_size=len(chosen))
        if batch_idx == 0 and self.global_rank == 0:
            clip = self.generate_clip({k: v[:1] for k, v in batch.items() if torch.is_tensor(v)}, generator=gen)
            stride = max(1, clip.shape[1] // 8)
            gen_row = rearrange(clip[0, ::stride], "n c h w -> c h (n w)")
            gt_row = rearrange(batch["frames"][0, ::stride], "n c h w -> c h (n w)")
            log_images(self, "val/generated_over_ground_truth", torch.cat([gen_row, gt_row], dim=1))
            side_by_side = torch.cat([clip[0], batch["frames"][0].to(clip)], dim=-1)  # n 3 H 2W
            log_video(self, "val/video_generated|ground_truth", side_by_side)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        from microscope_pl.modules.diffusion_eval import clip_metrics

        gen = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)
        metrics = clip_metrics(self, batch, gen)
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, batch_size=batch["frames"].shape[0])
