"""Ablation "VAE d/32" (paper Table 5): a single-stage KL auto-encoder on
pixels, 4 latent channels at H/32, the compressor MDCF is compared against."""
from __future__ import annotations

from typing import Any, Optional

import torch

from microscope_pl.models.config import PixelVAEConfig, from_dict
from microscope_pl.models.lmae import LMAE
from microscope_pl.models.losses import kl_divergence
from microscope_pl.modules.base import PhaseModule
from microscope_pl.modules.settings import PAPER_ADAM, ImageLossConfig, OptimizerConfig


class PixelVAEModule(PhaseModule):
    """Reconstructs the driving frame from its own latent (no source image)."""

    phase = "vae"

    def __init__(
        self,
        image_size: int = 128,
        network: Optional[PixelVAEConfig] = None,
        loss: Optional[ImageLossConfig] = None,
        kl_weight: float = 1e-4,
        optimizer: Optional[OptimizerConfig] = None,
        lpips: str = "auto",
    ) -> None:
        """
        Args:
            image_size: frame size (square).
            network: pixel-VAE settings (null: 4 channels at H/32, as MDCF's latent).
            loss: the VGG loss (null: the paper's).
            kl_weight: weight of the KL term (same convention as LMAE).
            optimizer: Adam settings (null: lr 2e-4, betas 0.5/0.999, constant).
            lpips: "auto", "random" or "off".
        """
        super().__init__()
        network = from_dict(PixelVAEConfig, network)
        loss = from_dict(ImageLossConfig, loss)
        optimizer = from_dict(OptimizerConfig, optimizer or {**PAPER_ADAM, "scheduler": "constant", "warmup_steps": 50})
        self.save_hyperparameters()
        self.network, self.optim = network, optimizer
        self.vae = network.build()
        self.loss_fn = loss.build()

    def network_configs(self) -> dict[str, Any]:
        return {"vae": self.network}

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        frame = batch["driving"]
        out = self.vae(frame, sample=stage == "train")
        kl = kl_divergence(out["mu"], out["logvar"])
        loss = self.loss_fn(out["frame"], frame) + self.hparams.kl_weight * kl
        metrics = {"loss": loss, "kl": kl}
        if stage != "train":
            metrics.update(self.image_metrics(out["frame"], frame))
            metrics["compression_ratio"] = LMAE.compression_ratio(frame.shape, out["mu"].shape)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, prog_bar=stage == "val",
                      sync_dist=stage != "train", batch_size=len(frame))
        return loss
