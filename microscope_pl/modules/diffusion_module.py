"""Phase 3: latent video diffusion over the MDCF latent (paper eq. 10)."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from einops import rearrange

from microscope_pl.diffusion.pipeline import TalkingHeadPipeline
from microscope_pl.metrics.clips import clip_metrics
from microscope_pl.models.config import DenoiserConfig, SamplingConfig, ScheduleConfig, from_dict
from microscope_pl.models.losses import mouth_loss_weights
from microscope_pl.models.mdcf import DynamicsCodec
from microscope_pl.modules.base import PhaseModule
from microscope_pl.modules.media import log_images, log_video
from microscope_pl.modules.settings import OptimizerConfig
from microscope_pl.phases import freeze_upstream, load_frozen

NUM_LOSS_BUCKETS = 10


class LatentDiffusionModule(PhaseModule):
    """Trains the denoiser of `TalkingHeadPipeline` (the frozen MDCF turns each
    clip into latents) and keeps an EMA copy of it for sampling. `latent="fde"`
    is the DAWN-style baseline diffusing FDE's H/4 dynamics with the same denoiser."""

    phase = "diffusion"

    def __init__(
        self,
        image_size: int = 128,
        latent: str = "mdcf",
        audio_features: str = "logmel",
        denoiser: Optional[DenoiserConfig] = None,
        schedule: Optional[ScheduleConfig] = None,
        sampling: Optional[SamplingConfig] = None,
        latent_source: str = "mean",
        latent_scale: Optional[float] = None,
        cond_drop_prob: float = 0.1,
        mouth_weight: float = 0.0,
        ema_decay: float = 0.999,
        optimizer: Optional[OptimizerConfig] = None,
        lpips: str = "auto",
        mdcf_ckpt_path: Optional[str] = None,
        upstream: Optional[dict[str, Any]] = None,
    ) -> None:
        """
        Args:
            image_size: frame size (square); must equal the upstream phases'.
            latent: "mdcf" (4 x H/32, paper) or "fde" (3 x H/4, DAWN-style baseline).
            audio_features: the data set's audio features ("logmel" or "hubert:<id or dir>"),
                checked at fit start and used by `microscope generate`.
            denoiser: 3D U-Net settings (its audio_dim must match the features).
            schedule: the noise schedule (null: 1000 cosine steps, eps prediction).
            sampling: sampler, steps, guidance scales and decode chunk for validation,
                test and generation (null: DDIM, 20 steps, scales 1).
            latent_source: encode clips with the LMAE "mean" or a "sample" (eq. 4).
            latent_scale: latent normalisation; null = calibrated on the first batch.
            cond_drop_prob: probability of dropping audio, and separately pose/blink,
                for classifier-free guidance.
            mouth_weight: extra loss weight of the latent cells under the data set's
                mouth box (0 = the paper's plain loss; see `mouth_loss_weights`).
            ema_decay: EMA decay of the denoiser weights used for sampling.
            optimizer: Adam settings (null: lr 1e-4, constant; warmup_steps also delays the EMA).
            lpips: "auto", "random" or "off".
            mdcf_ckpt_path: upstream checkpoint (phase 2, or phase 1 for latent="fde");
                default checkpoints/<run>/<phase>/{best,last}.ckpt.
            upstream: written into every checkpoint of this phase (leave it empty): the
                upstream record (path, sha256, network settings). Given, the frozen codec
                is built from it and its weights come from this module's checkpoint.
        """
        super().__init__()
        if latent not in ("mdcf", "fde"):
            raise ValueError(f"latent must be 'mdcf' or 'fde', got {latent!r}")
        denoiser = from_dict(DenoiserConfig, denoiser)
        schedule = from_dict(ScheduleConfig, schedule)
        sampling = from_dict(SamplingConfig, sampling)
        optimizer = from_dict(OptimizerConfig, optimizer or {"lr": 1e-4})
        frozen = freeze_upstream("phase2" if latent == "mdcf" else "phase1", mdcf_ckpt_path,
                                 image_size=image_size, record=upstream)
        self.upstream_record = frozen.record
        self.save_hyperparameters()
        self.optim, self.settings = optimizer, {"denoiser": denoiser, "schedule": schedule, "sampling": sampling}
        codec = DynamicsCodec(frozen.networks["fde"], frozen.networks.get("lmae"), latent_source)
        self.pipeline = TalkingHeadPipeline.build(codec, denoiser, schedule, sampling, image_size)
        self.ema = load_frozen(TalkingHeadPipeline(  # sampled from; shares the frozen codec
            codec, copy.deepcopy(self.pipeline.image_cond), copy.deepcopy(self.pipeline.denoiser),
            self.pipeline.schedule, sampling, image_size))
        if latent_scale is not None:
            codec.scale.fill_(latent_scale)
        self.register_buffer("calibrated", torch.tensor(latent_scale is not None))

    def network_configs(self) -> dict[str, Any]:
        return {**self.upstream_record["networks"], "denoiser": self.settings["denoiser"]}

    def checkpoint_record(self) -> dict[str, Any]:
        hp = self.hparams
        return {**super().checkpoint_record(), "schedule": self.settings["schedule"],
                "sampling": self.settings["sampling"], "latent": hp.latent, "latent_source": hp.latent_source}

    # ------------------------------------------------------ training (DDPM loss)
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        z0 = self._latents(batch)
        err = self.pipeline.denoising_error(z0, batch, self.hparams.cond_drop_prob)
        boxes = batch.get("mouth_box")
        if self.hparams.mouth_weight and boxes is not None:
            weights = mouth_loss_weights(boxes, self.hparams.image_size, z0.shape[-2:], self.hparams.mouth_weight)
            loss = (err * weights).mean() / weights.mean()
        else:
            loss = err.mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=z0.shape[0])
        return loss

    def _latents(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Normalised latents `b c n h w`: from `latents cache` statistics when the
        batch carries them, else encoded online by the frozen MDCF."""
        codec = self.pipeline.codec
        if "latent_mean" in batch:
            raw = codec.latent_from_stats(batch["latent_mean"], batch.get("latent_logvar"))
            raw = rearrange(raw, "b n c h w -> b c n h w")
        else:
            raw = codec.encode_raw(batch["reference"], batch["frames"])
        if not bool(self.calibrated):
            std = self.trainer.strategy.reduce(raw.float().std(), reduce_op="mean") if self._trainer else raw.std()
            codec.scale.fill_(1.0 / float(std.clamp_min(1e-6)))
            self.calibrated.fill_(True)
            self.print(f"[diffusion] latent scale calibrated: {float(codec.scale):.4f}")
        return raw * codec.scale

    def _check_data(self) -> None:
        super()._check_data()
        data = getattr(self.trainer, "datamodule", None)
        path = getattr(data, "latent_cache", None)
        if path:
            from microscope_pl.data.latent_cache import check_cache, load_cache

            cache = data.cache if data.cache is not None else load_cache(path)
            check_cache(cache, self.hparams.latent, self.hparams.image_size, self.upstream_record.get("sha256"), path)

    def ema_decay_now(self) -> float:
        """The EMA decay at this step: 0 (a copy) during the lr warmup, then
        min(ema_decay, (1 + s) / (10 + s)) s steps after it, so the average spans
        about the last s / 10 steps early on instead of lagging by 1 / (1 - ema_decay):
        a short run samples from weights that have learned what the live ones have."""
        s = self.global_step - self.optim.warmup_steps
        return 0.0 if s <= 0 else min(self.hparams.ema_decay, (1.0 + s) / (10.0 + s))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        decay = self.ema_decay_now()
        with torch.no_grad():
            for ema, live in ((self.ema.denoiser, self.pipeline.denoiser), (self.ema.image_cond, self.pipeline.image_cond)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p.detach(), 1.0 - decay)

    # ------------------------------------------------------------- sampling
    def generate_clip(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None,
                      **kwargs: Any) -> torch.Tensor:
        """Frames `b n 3 H W` sampled with the EMA weights (see TalkingHeadPipeline.sample_latents)."""
        return self.ema.generate_clip(batch, generator=generator, **kwargs)

    # ---------------------------------------------------------- evaluation
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        z0 = self._latents(batch)
        b = z0.shape[0]
        gen = torch.Generator(device="cpu").manual_seed(batch_idx)
        sched = self.ema.schedule
        t = torch.randint(0, sched.num_steps, (b,), generator=gen).to(z0.device)
        noise = torch.randn(z0.shape, generator=gen).to(z0)
        cond = self.ema.conditions(batch)
        xt, target = sched.q_sample(z0, t, noise), sched.target(z0, noise, t).float()
        with torch.no_grad():
            out = self.ema.denoiser(xt, t, **cond)
        per_sample = (out.float() - target).pow(2).mean(dim=(1, 2, 3, 4))
        self.log("val/loss", per_sample.mean(), prog_bar=True, sync_dist=True, batch_size=b)
        if b > 1:  # what the audio is worth: the same noisy clips denoised with another clip's audio
            with torch.no_grad():
                other = self.ema.denoiser(xt, t, **{**cond, "audio": cond["audio"].roll(1, dims=0)})
            shuffled = (other.float() - target).pow(2).mean()
            self.log("val/audio_gain", (shuffled - per_sample.mean()) / shuffled, sync_dist=True, batch_size=b)
        buckets = (t * NUM_LOSS_BUCKETS // sched.num_steps).tolist()
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
        """Each clip generated with its audio and with the audio dropped (same seed), the codec's
        round trip of the ground truth, and the clip metrics of metrics.clips over them."""
        gen = torch.Generator(device="cpu").manual_seed(1000 + batch_idx)
        state = gen.get_state()
        generated = self.generate_clip(batch, generator=gen)
        gen.set_state(state)
        silent = self.generate_clip(batch, generator=gen, drop_audio=True)
        round_trip = self.ema.codec_round_trip(batch["reference"], batch["frames"])
        metrics = clip_metrics(generated, batch["frames"], silent=silent, round_trip=round_trip,
                               loudness=batch.get("loudness"), mouth_boxes=batch.get("mouth_box"),
                               lpips=self._lpips_net())
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, batch_size=batch["frames"].shape[0])
