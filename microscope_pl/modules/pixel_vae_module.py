"""Ablation "VAE d/32" (paper Table 5): a single-stage KL auto-encoder on
pixels, 4 latent channels at H/32, the compressor MDCF is compared against."""
from __future__ import annotations

import torch

from microscope_pl.models.lmae import LMAE
from microscope_pl.models.losses import kl_divergence
from microscope_pl.models.perceptual import PerceptualLoss
from microscope_pl.modules.base import PhaseModule


class PixelVAEModule(PhaseModule):
    """Reconstructs the driving frame from its own latent (no source image)."""

    phase = "vae"

    def __init__(
        self,
        image_size: int = 128,
        latent_channels: int = 4,
        num_down: int = 5,
        base_channels: int = 32,
        channel_mult: list[int] | None = None,
        num_res_blocks: int = 1,
        norm_groups: int = 8,
        kl_weight: float = 1e-4,
        perceptual_weights: str = "imagenet",
        perceptual_scales: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125),
        perceptual_layer_weights: tuple[float, ...] = (10.0, 10.0, 10.0, 10.0, 10.0),
        l1_weight: float = 0.0,
        l1_scales: tuple[float, ...] = (1.0,),
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        scheduler: str = "constant",
        warmup_steps: int = 50,
        lpips: str = "auto",
    ) -> None:
        """
        Args:
            image_size: frame size (square).
            latent_channels: channels of z (4, as MDCF).
            num_down: 2x downsamplings on pixels (5: H/32, as MDCF's latent).
            base_channels: width of the first level.
            channel_mult: width multipliers per level (num_down + 1 entries; null: 1, 2, 4, 4, ...).
            num_res_blocks: residual blocks per level.
            norm_groups: GroupNorm groups.
            kl_weight: weight of the KL term (same convention as LMAE).
            perceptual_weights: VGG19 weights ("imagenet", a path, or "random").
            perceptual_scales: image-pyramid scales of the VGG loss.
            perceptual_layer_weights: L1 weights of relu1_1..relu5_1 (trailing zeros skip layers).
            l1_weight: extra pixel L1 weight.
            l1_scales: pyramid scales of the pixel L1 term.
            lr: Adam learning rate.
            betas: Adam betas.
            weight_decay: Adam weight decay.
            scheduler: "cosine" or "constant".
            warmup_steps: linear warm-up steps.
            lpips: "auto", "random" or "off".
        """
        super().__init__()
        self.save_hyperparameters()
        self.vae = LMAE(in_channels=3, latent_channels=latent_channels, num_down=num_down,
                        base_channels=base_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                        norm_groups=norm_groups, output="image")
        self.loss_fn = PerceptualLoss(weights=perceptual_weights, scales=perceptual_scales,
                                      layer_weights=perceptual_layer_weights, l1_weight=l1_weight,
                                      l1_scales=l1_scales)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        frame = batch["driving"]
        out = self.vae(frame, sample=stage == "train")
        kl = kl_divergence(out["mu"], out["logvar"])
        loss = self.loss_fn(out["dynamics"], frame) + self.hparams.kl_weight * kl
        metrics = {"loss": loss, "kl": kl}
        if stage != "train":
            metrics.update(self.image_metrics(out["dynamics"], frame))
            metrics["compression_ratio"] = LMAE.compression_ratio(frame.shape, out["mu"].shape)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=stage == "val",
                      sync_dist=stage != "train", batch_size=len(frame))
        return loss
