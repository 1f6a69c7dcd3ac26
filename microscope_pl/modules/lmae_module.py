"""Phase 2: train the latent motion auto-encoder with FDE frozen (eq. 6-9)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from microscope_pl.models.config import FDEConfig, LMAEConfig, from_dict
from microscope_pl.models.lmae import LMAE
from microscope_pl.models.losses import dynamics_mse, kl_divergence
from microscope_pl.models.mdcf import round_trip
from microscope_pl.models.visualize import flow_to_color, image_row
from microscope_pl.modules.base import PhaseModule
from microscope_pl.modules.media import log_images
from microscope_pl.modules.settings import PAPER_ADAM, ImageLossConfig, OptimizerConfig
from microscope_pl.phases import freeze_upstream


class LMAEModule(PhaseModule):
    """Trains LMAE on the dynamics [f; m] that the frozen FDE computes online.

    L = kl_weight * KL (eq. 8) + mse_weight * MSE (eq. 6) + igc_weight * IGC (eq. 7),
    where IGC is phase 1's perceptual loss on the frame FDE decodes from the
    LMAE reconstruction; its gradient flows through the frozen FDE decoder.
    """

    phase = "phase2"

    def __init__(
        self,
        image_size: int = 128,
        network: Optional[LMAEConfig] = None,
        loss: Optional[ImageLossConfig] = None,
        kl_weight: float = 1e-4,
        mse_weight: float = 1.0,
        igc_weight: float = 1.0,
        sample_latent: bool = True,
        joint_fde: Optional[FDEConfig] = None,
        optimizer: Optional[OptimizerConfig] = None,
        lpips: str = "auto",
        fde_ckpt_path: Optional[str] = None,
        upstream: Optional[dict[str, Any]] = None,
    ) -> None:
        """
        Args:
            image_size: frame size (square); must equal the upstream FDE's.
            network: LMAE settings (null: the paper's, d/32).
            loss: the VGG loss inside IGC (null: the paper's).
            kl_weight: lambda_KL of eq. 9 (KL averaged over latent elements).
            mse_weight: lambda_MSE of eq. 9.
            igc_weight: lambda_IGC of eq. 9 (0 = the "w/o IGC" ablation).
            sample_latent: train on z = mu + sigma * eps (eq. 4) rather than on mu.
            joint_fde: FDE settings to train FDE jointly from scratch instead of
                loading phase 1 (the "w/o TPC" ablation); null = the paper's two phases.
            optimizer: Adam settings (null: the baseline's lr 2e-4, betas 0.5/0.999, cosine).
            lpips: "auto", "random" or "off" (see FDEModule).
            fde_ckpt_path: phase-1 checkpoint; default checkpoints/synth/phase1/{best,last}.ckpt.
            upstream: written into every checkpoint of this phase (leave it empty): the
                phase-1 record (path, sha256, FDE settings). Given, the frozen FDE is
                built from it and its weights come from this module's checkpoint.
        """
        super().__init__()
        network = from_dict(LMAEConfig, network)
        loss = from_dict(ImageLossConfig, loss)
        optimizer = from_dict(OptimizerConfig, optimizer or PAPER_ADAM)
        if joint_fde is not None:
            joint_fde = from_dict(FDEConfig, joint_fde)
            if igc_weight <= 0:
                raise ValueError(f"joint_fde (w/o TPC) needs an image loss, igc_weight > 0 (got {igc_weight})")
            fde = joint_fde.build()
        else:
            frozen = freeze_upstream("phase1", fde_ckpt_path, image_size=image_size, record=upstream)
            self.upstream_record, fde = frozen.record, frozen.networks["fde"]
        self.save_hyperparameters()
        self.network, self.optim, self.joint_fde = network, optimizer, joint_fde
        self.fde = fde
        self.lmae = network.build()
        self.loss_fn = loss.build()

    def network_configs(self) -> dict[str, Any]:
        fde = self.joint_fde or self.upstream_record["networks"]["fde"]
        return {"fde": fde, "lmae": self.network}

    # ------------------------------------------------------------ eq. 6-9
    def losses(self, out: dict[str, torch.Tensor], driving: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        terms = {
            "kl": kl_divergence(out["mu"], out["logvar"]),
            "mse": dynamics_mse(out["dynamics"], out["target_dynamics"]),
            "igc": self.loss_fn(out["frame"], driving) if hp.igc_weight > 0 else torch.zeros((), device=driving.device),
        }
        terms["loss"] = hp.kl_weight * terms["kl"] + hp.mse_weight * terms["mse"] + hp.igc_weight * terms["igc"]
        return terms

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = round_trip(self.fde, self.lmae, batch["source"], batch["driving"], self.hparams.sample_latent)
        terms = self.losses(out, batch["driving"])
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, prog_bar=True, batch_size=len(batch["source"]))
        return terms["loss"]

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, batch_idx: int) -> None:
        source, driving = batch["source"], batch["driving"]
        out = round_trip(self.fde, self.lmae, source, driving)
        terms = self.losses(out, driving)
        fde_frame = self.fde.decode(out["features"], out["target_dynamics"])
        metrics: dict[str, Any] = dict(terms)
        metrics.update({f"mdcf_{k}": v for k, v in self.image_metrics(out["frame"], driving).items()})
        metrics.update({f"fde_{k}": v for k, v in self.image_metrics(fde_frame, driving).items()})
        metrics["copy_source_psnr"] = self.image_metrics(source, driving)["psnr"]
        for name, frame in (("mdcf", out["frame"]), ("fde", fde_frame)):  # the lips carry the audio
            mouth = self.mouth_psnr(frame, driving, batch.get("mouth_box"))
            if mouth is not None:
                metrics[f"{name}_mouth_psnr"] = mouth
        metrics["compression_ratio"] = LMAE.compression_ratio(source.shape, out["mu"].shape)
        metrics["latent_mu_abs"] = out["mu"].abs().mean()
        metrics["latent_sigma"] = torch.exp(0.5 * out["logvar"]).mean()
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=True, batch_size=len(source))
        if stage == "val" and batch_idx == 0 and self.global_rank == 0:
            before, after = out["target_dynamics"][:4], out["dynamics"][:4]
            rows = [image_row(d, f, r, flow_to_color(b[None, :2])[0], flow_to_color(a[None, :2])[0], b[2:], a[2:])
                    for d, f, r, b, a in zip(driving, fde_frame, out["frame"], before, after)]
            log_images(self, "val/driving|fde|mdcf|flow|flow_rt|occ|occ_rt", torch.cat(rows, dim=1))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", batch_idx)
