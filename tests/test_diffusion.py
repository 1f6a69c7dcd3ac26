"""Schedule, samplers (with analytic oracle denoisers) and guidance."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from microscope_pl.diffusion.samplers import (
    ddim_sample,
    dpm_solver_pp_2m_sample,
    guided_model_fn,
    sampling_timesteps,
)
from microscope_pl.diffusion.schedule import DiffusionSchedule, cosine_betas

SAMPLERS = {"ddim": (ddim_sample, 20), "dpmpp2m": (dpm_solver_pp_2m_sample, 10)}


# ---------------------------------------------------------------- schedule


def test_cosine_betas_and_alphas_cumprod() -> None:
    betas = cosine_betas(1000)
    assert betas.shape == (1000,) and (betas > 0).all() and (betas <= 0.999).all()
    abar = DiffusionSchedule(1000).alphas_cumprod64
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()
    # Improved DDPM: a_t follows cos^2 closely away from the clipped end.
    t = 500
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abar[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-6)


def test_schedule_validation() -> None:
    with pytest.raises(ValueError, match="prediction"):
        DiffusionSchedule(prediction="x0")  # type: ignore[arg-type]


def test_q_sample_statistics() -> None:
    sched = DiffusionSchedule()
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1), 2.0)
    for step in (10, 500, 990):
        t = torch.full((20000,), step)
        xt = sched.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        a = sched.alpha_bar(step)
        assert xt.mean().item() == pytest.approx(2 * math.sqrt(a), abs=0.03)
        assert xt.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.03, abs=1e-3)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_round_trip(prediction: str) -> None:
    sched = DiffusionSchedule(prediction=prediction)  # type: ignore[arg-type]
    x0, noise = torch.randn(2, 6, 3, 2, 1, 1, dtype=torch.float64)
    t = torch.tensor([0, 3, 250, 500, 800, 980])
    xt = sched.q_sample(x0, t, noise)
    out = sched.target(x0, noise, t)
    torch.testing.assert_close(sched.predict_x0(xt, t, out), x0)
    torch.testing.assert_close(sched.predict_eps(xt, t, out), noise)


def test_timestep_spacing() -> None:
    assert sampling_timesteps(1000, 20, "leading")[:2] == [950, 900]
    assert sampling_timesteps(1000, 20, "leading")[-1] == 0
    assert sampling_timesteps(1000, 20, "trailing")[:2] == [999, 949]
    assert len(sampling_timesteps(1000, 7)) == 7


# ---------------------------------------------------------------- samplers


def gaussian_oracle(sched: DiffusionSchedule, mu: float, s: float):
    """Exact denoiser for data x0 ~ N(mu, s^2) (s = 0: a single point):
    E[x0 | x_t] = mu + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) mu)."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = sched.alphas_cumprod64[t].to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        x0 = mu + a.sqrt() * s**2 / (a * s**2 + 1 - a) * (x - a.sqrt() * mu)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if sched.prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return fn


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_oracle_single_point(name: str, prediction: str) -> None:
    sampler, steps = SAMPLERS[name]
    sched = DiffusionSchedule(prediction=prediction)  # type: ignore[arg-type]
    target = torch.tensor([0.7, -1.3, 2.0]).view(1, 3, 1, 1, 1)

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        eps = (x - a.sqrt() * target) / (1 - a).sqrt()
        return eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * target

    out = sampler(oracle, (4, 3, 5, 2, 2), sched, steps=steps,
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand_as(out), atol=1e-4, rtol=1e-4)


def _gaussian_error(sampler, steps: int, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    sched = DiffusionSchedule(prediction=prediction)  # type: ignore[arg-type]
    mu, s = 1.5, 0.5
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(gaussian_oracle(sched, mu, s), z.shape, sched, steps=steps,
                  noise=z, dtype=torch.float64, spacing="trailing")
    return out, (out - (mu + s * z)).abs().mean()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_oracle_gaussian_follows_probability_flow(prediction: str) -> None:
    """For data x0 ~ N(mu, s^2) the probability-flow ODE maps x_T = z to
    mu + s z (the normalised coordinate is conserved). Both samplers must
    land there, DDIM at first order (error halves when steps double) and
    DPM-Solver++(2M) faster than that."""
    out, err_ddim = _gaussian_error(ddim_sample, 20, prediction)
    assert err_ddim < 0.04 and out.std().item() == pytest.approx(0.5, rel=0.1)
    _, err_ddim40 = _gaussian_error(ddim_sample, 40, prediction)
    assert 0.4 < err_ddim40 / err_ddim < 0.6
    out, err_dpm = _gaussian_error(dpm_solver_pp_2m_sample, 10, prediction)
    assert err_dpm < 0.03 and out.std().item() == pytest.approx(0.5, rel=0.1)
    _, err_dpm20 = _gaussian_error(dpm_solver_pp_2m_sample, 20, prediction)
    assert err_dpm20 / err_dpm < 0.25


def test_ddim_stochastic_is_seeded_and_calls_progress() -> None:
    sched = DiffusionSchedule()
    fn = gaussian_oracle(sched, 0.0, 1.0)
    calls: list[tuple[int, int]] = []
    a = ddim_sample(fn, (3, 2), sched, steps=5, eta=1.0,
                    generator=torch.Generator().manual_seed(3),
                    progress=lambda i, n: calls.append((i, n)))
    b = ddim_sample(fn, (3, 2), sched, steps=5, eta=1.0,
                    generator=torch.Generator().manual_seed(3))
    c = ddim_sample(fn, (3, 2), sched, steps=5, eta=0.0,
                    generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert calls == [(i, 5) for i in range(5)]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampling_keeps_no_graph(name: str) -> None:
    sampler, _ = SAMPLERS[name]
    lin = nn.Linear(2, 2)
    out = sampler(lambda x, t: lin(x), (3, 2), DiffusionSchedule(), steps=4)
    assert not out.requires_grad and out.grad_fn is None


# ---------------------------------------------------------------- guidance


class _Probe(nn.Module):
    """Returns 0 when everything is dropped, 1 audio-only, 3 fully conditioned."""

    def forward(self, x, t, image_cond, audio, pose, blink, drop_audio=None, drop_motion=None):
        da = torch.zeros(x.shape[0], dtype=torch.bool) if drop_audio is None else drop_audio
        dm = torch.zeros(x.shape[0], dtype=torch.bool) if drop_motion is None else drop_motion
        val = torch.where(da & dm, 0.0, torch.where(dm, 1.0, 3.0))
        assert not (da & ~dm).any(), "motion-only branch is never needed"
        return val.view(-1, 1, 1) * torch.ones_like(x)


@pytest.mark.parametrize("batch", [True, False])
def test_guidance_combination(batch: bool) -> None:
    x, t = torch.zeros(2, 1, 1), torch.zeros(2, dtype=torch.long)
    conds = (None, torch.zeros(2, 1, 1), None, None)
    # u = 0, a = 1, f = 3: out = s_a * (1 - 0) + s_m * (3 - 1)
    out = guided_model_fn(_Probe(), *conds, audio_scale=2.0, motion_scale=1.5,
                          batch_branches=batch)(x, t)
    torch.testing.assert_close(out, torch.full_like(x, 2.0 + 1.5 * 2))
    out = guided_model_fn(_Probe(), *conds, audio_scale=2.5, motion_scale=None,
                          batch_branches=batch)(x, t)
    torch.testing.assert_close(out, torch.full_like(x, 2.5 * 3))
    out = guided_model_fn(_Probe(), *conds, audio_scale=1.0, motion_scale=1.0)(x, t)
    torch.testing.assert_close(out, torch.full_like(x, 3.0))


def test_mouth_loss_weights_cover_the_cells_under_the_box() -> None:
    from microscope_pl.modules.diffusion_module import mouth_loss_weights

    boxes = torch.tensor([[40.0, 80.0, 90.0, 100.0], [-1.0, -1.0, -1.0, -1.0]])
    weights = mouth_loss_weights(boxes, 128, (8, 8), 10.0)  # 16 px cells
    assert weights.shape == (2, 1, 1, 8, 8)
    heavy = (weights[0, 0, 0] > 1).nonzero().tolist()
    assert heavy == [[r, c] for r in (5, 6) for c in (2, 3, 4, 5)]  # rows 80-112, columns 32-96 px
    assert float(weights[0].max()) == 11.0 and bool((weights[1] == 1).all())  # no box: the plain loss


def test_guidance_reuse_costs_1_5_forwards_per_step_and_adds_the_last_correction() -> None:
    class Shifted(_Probe):  # u = x, a = x + 1, f = x + 3
        def forward(self, x, *args):
            return x + super().forward(x, *args)

    conds = (None, torch.zeros(1, 1, 1), None, None)
    fn = guided_model_fn(Shifted(), *conds, audio_scale=4.0, motion_scale=1.0, guidance_every=4)
    t = torch.zeros(1, dtype=torch.long)
    x0 = torch.full((1, 1, 1), 2.0)
    first = fn(x0, t)  # all three branches: u + 4 (a - u) + (f - a) = x + 6
    torch.testing.assert_close(first, x0 + 6.0)
    x1 = torch.full((1, 1, 1), -5.0)
    torch.testing.assert_close(fn(x1, t), (x1 + 3.0) + (first - (x0 + 3.0)))  # f alone + the kept correction
    for _ in range(18):
        fn(x1, t)
    assert fn.calls == 20 and fn.forwards == 5 * 3 + 15  # 1.5 per step
    every_step = guided_model_fn(Shifted(), *conds, audio_scale=4.0, motion_scale=1.0, guidance_every=1)
    for _ in range(20):
        every_step(x1, t)
    assert every_step.forwards == 60
    with pytest.raises(ValueError, match="guidance_every must be >= 1"):
        guided_model_fn(Shifted(), *conds, guidance_every=0)


def test_ema_decay_warms_up_after_the_lr_warmup() -> None:
    from types import SimpleNamespace

    from microscope_pl.modules.diffusion_module import LatentDiffusionModule

    def decay(step: int) -> float:
        module = SimpleNamespace(global_step=step, optim=SimpleNamespace(warmup_steps=50),
                                 hparams=SimpleNamespace(ema_decay=0.995))
        return LatentDiffusionModule.ema_decay_now(module)  # type: ignore[arg-type]

    assert decay(10) == 0.0 and decay(50) == 0.0  # a copy during the warmup
    assert abs(decay(51) - 2 / 11) < 1e-12 and abs(decay(250) - 201 / 210) < 1e-12  # ~the last s/10 steps
    assert decay(10_000) == 0.995  # capped at the configured decay
