"""SyncNet layout, MFCC recipe, LSE offset search with stand-ins, and the synthetic sync proxy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from microscope_pl.metrics.common import MetricUnavailable
from microscope_pl.metrics.sync import (
    LSE,
    SyncNet,
    load_syncnet,
    mfcc,
    sync_correlation,
    sync_offset_search,
    syncnet_embeddings,
)

SR, HOP = 16000, 640


def _z(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


class StandInSync:
    """Deterministic SyncNet stand-in: both branches embed the per-frame level of a window.

    Video: mean brightness of each of the 5 frames. Audio: the log-energy MFCC
    (c0) averaged over each frame's 4 steps. Z-scoring each 5-vector removes
    the affine map between brightness and log energy.
    """

    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:  # b 3 5 s s -> b 5
        return _z(x.mean(dim=(1, 3, 4)))

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:  # b 1 13 20 -> b 5
        return _z(x[:, 0, 0].reshape(-1, 5, 4).mean(-1))


def _av_clip(n: int, shift: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frames whose brightness follows a random level; audio whose loudness follows it ``shift`` frames later."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(0, 1, n + 40)
    frames = np.empty((n, 3, 8, 8), np.float32)
    frames[:] = (0.1 + 0.8 * level[20 : 20 + n])[:, None, None, None]
    amp = 10 ** (-2 * (1 - level[20 - shift : 20 - shift + n]))  # audio level at t = video level at t - shift
    wave = rng.standard_normal(n * HOP).astype(np.float32) * np.repeat(amp, HOP).astype(np.float32) * 0.5
    return frames, np.clip(wave, -1, 1)


def test_syncnet_layout_and_shapes() -> None:
    net = SyncNet().eval()
    state = net.state_dict()
    # Names and shapes of the public syncnet_v2.model, so it loads unchanged.
    assert state["netcnnaud.18.weight"].shape == (512, 256, 5, 4)
    assert state["netcnnlip.0.weight"].shape == (96, 3, 5, 7, 7)
    assert state["netcnnlip.18.weight"].shape == (512, 256, 1, 6, 6)
    assert state["netfclip.3.weight"].shape == (1024, 512)
    assert "netcnnlip.19.running_var" in state and "netfcaud.1.running_mean" in state
    with torch.no_grad():
        assert net.forward_aud(torch.randn(2, 1, 13, 20)).shape == (2, 1024)
        assert net.forward_lip(torch.rand(1, 3, 5, 224, 224) * 255).shape == (1, 1024)


def test_mfcc_shape_and_reference() -> None:
    wave = np.random.default_rng(0).standard_normal(6400).astype(np.float32) * 0.1
    c = mfcc(wave)
    assert c.shape == (13, 1 + int(np.ceil((6400 - 400) / 160)))
    psf = pytest.importorskip("python_speech_features")
    np.testing.assert_allclose(c, psf.mfcc(wave.astype(np.float64) * 32768, SR).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shift", [-3, 0, 4])
def test_offset_search_finds_known_shift_from_embeddings(shift: int) -> None:
    g = torch.Generator().manual_seed(1)
    m, vshift = 40, 15
    seq = torch.randn(m + 2 * vshift, 8, generator=g)
    audio = seq[vshift : vshift + m]
    video = seq[vshift + shift : vshift + shift + m]  # video window i matches audio window i + shift
    r = sync_offset_search(video, audio, vshift)
    assert r.offset == -shift
    assert r.lse_d == pytest.approx(float(r.mean_dists.min()))
    assert r.lse_c > 0 and r.mean_dists.shape == (2 * vshift + 1,)


@pytest.mark.parametrize("shift", [-2, 3])
def test_lse_with_stand_in_network_finds_shift(shift: int) -> None:
    frames, wave = _av_clip(60, shift)
    v, a = syncnet_embeddings(frames, wave, StandInSync(), image_size=8)
    assert v.shape == a.shape == (55, 5)  # min(n, len/640) - 5 windows
    scorer = LSE(net=StandInSync(), vshift=8, image_size=8)
    r = scorer(frames, wave)
    assert r.offset == -shift  # audio lags (shift > 0) -> negative offset
    aligned = scorer(*_av_clip(60, 0))
    assert aligned.offset == 0 and aligned.lse_c > 0.5


def test_syncnet_weights_missing_and_mismatched(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("MICROSCOPE_SYNCNET", raising=False)
    with pytest.raises(MetricUnavailable, match="syncnet_v2.model"):
        LSE()
    bad = tmp_path / "syncnet_v2.model"
    torch.save({"netcnnaud.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(MetricUnavailable, match="does not match"):
        load_syncnet(bad)


def test_load_syncnet_from_file(tmp_path) -> None:
    torch.manual_seed(0)
    ref = SyncNet()
    path = tmp_path / "syncnet_v2.model"
    torch.save(ref.state_dict(), path)
    net = load_syncnet(path)
    assert not net.training
    assert torch.equal(net.netcnnlip[0].weight, ref.netcnnlip[0].weight)


def _mouth_clip(loud: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A face-grey 32x32 clip whose mouth box darkens in proportion to loudness, plus noise."""
    n = loud.size
    frames = np.full((n, 32, 32, 3), 0.7, np.float32)
    open_px = np.rint(loud * 8).astype(int)  # mouth opening height in rows
    for t in range(n):
        frames[t, 20 : 20 + open_px[t], 10:22] = 0.1
    frames += rng.normal(0, 0.01, frames.shape).astype(np.float32)
    return (np.clip(frames, 0, 1) * 255).astype(np.uint8)


def test_sync_correlation_high_when_synced_zero_when_shuffled() -> None:
    rng = np.random.default_rng(0)
    smooth = np.convolve(rng.uniform(0, 1, 220), np.ones(5) / 5, mode="valid")[:200]
    loud = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    clip = _mouth_clip(loud, rng)
    box = (8, 18, 24, 30)
    assert sync_correlation(clip, loud, box, mode="rest") > 0.9
    assert sync_correlation(clip, loud, box) > 0.8  # default "diff"
    shuffled = rng.permutation(loud)
    assert abs(sync_correlation(clip, shuffled, box, mode="rest")) < 0.2
    assert abs(sync_correlation(clip, shuffled, box)) < 0.2
    # Channels-first float input, and lag search, on the same clip.
    chw = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 255
    assert sync_correlation(chw, loud, box) == pytest.approx(sync_correlation(clip, loud, box), abs=1e-3)
    late = np.concatenate([loud[2:], loud[-2:]])  # loudness two frames early
    for mode in ("rest", "diff"):
        assert sync_correlation(clip, late, box, mode, max_lag=2) > sync_correlation(clip, late, box, mode) + 0.1
    with pytest.raises(ValueError, match="empty"):
        sync_correlation(clip, loud, (40, 40, 50, 50))
    with pytest.raises(ValueError, match="loudness"):
        sync_correlation(clip, loud[:-1], box)
