"""PBNet: pose (6) and blink (2) sequences from audio, a transformer CVAE."""
from __future__ import annotations

import torch

from microscope_pl.models.pbnet import PBNet, pbnet_loss
from microscope_pl.modules.base import PhaseModule


class PBNetModule(PhaseModule):
    """Learns p(pose, blink | audio) on the data set's tracks, as deltas from
    the first frame of each clip, per channel scaled to unit spread."""

    phase = "pbnet"

    def __init__(
        self,
        audio_dim: int = 80,
        audio_features: str = "logmel",
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
        latent_dim: int = 64,
        dropout: float = 0.1,
        kl_weight: float = 1e-3,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        scheduler: str = "constant",
        warmup_steps: int = 50,
    ) -> None:
        """
        Args:
            audio_dim: per-frame audio feature width (80 log-mel, 1024 HuBERT).
            audio_features: the data set's audio features ("logmel" or "hubert:<id or dir>"),
                checked at fit start and used by `microscope generate`.
            d_model: transformer width.
            num_heads: attention heads.
            num_layers: encoder and decoder layers.
            latent_dim: width of the sequence-level latent.
            dropout: transformer dropout.
            kl_weight: weight of the KL term of the CVAE.
            lr: Adam learning rate.
            betas: Adam betas.
            weight_decay: Adam weight decay.
            scheduler: "cosine" or "constant".
            warmup_steps: linear warm-up steps.
        """
        super().__init__()
        self.save_hyperparameters()
        self.net = PBNet(audio_dim=audio_dim, motion_dim=8, d_model=d_model, num_heads=num_heads,
                         num_layers=num_layers, latent_dim=latent_dim, dropout=dropout)
        self.register_buffer("motion_std", torch.ones(8))
        self.register_buffer("calibrated", torch.tensor(False))

    def _motion(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`b n 8` deltas from the clip's first frame, scaled to unit spread."""
        motion = torch.cat([batch["pose"], batch["blink"]], dim=-1)
        motion = motion - motion[:, :1]
        if not bool(self.calibrated):
            std = motion.flatten(0, 1).std(dim=0).clamp_min(1e-3)
            if self._trainer is not None:
                std = self.trainer.strategy.reduce(std, reduce_op="mean")
            self.motion_std.copy_(std)
            self.calibrated.fill_(True)
        return motion / self.motion_std

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
        motion = self.net.sample(audio, generator=generator, temperature=temperature) * self.motion_std
        return motion[..., :6], motion[..., 6:]
