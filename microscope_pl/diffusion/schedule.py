"""Discrete-time Gaussian diffusion schedule (DDPM; Nichol & Dhariwal 2021).

The forward process and the conversions between what a denoiser may predict,
with ``a_t = alphas_cumprod[t]`` (written alpha-bar in the DDPM papers):

    x_t  = sqrt(a_t) x0 + sqrt(1 - a_t) eps                 (DDPM eq. 4)
    v    = sqrt(a_t) eps - sqrt(1 - a_t) x0                 (Salimans & Ho 2022)
    x0   = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)            (eps prediction)
    x0   = sqrt(a_t) x_t - sqrt(1 - a_t) v                  (v prediction)
    eps  = sqrt(1 - a_t) x_t + sqrt(a_t) v

The schedule is parameter-free: plain tensors, no ``nn.Module`` and no
buffers in any checkpoint. Coefficients are computed in float64 once and
gathered per sample onto whatever device ``t`` lives on, so calling
:meth:`DiffusionSchedule.to` is an optimisation, not a requirement.

Shapes: ``x0``, ``x_t``, ``noise``: any ``b ...`` (``b c n h w`` for video
latents); ``t``: ``b`` long.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["DiffusionSchedule", "Prediction", "cosine_betas", "linear_betas"]

Prediction = Literal["eps", "v"]


# --------------------------------------------------------------------------
# Beta schedules
# --------------------------------------------------------------------------


def cosine_betas(num_steps: int = 1000, s: float = 0.008,
                 max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Improved DDPM, eq. 17):

        a(t) = f(t) / f(0),  f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)
        beta_t = min(1 - a(t + 1) / a(t), max_beta)

    The offset ``s`` keeps beta_0 from vanishing; ``max_beta`` (0.999) stops
    the singularity at t = T, which leaves ``a_{T-1}`` tiny but positive.

    Returns:
        ``num_steps`` float64 betas in (0, max_beta].
    """
    steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def linear_betas(num_steps: int = 1000, start: float = 1e-4,
                 end: float = 2e-2) -> Tensor:
    """DDPM's linear schedule, rescaled so any ``num_steps`` has the same ends
    as 1000 steps (the Improved-DDPM convention). Returns float64."""
    scale = 1000 / num_steps
    return torch.linspace(start * scale, end * scale, num_steps, dtype=torch.float64)


# --------------------------------------------------------------------------
# The schedule object
# --------------------------------------------------------------------------


class DiffusionSchedule:
    """Holds ``alphas_cumprod`` and converts between x0, eps, v and x_t."""

    def __init__(self, num_steps: int = 1000,
                 schedule: Literal["cosine", "linear"] = "cosine",
                 prediction: Prediction = "eps") -> None:
        """
        Args:
            num_steps: training steps T (DAWN: 1000).
            schedule: "cosine" (DAWN) or "linear" betas.
            prediction: what the denoiser outputs, "eps" (DAWN) or "v".
        """
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps
        self.schedule = schedule
        self.prediction: Prediction = prediction
        betas = cosine_betas(num_steps) if schedule == "cosine" else linear_betas(num_steps)
        #: float64 masters on the CPU (sampler coefficients are Python floats).
        self.betas64 = betas
        self.alphas_cumprod64 = torch.cumprod(1 - betas, dim=0)
        self._device = torch.device("cpu")
        self._refresh()

    def _refresh(self) -> None:
        dev = self._device
        self.betas = self.betas64.to(dev, torch.float32)
        self.alphas_cumprod = self.alphas_cumprod64.to(dev, torch.float32)
        self.sqrt_alphas_cumprod = self.alphas_cumprod64.sqrt().to(dev, torch.float32)
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod64).sqrt().to(
            dev, torch.float32)
        self._exact = {
            id(self.alphas_cumprod): self.alphas_cumprod64.to(dev),
            id(self.sqrt_alphas_cumprod): self.alphas_cumprod64.sqrt().to(dev),
            id(self.sqrt_one_minus_alphas_cumprod): (1 - self.alphas_cumprod64).sqrt().to(dev),
        }

    def to(self, device: torch.device | str) -> "DiffusionSchedule":
        """Move the float32 coefficient tables to ``device``; returns self."""
        self._device = torch.device(device)
        self._refresh()
        return self

    def __repr__(self) -> str:
        return (f"DiffusionSchedule(num_steps={self.num_steps}, "
                f"schedule={self.schedule!r}, prediction={self.prediction!r})")

    # ----------------------------------------------------------------------

    def alpha_bar(self, t: int) -> float:
        """``a_t`` as a Python float (float64 precision), for samplers."""
        return float(self.alphas_cumprod64[t])

    def _coef(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """Gather ``table[t]`` as ``b 1 1 ...`` matching ``like``'s rank and dtype
        (float64 inputs read the float64 masters, e.g. in exactness tests)."""
        if like.dtype == torch.float64:
            table = self._exact[id(table)]
        if table.device != t.device:
            table = table.to(t.device)
        c = table[t.long()].to(like.dtype)
        return c.view(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, batch: int, device: torch.device | str | None = None,
                         generator: torch.Generator | None = None) -> Tensor:
        """Uniform training steps ``t ~ U{0, ..., T-1}``: ``b`` long."""
        gdev = generator.device if generator is not None else device
        t = torch.randint(0, self.num_steps, (batch,), generator=generator, device=gdev)
        return t.to(device) if device is not None else t

    # ---- DDPM eq. 4: the forward (noising) process -------------------------

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise``; shape of ``x0``."""
        return (self._coef(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    # ---- Regression target and its inversions (eps / v parameterisation) --

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the denoiser is trained to output: ``noise`` (eps) or
        ``v = sqrt(a_t) noise - sqrt(1 - a_t) x0``."""
        if self.prediction == "eps":
            return noise
        return (self._coef(self.sqrt_alphas_cumprod, t, x0) * noise
                - self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def predict_x0(self, x_t: Tensor, t: Tensor, model_out: Tensor) -> Tensor:
        """Clean-sample estimate from the model output at step ``t``."""
        sa = self._coef(self.sqrt_alphas_cumprod, t, x_t)
        so = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction == "eps":
            return (x_t - so * model_out) / sa
        return sa * x_t - so * model_out

    def predict_eps(self, x_t: Tensor, t: Tensor, model_out: Tensor) -> Tensor:
        """Noise estimate from the model output at step ``t``."""
        if self.prediction == "eps":
            return model_out
        sa = self._coef(self.sqrt_alphas_cumprod, t, x_t)
        so = self._coef(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return so * x_t + sa * model_out
