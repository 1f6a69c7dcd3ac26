"""PBNet: pose (6) and blink (2) sequences from audio, a transformer CVAE."""
from __future__ import annotations

from typing import Any, Optional

import torch

from microscope_pl.models.config import PBNetConfig, from_dict
from microscope_pl.models.pbnet import pbnet_loss
from microscope_pl.modules.base import PhaseModule
from microscope_pl.modules.settings import OptimizerConfig


class PBNetModule(PhaseModule):
    """Learns p(pose, blink | audio) on the data set's tracks, as deltas from
    the first frame of each clip, per channel scaled to unit spread."""

    phase = "pbnet"

    def __init__(
        self,
        audio_features: str = "logmel",
        network: Optional[PBNetConfig] = None,
        kl_weight: float = 1e-3,
        optimizer: Optional[OptimizerConfig] = None,
    ) -> None:
        """
        Args:
            audio_features: the data set's audio features ("logmel" or "hubert:<id or dir>"),
                checked at fit start and used by `microscope generate`.
            network: PBNet settings (null: 80-d audio, width 128, two layers).
            kl_weight: weight of the KL term of the CVAE.
            optimizer: Adam settings (null: lr 1e-3, constant).
        """
        super().__init__()
        network = from_dict(PBNetConfig, network)
        optimizer = from_dict(OptimizerConfig, optimizer or {"lr": 1e-3, "warmup_steps": 50})
        self.save_hyperparameters()
        self.network, self.optim = network, optimizer
        self.net = network.build()
        self.register_buffer("calibrated", torch.tensor(False))

    def network_configs(self) -> dict[str, Any]:
        return {"pbnet": self.network}

    def _motion(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`b n 8` deltas from the clip's first frame, scaled to unit spread."""
        motion = torch.cat([batch["pose"], batch["blink"]], dim=-1)
        motion = motion - motion[:, :1]
        if not bool(self.calibrated):
            std = motion.flatten(0, 1).std(dim=0).clamp_min(1e-3)
            if self._trainer is not None:
                std = self.trainer.strategy.reduce(std, reduce_op="mean")
            self.net.motion_std.copy_(std)
            self.calibrated.fill_(True)
        return motion / self.net.motion_std

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        target = self._motion(batch)
        out = self.net(batch["audio"], target)
        terms = pbnet_loss(out, target, self.hparams.kl_weight)
        self.log_dict({f"{stage}/{k}": v for k, v in terms.items()}, prog_bar=stage != "train",
                      sync_dist=stage != "train", batch_size=len(target))
        return terms["loss"]

    @torch.no_grad()
    def sample(self, audio: torch.Tensor, generator: torch.Generator | None = None,
               temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Pose `b n 6` and blink `b n 2` deltas from the first frame for audio `b n d`."""
        motion = self.net.sample(audio, generator=generator, temperature=temperature)
        return motion[..., :6], motion[..., 6:]
