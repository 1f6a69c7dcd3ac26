"""Phase 1: train the flow-aware dynamics extractor (paper eq. 5)."""
from __future__ import annotations

from typing import Any

import torch

from microscope_pl.models.fde import FDE
from microscope_pl.models.perceptual import EquivarianceLoss, PerceptualLoss
from microscope_pl.models.visualize import flow_to_color, image_row
from microscope_pl.modules.base import PhaseModule
from microscope_pl.modules.media import log_images

FDE_NETWORK_ARGS = (
    "downsample", "block_expansion", "max_features", "num_regions", "motion_block_expansion",
    "motion_max_features", "motion_num_blocks", "num_res_blocks", "norm", "source_skip", "flow_refinement",
    "global_alignment",
)


class FDEModule(PhaseModule):
    """Trains FDE: x_dri ~ D(A(E(x_src), f) * m) with the VGG loss L_vgg."""

    phase = "phase1"

    def __init__(
        self,
        image_size: int = 128,
        downsample: int = 4,
        block_expansion: int = 64,
        max_features: int = 256,
        num_regions: int = 10,
        motion_block_expansion: int = 32,
        motion_max_features: int = 1024,
        motion_num_blocks: int = 5,
        num_res_blocks: int = 6,
        norm: str = "group",
        source_skip: bool = False,
        flow_refinement: bool = False,
        global_alignment: bool = False,
        perceptual_weights: str = "imagenet",
        perceptual_scales: tuple[float, ...] = (1.0, 0.5, 0.25, 0.125),
        perceptual_layer_weights: tuple[float, ...] = (10.0, 10.0, 10.0, 10.0, 10.0),
        l1_weight: float = 0.0,
        l1_scales: tuple[float, ...] = (1.0,),
        equivariance_weight: float = 0.0,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        warmup_steps: int = 100,
        lpips: str = "auto",
    ) -> None:
        """
        Args:
            image_size: frame size the network is trained at (square); the data must match.
            downsample: flow resolution factor d (4 in the paper; 8 for the FDE d/8 ablation).
            block_expansion: generator width of the first block.
            max_features: generator width cap.
            num_regions: affine motion regions of the region predictor.
            motion_block_expansion: motion-network hourglass width.
            motion_max_features: motion-network width cap.
            motion_num_blocks: motion-network hourglass depth.
            num_res_blocks: residual blocks at the generator bottleneck.
            norm: "group" (DDP-safe, batch-size independent) or "batch".
            source_skip: blend the warped source image into the output (not in eq. 5; see FDE).
            flow_refinement: dense residual flow from the driving image (not in MRAA; see FDE).
            global_alignment: background affine starts from a Lucas-Kanade registration (not in MRAA; see FDE).
            perceptual_weights: VGG19 weights: "imagenet" (local file or torchvision
                download), a path to a state dict, or "random" (offline demo/tests only).
            perceptual_scales: image-pyramid scales of the VGG loss.
            perceptual_layer_weights: L1 weights of relu1_1..relu5_1 (trailing zeros skip layers).
            l1_weight: weight of an extra pixel L1 term (0 = the paper's loss alone).
            l1_scales: pyramid scales of the pixel L1 term.
            equivariance_weight: weight of MRAA's region-shift equivariance loss (0 = off).
            lr: Adam learning rate.
            betas: Adam betas.
            weight_decay: Adam weight decay.
            scheduler: "cosine" (warm-up then cosine decay) or "constant".
            warmup_steps: linear warm-up steps.
            lpips: "auto" (pretrained AlexNet if on disk, else skipped), "random", "off".
        """
        super().__init__()
        self.save_hyperparameters()
        if image_size % (downsample * 8) != 0:
            raise ValueError(f"image_size {image_size} must be a multiple of 8 * downsample = {8 * downsample}")
        self.fde = FDE(**self.fde_config())
        self.equivariance = EquivarianceLoss() if equivariance_weight > 0 else None
        self.loss_fn = PerceptualLoss(weights=perceptual_weights, scales=perceptual_scales,
                                      layer_weights=perceptual_layer_weights, l1_weight=l1_weight,
                                      l1_scales=l1_scales)

    def fde_config(self) -> dict[str, Any]:
        """The FDE constructor arguments; downstream phases rebuild FDE from these."""
        return {name: self.hparams[name] for name in FDE_NETWORK_ARGS}

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
        metrics["copy_source_psnr"] = self.image_metrics(source, driving)["psnr"]
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
