"""What every phase's LightningModule shares: the checkpoint record, an
optimizer over trainable parameters only, and image-quality metrics."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Timer

from microscope_pl.callbacks import NonFiniteLossGuard, TimedLastCheckpoint
from microscope_pl.metrics.image import frame_psnr, image_quality
from microscope_pl.models.config import to_dict
from microscope_pl.models.losses import mouth_crops
from microscope_pl.modules.settings import OptimizerConfig
from microscope_pl.phases import FORMAT, count_parameters

# Frozen upstream networks are in eval mode on purpose (phases.load_frozen).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


class PhaseModule(LightningModule):
    """Base class; subclasses set `phase`, call `save_hyperparameters()` once, set
    `self.optim` (an OptimizerConfig) and describe their networks in `network_configs`."""

    phase: str = ""
    optim: OptimizerConfig
    upstream_record: dict[str, Any] | None = None  # phases.Upstream.record of a downstream phase
    data_record: dict[str, Any] | None = None  # datasets.data_record of the data it was fitted on

    def network_configs(self) -> dict[str, Any]:
        """The settings of every network whose weights this module holds, by name."""
        raise NotImplementedError

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

    def configure_callbacks(self) -> list[Any]:
        """The fault defaults, each unless the trainer's callbacks have one (its settings then win):
        a NonFiniteLossGuard (NaN/inf-loss steps skipped, 10 in a row stop the run) and a
        TimedLastCheckpoint (last.ckpt also every 5 minutes of wall clock)."""
        configured = self._trainer.callbacks if self._trainer is not None else []
        defaults = [NonFiniteLossGuard(), TimedLastCheckpoint(minutes=5.0)]
        return [d for d in defaults if not any(isinstance(c, type(d)) for c in configured)]

    # ------------------------------------------------------------ checkpoints
    def checkpoint_record(self) -> dict[str, Any]:
        """`checkpoint["microscope"]`: what downstream phases and generation build from (phases.py)."""
        return {"format": FORMAT, "image_size": self.hparams.get("image_size"),
                "audio_features": self.hparams.get("audio_features"),
                "networks": to_dict(self.network_configs()), "upstream": self.upstream_record,
                "data": self.data_record}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["microscope_phase"] = self.phase
        checkpoint["microscope"] = to_dict(self.checkpoint_record())
        # dataclass settings as plain dicts: the file stays loadable with weights_only=True
        hparams = to_dict(dict(checkpoint.get("hyper_parameters", {})))
        if self.upstream_record is not None:  # restoring this checkpoint builds the frozen upstream from it
            hparams["upstream"] = to_dict(self.upstream_record)
        checkpoint["hyper_parameters"] = hparams

    # -------------------------------------------------------------- optimizer
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optim.build(self.trainable_parameters())
        if self.optim.scheduler == "constant":
            return optimizer
        total = self.trainer.estimated_stepping_batches if self._trainer else 1
        total = int(total) if math.isfinite(total) else 10**10
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self.optim.cosine_factor(total, self._time_spent()))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _time_spent(self) -> Callable[[], float] | None:
        """The share of --trainer.max_time this fit has used (None without a time budget), so a
        budgeted run's schedule decays by the end of its budget; resumes keep the Timer's clock."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None) if self._trainer else None
        if timer is None or timer.time_remaining("train") is None:
            return None

        def share() -> float:
            spent = timer.time_elapsed("train")
            return spent / max(1e-9, spent + timer.time_remaining("train"))

        return share

    def on_fit_start(self) -> None:
        trainable, frozen = count_parameters(self)
        self.print(f"[{self.phase}] parameters: {trainable:,} trainable, {frozen:,} frozen")
        if self.logger is not None:
            self.logger.log_hyperparams({"params/trainable": trainable, "params/frozen": frozen})
        self._check_data()

    def _check_data(self) -> None:
        """Before the first step: the data must match the model's image size, audio
        features and their width; remember its framing for the checkpoint record."""
        data = getattr(self.trainer, "datamodule", None)
        size = getattr(data, "image_size", None) if data is not None else None
        ours = self.hparams.get("image_size")
        if size is not None and ours is not None and size != ours:
            raise ValueError(f"data.image_size is {size} but model.image_size is {ours}; set both to one value")
        root = getattr(data, "data_root", None)
        if root is None:
            return
        from microscope_pl.data.datasets import data_record, load_manifest

        found = data_record(load_manifest(root))
        kind = self.hparams.get("audio_features")
        if kind is not None and found["audio_features"] != kind:
            raise ValueError(f"model.audio_features is {kind!r} but the data set {root} has "
                             f"{found['audio_features']!r}; prepare it with --audio-features {kind} or change the model")
        for name, config in self.network_configs().items():
            dim = getattr(config, "audio_dim", None)
            if dim is not None and found["audio_dim"] is not None and int(dim) != int(found["audio_dim"]):
                raise ValueError(f"the {name} network takes {dim}-d audio features but the data set {root} has "
                                 f"{found['audio_dim']}-d {found['audio_features']} features")
        upstream = (self.upstream_record or {}).get("data") or {}
        if upstream.get("framing") and found["framing"] and upstream["framing"] != found["framing"]:
            self.print(f"note: the upstream {self.upstream_record['phase']} was trained on data framed as "
                       f"{upstream['framing']}, this data set is framed as {found['framing']}")
        self.data_record = found

    # ---------------------------------------------------------------- metrics
    def mouth_psnr(self, pred: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor | None:
        """Mean PSNR inside the mouth boxes of b 3 H W frames in [0, 1] (None without boxes)."""
        if boxes is None:
            return None
        size = pred.shape[-1] // 2
        pred_crops, target_crops = mouth_crops(pred, boxes, size).clamp(0, 1), mouth_crops(target, boxes, size)
        if len(pred_crops) == 0:  # no sample has a box
            return None
        return frame_psnr(pred_crops, target_crops).clamp(max=100.0).mean()

    def image_metrics(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean PSNR, SSIM (and LPIPS when its backbone is available) of b 3 h w images in [0, 1]."""
        return {k: v.mean() for k, v in image_quality(pred, target, self._lpips_net()).items()}

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
