"""Flow Smoothness (paper eq. 13) on analytic flows, and on Farneback flow of tiny clips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from microscope_pl.metrics.flow_smoothness import (
    farneback_flow,
    flow_smoothness,
    fs_error,
    fs_of_flow,
    fs_per_field,
)

H, W = 12, 17


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return x, y


def test_constant_flow_is_zero() -> None:
    flow = torch.ones(3, 2, H, W) * torch.tensor([2.5, -1.0])[None, :, None, None]
    assert fs_of_flow(flow) == pytest.approx(0.0, abs=1e-12)


def test_linear_flow_equals_frobenius_norm_of_its_matrix() -> None:
    x, y = _grid()
    a, b, c, d = 0.3, -0.2, 0.05, 0.7
    flow = torch.stack([a * x + b * y + 1.0, c * x + d * y - 2.0])[None]
    assert fs_of_flow(flow) == pytest.approx(math.sqrt(a * a + b * b + c * c + d * d), rel=1e-10)


def test_quadratic_flow_equals_analytic_rms() -> None:
    x, y = _grid()
    a, b, c = 0.01, -0.02, 0.005
    # u = a x^2 + c x y, v = b y^2: du/dx = 2 a x + c y, du/dy = c x, dv/dy = 2 b y.
    flow = torch.stack([a * x**2 + c * x * y, b * y**2])[None]
    frob2 = (2 * a * x + c * y) ** 2 + (c * x) ** 2 + (2 * b * y) ** 2
    assert fs_of_flow(flow) == pytest.approx(math.sqrt(float(frob2.mean())), rel=1e-10)


def test_per_field_and_mean() -> None:
    x, _ = _grid()
    flow = torch.stack([torch.stack([k * x, 0 * x]) for k in (0.0, 0.1, 0.3)])
    np.testing.assert_allclose(fs_per_field(flow).numpy(), [0.0, 0.1, 0.3], atol=1e-12)
    assert fs_of_flow(flow.numpy()) == pytest.approx(0.4 / 3)
    with pytest.raises(ValueError, match="n 2 h w"):
        fs_per_field(torch.zeros(2, 3, H, W))


def _blob_clip(n: int, jitter: float, seed: int = 0) -> np.ndarray:
    """A smooth blob drifting right; ``jitter`` adds per-frame pixel noise (spiky flow)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    frames = []
    for t in range(n):
        img = np.exp(-((x - 12 - 0.5 * t) ** 2 + (y - 16) ** 2) / 40.0)
        img = img + jitter * rng.standard_normal(img.shape)
        frames.append(np.repeat(np.clip(img, 0, 1)[..., None], 3, axis=2))
    return (np.stack(frames) * 255).astype(np.uint8)  # n h w 3


def test_farneback_static_clip_and_error() -> None:
    static = np.repeat(_blob_clip(1, 0.0), 4, axis=0)
    flow = farneback_flow(static)
    assert flow.shape == (3, 2, 32, 32)
    assert flow_smoothness(static) < 1e-3  # Farneback on identical frames: round-off only
    moving = _blob_clip(5, 0.0)
    assert fs_error(moving, moving) == 0.0
    jittery = _blob_clip(5, 0.08)
    assert flow_smoothness(jittery) > flow_smoothness(moving)
    # Channels-first float input reads the same as channels-last uint8.
    as_float = torch.from_numpy(moving).permute(0, 3, 1, 2).float() / 255
    assert flow_smoothness(as_float) == pytest.approx(flow_smoothness(moving), rel=1e-6)
