"""Phase 1: train the flow-aware dynamics extractor (paper eq. 5)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from microscope_pl.models.config import FDEConfig, from_dict
from microscope_pl.models.motion import register_source
from microscope_pl.models.perceptual import EquivarianceLoss
from microscope_pl.models.visualize import flow_to_color, image_row
from microscope_pl.modules.base import PhaseModule
from microscope_pl.modules.media import log_images
from microscope_pl.modules.settings import PAPER_ADAM, ImageLossConfig, OptimizerConfig

class FDEModule(PhaseModule):
    """Trains FDE: x_dri ~ D(A(E(x_src), f) * m) with the VGG loss L_vgg."""

    phase = "phase1"

    def __init__(
        self,
        image_size: int = 128,
        network: Optional[FDEConfig] = None,
        loss: Optional[ImageLossConfig] = None,
        equivariance_weight: float = 0.0,
        optimizer: Optional[OptimizerConfig] = None,
        lpips: str = "auto",
    ) -> None:
        """
        Args:
            image_size: frame size the network is trained at (square); the data must match.
            network: FDE settings (null: the paper's).
            loss: the VGG loss of eq. 5 and an optional pixel L1 pyramid (null: the paper's).
            equivariance_weight: weight of MRAA's region-shift equivariance loss (0 = off).
            optimizer: Adam settings (null: the baseline's lr 2e-4, betas 0.5/0.999, cosine).
            lpips: "auto" (pretrained AlexNet if on disk, else skipped), "random", "off".
        """
        super().__init__()
        network = from_dict(FDEConfig, network)
        loss = from_dict(ImageLossConfig, loss)
        optimizer = from_dict(OptimizerConfig, optimizer or PAPER_ADAM)
        self.save_hyperparameters()
        if image_size % (network.downsample * 8) != 0:
            raise ValueError(f"image_size {image_size} must be a multiple of 8 * downsample = {8 * network.downsample}")
        self.network, self.optim = network, optimizer
        self.fde = network.build()
        self.equivariance = EquivarianceLoss() if equivariance_weight > 0 else None
        self.loss_fn = loss.build()

    def network_configs(self) -> dict[str, Any]:
        return {"fde": self.network}

    # ----------------------------------------------------------- eq. 5
    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.fde(source, driving)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch["source"], batch["driving"])
        loss = self.loss_fn(out["frame"], batch["driving"])
        if self.equivariance is not None:  # optional MRAA extra: region centres follow a random warp
            equivariance = self.equivariance(lambda x: self.fde.regions(x)["shift"], batch["driving"], out["shift"])
            self.log("train/equivariance", equivariance, batch_size=len(batch["source"]))
            loss = loss + self.hparams.equivariance_weight * equivariance
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["source"]))
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        source, driving = batch["source"], batch["driving"]
        out = self(source, driving)
        metrics = {"loss": self.loss_fn(out["frame"], driving), **self.image_metrics(out["frame"], driving)}
        mouth = self.mouth_psnr(out["frame"], driving, batch.get("mouth_box"))
        if mouth is not None:
            metrics["mouth_psnr"] = mouth
        metrics["copy_source_psnr"] = self.image_metrics(source, driving)["psnr"]
        if stage == "test":  # what one global affine explains, for the learned FDE to beat
            metrics["registration_psnr"] = self.image_metrics(register_source(source, driving), driving)["psnr"]
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=True, batch_size=len(source),
                      prog_bar=stage == "val")
        return out

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._evaluate(batch, "val")
        if batch_idx == 0 and self.global_rank == 0:
            dyn = out["dynamics"][:4]
            rows = [image_row(s, d, r, flow_to_color(f[None])[0], m)
                    for s, d, r, f, m in zip(batch["source"], batch["driving"], out["frame"], dyn[:, :2], dyn[:, 2:])]
            log_images(self, "val/source|driving|reconstruction|flow|occlusion", torch.cat(rows, dim=1))

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")
