"""Samplers for the latent video diffusion: DDIM and DPM-Solver++(2M).

Both take a ``model_fn(x_t, t) -> model output`` (eps or v, as the schedule
says) and return x0 of ``shape``; conditions and classifier-free guidance are
composed outside by :func:`guided_model_fn`, so the samplers know nothing of
audio or motion. Both run under ``torch.no_grad()`` (no activation is kept
between steps; the result is an ordinary tensor usable later in autograd,
unlike an ``inference_mode`` tensor) and make exactly ``steps`` model calls.

Notation: ``a_t`` = alphas_cumprod[t], ``alpha_t = sqrt(a_t)``,
``sigma_t = sqrt(1 - a_t)``, ``lambda_t = log(alpha_t / sigma_t)`` (half the
log-SNR). The last step always lands on the clean sample (a = 1, sigma = 0),
i.e. returns the final x0 prediction.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from microscope_pl.diffusion.schedule import DiffusionSchedule

__all__ = [
    "ModelFn",
    "ProgressFn",
    "ddim_sample",
    "dpm_solver_pp_2m_sample",
    "guided_model_fn",
    "GuidedModel",
    "sampling_timesteps",
]

ModelFn = Callable[[Tensor, Tensor], Tensor]
ProgressFn = Callable[[int, int], None]
Spacing = Literal["leading", "trailing"]


def sampling_timesteps(num_train_steps: int, steps: int,
                       spacing: Spacing = "leading") -> list[int]:
    """The ``steps`` training steps a sampler visits, in decreasing order.

    - ``"leading"``: ``round(i T / S)`` for ``i < S`` (0, 50, ..., 950 for
      T = 1000, S = 20), DDIM's linear sub-sequence as respaced in Improved
      DDPM; the default, and the safe choice for eps prediction. It never
      visits t = T-1, where the clipped cosine schedule has ``a ~ 2e-9``: an
      eps model's x0 estimate there is divided by ``sqrt(a) ~ 5e-5``, so an
      eps error is amplified ~1000x in the first step. The price: x_T ~ N(0, I)
      stands in for q(x_950), whose signal coefficient is ``sqrt(a) ~ 0.08``.
    - ``"trailing"``: ``round(T - i T / S) - 1`` (999, 949, ..., 49); starts at
      the true terminal step (Lin et al. 2024). Markedly more accurate with
      an exact denoiser (see tests) and with v prediction; risky for eps.

    Returns:
        Python ints, strictly decreasing.
    """
    if not 1 <= steps <= num_train_steps:
        raise ValueError(f"steps={steps} must be in [1, num_train_steps={num_train_steps}]")
    if spacing == "leading":
        ts = [round(i * num_train_steps / steps) for i in range(steps)]
    elif spacing == "trailing":
        ts = [round(num_train_steps - i * num_train_steps / steps) - 1 for i in range(steps)]
    else:
        raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
    return sorted(set(ts), reverse=True)


def _randn(shape: Sequence[int], generator: torch.Generator | None,
           device: torch.device, dtype: torch.dtype) -> Tensor:
    """Noise drawn on the generator's device, then moved: the same seed gives
    the same sample on CPU and GPU."""
    gdev = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gdev, dtype=dtype).to(device)


def _start(shape: Sequence[int], generator: torch.Generator | None,
           noise: Tensor | None, device: torch.device | str | None,
           dtype: torch.dtype) -> Tensor:
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(noise.shape)} != shape {tuple(shape)}")
        return noise.to(device or noise.device, dtype)
    return _randn(shape, generator, torch.device(device or "cpu"), dtype)


def _x0_eps(schedule: DiffusionSchedule, x: Tensor, t: Tensor, out: Tensor,
            a: float, clip_x0: float | None) -> tuple[Tensor, Tensor]:
    """(x0, eps) estimates at step t; clipping x0 re-derives a consistent eps."""
    x0 = schedule.predict_x0(x, t, out)
    if clip_x0 is None:
        return x0, schedule.predict_eps(x, t, out)
    x0 = x0.clamp(-clip_x0, clip_x0)
    return x0, (x - math.sqrt(a) * x0) / math.sqrt(1 - a)


# --------------------------------------------------------------------------
# DDIM (Song et al. 2021, eq. 12)
# --------------------------------------------------------------------------


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: DiffusionSchedule,
    steps: int = 20,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    *,
    noise: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    spacing: Spacing = "leading",
    clip_x0: float | None = None,
) -> Tensor:
    """DDIM sampling from ``x_T ~ N(0, I)`` to x0 in ``steps`` model calls.

    Each step from ``t`` to ``s`` (the next visited step, or a_s = 1 at the end):

        sigma = eta * sqrt((1 - a_s) / (1 - a_t)) * sqrt(1 - a_t / a_s)
        x_s   = sqrt(a_s) x0^ + sqrt(1 - a_s - sigma^2) eps^ + sigma z

    ``eta = 0`` is the deterministic DDIM ODE sampler; ``eta = 1`` matches
    DDPM ancestral sampling's variance.

    Args:
        model_fn: ``(x_t: shape, t: b long) -> shape`` model output.
        shape: output shape, ``b c n h w`` for latent clips.
        schedule: the training schedule (its ``prediction`` decodes outputs).
        steps: number of model evaluations (DAWN: 20).
        eta: stochasticity, 0 = deterministic.
        generator: RNG for the initial and the per-step noise.
        progress: called as ``progress(i, steps)`` after step ``i``
            (0-based) has finished, so the last call has ``i = steps - 1``.
        noise: optional initial ``x_T`` (overrides ``generator`` for it).
        device, dtype: where and in which precision the state is kept.
        spacing: "leading" or "trailing", see :func:`sampling_timesteps`.
        clip_x0: clamp x0 estimates to ``[-clip_x0, clip_x0]`` (None: off).

    Returns:
        x0 samples of ``shape``.
    """
    x = _start(shape, generator, noise, device, dtype)
    ts = sampling_timesteps(schedule.num_steps, steps, spacing)
    for i, t in enumerate(ts):
        a = schedule.alpha_bar(t)
        a_next = schedule.alpha_bar(ts[i + 1]) if i + 1 < len(ts) else 1.0
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, eps = _x0_eps(schedule, x, tt, model_fn(x, tt).to(x.dtype), a, clip_x0)
        sigma = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma**2, 0.0)) * eps
        if sigma > 0:
            x = x + sigma * _randn(x.shape, generator, x.device, x.dtype)
        if progress is not None:
            progress(i, len(ts))
    return x


# --------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data-prediction form
# --------------------------------------------------------------------------


@torch.no_grad()
def dpm_solver_pp_2m_sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    schedule: DiffusionSchedule,
    steps: int = 10,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
    *,
    noise: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    spacing: Spacing = "leading",
    clip_x0: float | None = None,
    min_ratio: float = 0.5,
) -> Tensor:
    """Deterministic second-order multistep solver of the diffusion ODE.

    With ``h_i = lambda_{t_i} - lambda_{t_{i-1}}`` and ``r_i = h_{i-1} / h_i``:

        D_i     = (1 + 1/(2 r_i)) x0^_{i-1} - 1/(2 r_i) x0^_{i-2}   (D_1 = x0^_0)
        x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}}
                  - alpha_{t_i} (exp(-h_i) - 1) D_i

    The first step is first order (DDIM); so is the last, which goes to
    sigma = 0 (lambda = inf) and therefore returns the final x0 estimate.
    A step more than ``1 / min_ratio`` times longer in lambda than the one
    before (``r < min_ratio``) also falls back to first order: the 2M term
    extrapolates x0^ linearly over the step with weight ``1 / (2 r)``, which
    turns unstable when ``r`` is small (time-uniform steps near t = 0 on the
    cosine schedule; the same reason diffusers drops to first order at the
    end of short schedules). Same arguments as :func:`ddim_sample`, plus
    ``min_ratio``; ``eta`` must be 0 (kept in the signature so the two
    samplers are interchangeable).
    """
    if eta != 0:
        raise ValueError(f"dpm_solver_pp_2m_sample is deterministic; got eta={eta}")
    x = _start(shape, generator, noise, device, dtype)
    ts = sampling_timesteps(schedule.num_steps, steps, spacing)
    prev_x0: Tensor | None = None
    prev_h = 0.0
    for i, t in enumerate(ts):
        a = schedule.alpha_bar(t)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0, _ = _x0_eps(schedule, x, tt, model_fn(x, tt).to(x.dtype), a, clip_x0)
        if i + 1 == len(ts):
            x = x0
        else:
            a_next = schedule.alpha_bar(ts[i + 1])
            lam = 0.5 * math.log(a / (1 - a))
            lam_next = 0.5 * math.log(a_next / (1 - a_next))
            h = lam_next - lam
            r = prev_h / h if prev_x0 is not None else 0.0
            if prev_x0 is None or r < min_ratio:
                d = x0
            else:
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * prev_x0
            x = (math.sqrt((1 - a_next) / (1 - a)) * x
                 - math.sqrt(a_next) * math.expm1(-h) * d)
            prev_x0, prev_h = x0, h
        if progress is not None:
            progress(i, len(ts))
    return x


# --------------------------------------------------------------------------
# Classifier-free guidance over two conditions (audio, motion)
# --------------------------------------------------------------------------


def guided_model_fn(
    model: nn.Module,
    image_cond: Tensor | None,
    audio: Tensor,
    pose: Tensor | None,
    blink: Tensor | None,
    audio_scale: float = 1.0,
    motion_scale: float | None = 1.0,
    batch_branches: bool = True,
    guidance_every: int = 1,
) -> ModelFn:
    """Wrap a :class:`~microscope_pl.models.unet3d.UNet3D` into ``model_fn``.

    With ``u`` = output with audio and motion dropped, ``a`` = audio kept and
    motion dropped, ``f`` = full conditions (the image condition is never
    dropped), the returned function computes

        motion_scale given:  out = u + s_a (a - u) + s_m (f - a)
                                 = (1 - s_a) u + (s_a - s_m) a + s_m f
        motion_scale None:   out = u + s_a (f - u)       (single scale)

    Branches with weight exactly 0 are not evaluated, so ``s_a = s_m = 1``
    (or ``s_a = 1`` with None) is one plain conditional forward and
    ``s_a = s_m`` costs two. The combination is linear in the outputs, so it
    is valid for eps and v prediction alike.

    Guidance reuse (``guidance_every = k > 1``): every k-th call evaluates all
    branches and keeps the correction ``out - f``; the calls between evaluate
    ``f`` alone and add that correction. The guidance changes slowly along the
    trajectory, so the three-branch cost (3 forwards per step) becomes
    ``1 + 2 / k`` (1.5 at k = 4).

    Args:
        model: the denoiser (put it in eval mode first).
        image_cond, audio, pose, blink: conditions as for ``UNet3D.forward``.
        audio_scale: ``s_a``.
        motion_scale: ``s_m``, or None for the single-scale form.
        batch_branches: run the branches as one forward with a k-times
            batch (fastest) instead of k forwards (k-times less activation
            memory: prefer False for very long clips).
        guidance_every: evaluate the guidance branches every this many calls (>= 1).
    """
    if guidance_every < 1:
        raise ValueError(f"guidance_every must be >= 1, got {guidance_every}")
    plan = guidance_plan(audio_scale, motion_scale)
    return GuidedModel(model, (image_cond, audio, pose, blink), plan, batch_branches, guidance_every)


def guidance_plan(audio_scale: float, motion_scale: float | None) -> list[tuple[tuple[bool, bool], float]]:
    """The branches of :func:`guided_model_fn` with a non-zero weight: ((drop audio, drop motion), weight)."""
    if motion_scale is None:
        plan = [((True, True), 1 - audio_scale), ((False, False), audio_scale)]
    else:
        plan = [((True, True), 1 - audio_scale), ((False, True), audio_scale - motion_scale),
                ((False, False), motion_scale)]
    return [(drops, w) for drops, w in plan if w != 0]


def full_guidance_steps(plan: list[tuple[tuple[bool, bool], float]], steps: int, guidance_every: int) -> list[bool]:
    """Per sampling step (one model call each), whether :class:`GuidedModel` evaluates every
    branch of ``plan`` (True) or the full-condition branch plus the kept correction (False)."""
    reuse = guidance_every > 1 and len(plan) > 1 and GuidedModel.FULL in [d for d, _ in plan]
    return [not reuse or i % guidance_every == 0 for i in range(steps)]


class GuidedModel:
    """``model_fn(x, t)`` of :func:`guided_model_fn`: the weighted branches ``plan``
    ((drop audio, drop motion), weight), with the guidance reuse it describes.
    ``calls`` counts the calls, ``forwards`` the branch forwards made."""

    FULL = (False, False)  # the branch that keeps every condition

    def __init__(self, model: nn.Module, conditions: tuple[Tensor | None, ...],
                 plan: list[tuple[tuple[bool, bool], float]], batch_branches: bool, guidance_every: int) -> None:
        self.model, self.conditions, self.plan = model, conditions, plan
        self.batch_branches, self.guidance_every = batch_branches, guidance_every
        drops = [d for d, _ in plan]
        self.full_index = drops.index(self.FULL) if self.FULL in drops else None
        self.reuse = guidance_every > 1 and len(plan) > 1 and self.full_index is not None
        self.correction: Tensor | None = None  # the last `out - f`, when reusing
        self.calls = self.forwards = 0

    def branch(self, x: Tensor, t: Tensor, drop_a: bool, drop_m: bool) -> Tensor:
        da = torch.full((x.shape[0],), drop_a, device=x.device, dtype=torch.bool)
        dm = torch.full((x.shape[0],), drop_m, device=x.device, dtype=torch.bool)
        return self.model(x, t, *self.conditions, da, dm).float()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        if self.reuse and self.correction is not None and (self.calls - 1) % self.guidance_every:
            self.forwards += 1
            return self.branch(x, t, *self.FULL) + self.correction
        k, b = len(self.plan), x.shape[0]
        if self.batch_branches and k > 1:
            da = torch.tensor([d[0] for d, _ in self.plan], device=x.device).repeat_interleave(b)
            dm = torch.tensor([d[1] for d, _ in self.plan], device=x.device).repeat_interleave(b)
            rep = [None if v is None else torch.cat([v] * k, dim=0) for v in (x, t, *self.conditions)]
            outs = self.model(*rep, da, dm).float().chunk(k, dim=0)
        else:
            outs = [self.branch(x, t, *drops) for drops, _ in self.plan]
        self.forwards += k
        result = sum(w * o for (_, w), o in zip(self.plan, outs))
        assert isinstance(result, Tensor)
        if self.reuse:
            self.correction = result - outs[self.full_index]
        return result
