"""Training settings shared by the phases: the optimiser and the image loss.

Network settings live in models/config.py; these are what a LightningModule
adds on top (house style: LightningModules hold the training logic only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class OptimizerConfig:
    """Adam with an optional warm-up + cosine schedule (DESIGN.md: the baseline's Adam).

    Args:
        lr: learning rate.
        betas: Adam betas.
        weight_decay: Adam weight decay (L2, as torch.optim.Adam applies it).
        scheduler: "constant" (no schedule) or "cosine" (linear warm-up, then cosine decay to 10 %
            by the last step or the end of --trainer.max_time, whichever comes first).
        warmup_steps: linear warm-up steps of "cosine" (and the EMA start of diffusion).
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    scheduler: str = "constant"
    warmup_steps: int = 100

    def __post_init__(self) -> None:
        if self.scheduler not in ("constant", "cosine"):
            raise ValueError(f"scheduler must be 'constant' or 'cosine', got {self.scheduler!r}")

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)

    def cosine_factor(self, total_steps: int, time_spent: Callable[[], float] | None = None) -> Callable[[int], float]:
        """Step -> learning-rate factor of the "cosine" schedule: linear warm-up, then cosine
        decay to 10 % over `total_steps` or over the time budget, whichever ends first
        (`time_spent()`: the share of --trainer.max_time used so far); warm-up only when
        there is neither horizon."""
        total = max(1, int(total_steps))
        warmup = min(self.warmup_steps, total // 2)
        if total > 10**9 and time_spent is None:  # no horizon to decay over
            return lambda step: min(1.0, (step + 1) / max(1, warmup))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            if time_spent is not None:
                progress = max(progress, time_spent())
            return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))

        return factor


# The flow baseline's optimiser (DESIGN.md): the default of phases 1 and 2.
PAPER_ADAM = {"lr": 2e-4, "betas": (0.5, 0.999), "scheduler": "cosine", "warmup_steps": 100}


@dataclass
class ImageLossConfig:
    """The VGG perceptual loss of eq. 5 (and IGC, eq. 7), plus an optional pixel L1 pyramid.

    Args:
        weights: VGG19 weights: "imagenet" (local file or torchvision download), a path
            to a state dict, or "random" (offline demo/tests only).
        scales: image-pyramid scales of the VGG loss.
        layer_weights: L1 weights of relu1_1..relu5_1 (trailing zeros skip layers).
        l1_weight: weight of an extra pixel L1 term (0 = the paper's loss alone).
        l1_scales: pyramid scales of the pixel L1 term.
    """

    weights: str = "imagenet"
    scales: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125])
    layer_weights: list[float] = field(default_factory=lambda: [10.0] * 5)
    l1_weight: float = 0.0
    l1_scales: list[float] = field(default_factory=lambda: [1.0])

    def build(self) -> Any:
        from microscope_pl.models.perceptual import PerceptualLoss

        return PerceptualLoss(weights=self.weights, scales=tuple(self.scales), layer_weights=tuple(self.layer_weights),
                              l1_weight=self.l1_weight, l1_scales=tuple(self.l1_scales))
