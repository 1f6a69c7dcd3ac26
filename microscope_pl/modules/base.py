"""What every phase's LightningModule shares: the phase tag in checkpoints,
an optimizer over trainable parameters only, and image-quality metrics."""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from microscope_pl.phases import count_parameters

# Frozen upstream networks are in eval mode on purpose (phases.load_frozen).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class PhaseModule(LightningModule):
    """Base class; subclasses set `phase` and call `save_hyperparameters()`."""

    phase: str = ""

    # ------------------------------------------------------------ steps
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """One loss/metrics pass for `stage` ("train", "val", "test"); modules
        whose stages share it implement this instead of the three hooks."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["microscope_phase"] = self.phase

    # -------------------------------------------------------------- optimizer
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.trainable_parameters()
        optimizer = torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.scheduler == "constant":
            return optimizer
        if hp.scheduler != "cosine":
            raise ValueError(f"scheduler must be 'constant' or 'cosine', got {hp.scheduler!r}")
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer else 1
        warmup = min(hp.warmup_steps, total // 2)

        def factor(step: int) -> float:  # linear warm-up, cosine decay to 10 %
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        if not math.isfinite(total) or total > 10**9:  # max_time only: no horizon to decay over
            factor = lambda step: min(1.0, (step + 1) / max(1, warmup))  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        trainable, frozen = count_parameters(self)
        self.print(f"[{self.phase}] parameters: {trainable:,} trainable, {frozen:,} frozen")
        if self.logger is not None:
            self.logger.log_hyperparams({"params/trainable": trainable, "params/frozen": frozen})
        self._check_data()

    def _check_data(self) -> None:
        """The data must match the model's image size and audio features."""
        data = getattr(self.trainer, "datamodule", None)
        size = getattr(data, "image_size", None) if data is not None else None
        ours = self.hparams.get("image_size")
        if size is not None and ours is not None and size != ours:
            raise ValueError(f"data.image_size is {size} but model.image_size is {ours}; set both to one value")
        kind = self.hparams.get("audio_features")
        root = getattr(data, "data_root", None)
        if kind is not None and root is not None:
            from microscope_pl.data.datasets import load_manifest

            found = load_manifest(root).get("audio_features")
            if found != kind:
                raise ValueError(f"model.audio_features is {kind!r} but the data set {root} has {found!r}")

    # ---------------------------------------------------------------- metrics
    def image_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """PSNR, SSIM (and LPIPS when its backbone is available) of b 3 h w images in [0, 1]."""
        pred = pred.float().clamp(0, 1)
        target = target.float()
        out = {
            "psnr": peak_signal_noise_ratio(pred, target, data_range=1.0, dim=(1, 2, 3)),
            "ssim": structural_similarity_index_measure(pred, target, data_range=1.0),
        }
        lpips = self._lpips_net()
        if lpips is not None:
            out["lpips"] = lpips(pred, target).mean()
        return out

    def _lpips_net(self) -> Any:
        """LPIPS per `hparams.lpips`: "auto" (pretrained backbone if on disk,
        else skipped with one warning), "random" (tests only), "off"."""
        mode = self.hparams.get("lpips", "auto")
        if mode == "off":
            return None
        if not hasattr(self, "_lpips_cache"):
            from microscope_pl.metrics.image import LPIPSMetric

            try:
                net = LPIPSMetric(pretrained_backbone=(mode != "random"))
            except (FileNotFoundError, RuntimeError) as err:
                warnings.warn(f"LPIPS skipped: {err}", stacklevel=2)
                net = None
            if net is not None:
                net = net.to(self.device).eval()
                for param in net.parameters():
                    param.requires_grad_(False)
            object.__setattr__(self, "_lpips_cache", net)  # not a submodule: stays out of checkpoints
        return self._lpips_cache
