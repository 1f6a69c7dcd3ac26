"""The evaluation core (metrics.clips, metrics.image): per-frame PSNR by hand,
image_quality as modules log it, FS figures, and clip_metrics' keys and values."""
from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from microscope_pl.metrics.clips import clip_fs, clip_metrics, frame_psnr, fs_figures, fs_summary, image_quality
from microscope_pl.metrics.flow_smoothness import flow_smoothness
from microscope_pl.metrics.image import frame_ssim, psnr
from microscope_pl.metrics.sync import sync_correlation

B, N, S = 2, 6, 32
BOXES = torch.tensor([[8, 16, 24, 28], [6, 14, 26, 30]])


@pytest.fixture
def clips() -> dict[str, torch.Tensor]:
    """Ground truth with a moving square, a noisy generated copy, a 'silent' and a round-trip variant."""
    g = torch.Generator().manual_seed(0)
    truth = torch.full((B, N, 3, S, S), 0.2)
    for i in range(B):
        for t in range(N):
            x = 4 + 2 * t + i
            truth[i, t, :, 10:20, x:x + 8] = 0.8
    noise = lambda scale: scale * torch.randn(truth.shape, generator=g)  # noqa: E731
    return {
        "truth": truth,
        "generated": (truth + noise(0.05)).clamp(0, 1),
        "silent": (truth + noise(0.1)).clamp(0, 1),
        "round_trip": truth + noise(0.02),  # may leave [0, 1]: clip_metrics clamps it
        "loudness": torch.rand(B, N, generator=g),
    }


# ---------------------------------------------------------------- per-frame PSNR / image quality


def test_frame_psnr_by_hand() -> None:
    target = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    offsets = torch.tensor([0.1, 0.01, 0.3]).view(3, 1, 1, 1)
    values = frame_psnr(target + offsets, target)
    assert values.shape == (3,)
    # MSE = offset^2 with data range 1: PSNR = -20 log10(offset)
    assert values.tolist() == pytest.approx([20.0, 40.0, -20 * math.log10(0.3)], rel=1e-4)


def test_frame_psnr_identical_frames_are_inf_and_capped_by_callers() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.isinf(frame_psnr(x, x)).all()
    assert psnr(x, x, cap=100.0) == 100.0  # what `microscope eval` and the ablations report
    assert math.isinf(psnr(x, x))


def test_frame_psnr_refuses_mismatches_and_uint8() -> None:
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="shape"):
        frame_psnr(x, x[:1])
    with pytest.raises(ValueError, match="b 3 h w"):
        frame_psnr(x[None], x[None])
    with pytest.raises(ValueError, match="255"):
        frame_psnr((x * 255).to(torch.uint8), (x * 255).to(torch.uint8))


def test_image_quality_matches_the_modules_formula() -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.rand(4, 3, 16, 16, generator=g)
    pred = target + 0.2 * torch.randn(4, 3, 16, 16, generator=g)  # leaves [0, 1]: clamped first
    out = image_quality(pred, target)
    assert set(out) == {"psnr", "ssim"} and out["psnr"].shape == (4,) and out["ssim"].ndim == 0
    clamped = pred.clamp(0, 1)
    # what PhaseModule.image_metrics logged: batch-mean PSNR over dim=(1, 2, 3), SSIM at data range 1
    assert float(out["psnr"].mean()) == pytest.approx(
        float(peak_signal_noise_ratio(clamped, target, data_range=1.0, dim=(1, 2, 3))), rel=1e-6)
    assert float(out["ssim"]) == pytest.approx(
        float(structural_similarity_index_measure(clamped, target, data_range=1.0)), rel=1e-6)
    assert torch.allclose(frame_ssim(clamped, target).mean(), out["ssim"])
    with_lpips = image_quality(pred.double(), target, lpips=lambda p, t: (p - t).abs().mean(dim=(1, 2, 3)))
    assert with_lpips["lpips"].ndim == 0 and with_lpips["psnr"].dtype == torch.float32
    assert float(image_quality(pred, target, lpips=lambda p, t: 0.25)["lpips"]) == 0.25  # float LPIPS callables


# ---------------------------------------------------------------- flow smoothness


def test_fs_error_zero_for_identical_clips(clips: dict[str, torch.Tensor]) -> None:
    fs = fs_figures(clips["truth"], clips["truth"].clone())
    assert set(fs) == {"fs_generated", "fs_ground_truth", "fs_error"}
    assert fs["fs_error"] == 0.0 and fs["fs_generated"] == fs["fs_ground_truth"] > 0


def test_fs_figures_are_means_over_clips(clips: dict[str, torch.Tensor]) -> None:
    gen, truth = clips["generated"], clips["truth"]
    fg = [flow_smoothness(c) for c in gen]
    ft = [flow_smoothness(c) for c in truth]
    fs = fs_figures(gen, truth)
    assert fs["fs_generated"] == pytest.approx(sum(fg) / B)
    assert fs["fs_ground_truth"] == pytest.approx(sum(ft) / B)
    assert fs["fs_error"] == pytest.approx(sum(abs(a - b) for a, b in zip(fg, ft)) / B)
    assert clip_fs(gen) == fg and clip_fs(list(gen)) == fg
    uint8 = fs_figures((truth * 255 + 0.5).to(torch.uint8), (truth * 255 + 0.5).to(torch.uint8))
    assert uint8["fs_error"] == 0.0  # `microscope eval` passes decoded uint8 videos


def test_fs_summary_needs_one_truth_per_clip() -> None:
    with pytest.raises(ValueError, match="2 generated and 1 ground-truth"):
        fs_summary([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="no clips"):
        fs_summary([], [])
    with pytest.raises(ValueError, match="shape"):
        fs_figures(torch.rand(2, 3, 3, 8, 8), torch.rand(1, 3, 3, 8, 8))


# ---------------------------------------------------------------- clip_metrics


def test_clip_metrics_keys_follow_the_inputs(clips: dict[str, torch.Tensor]) -> None:
    gen, truth = clips["generated"], clips["truth"]
    base = {"psnr", "ssim", "fs_generated", "fs_ground_truth", "fs_error"}
    assert set(clip_metrics(gen, truth)) == base
    full = clip_metrics(gen, truth, silent=clips["silent"], round_trip=clips["round_trip"],
                        loudness=clips["loudness"], mouth_boxes=BOXES, lpips=lambda p, t: (p - t).abs().mean())
    assert set(full) == base | {"lpips", "codec_psnr", "sync_corr", "sync_corr_gt", "sync_corr_noaudio",
                                "sync_corr_codec"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in full.values())
    unknown = BOXES.clone()
    unknown[1] = -1  # a data set without known mouth boxes stores -1
    partial = clip_metrics(gen, truth, silent=clips["silent"], round_trip=clips["round_trip"],
                           loudness=clips["loudness"], mouth_boxes=unknown)
    assert set(partial) == base | {"codec_psnr"}
    assert set(clip_metrics(gen, truth, loudness=clips["loudness"], mouth_boxes=BOXES)) == base | {
        "sync_corr", "sync_corr_gt"}
    with pytest.raises(ValueError, match="loudness"):
        clip_metrics(gen, truth, mouth_boxes=BOXES)
    with pytest.raises(ValueError, match="shape"):
        clip_metrics(gen, truth[:, :4])


def test_clip_metrics_values_match_the_per_metric_functions(clips: dict[str, torch.Tensor]) -> None:
    gen, truth, rt, loud = clips["generated"], clips["truth"], clips["round_trip"], clips["loudness"]
    out = clip_metrics(gen, truth, silent=clips["silent"], round_trip=rt, loudness=loud, mouth_boxes=BOXES)
    frames = lambda x: x.flatten(0, 1)  # noqa: E731
    assert out["psnr"] == pytest.approx(float(peak_signal_noise_ratio(
        frames(gen).clamp(0, 1), frames(truth), data_range=1.0, dim=(1, 2, 3))), rel=1e-6)
    assert out["ssim"] == pytest.approx(float(structural_similarity_index_measure(
        frames(gen), frames(truth), data_range=1.0)), rel=1e-6)
    assert out["codec_psnr"] == pytest.approx(float(peak_signal_noise_ratio(
        frames(rt).clamp(0, 1), frames(truth), data_range=1.0, dim=(1, 2, 3))), rel=1e-6)
    assert {k: out[k] for k in ("fs_generated", "fs_ground_truth", "fs_error")} == fs_figures(gen, truth)
    for key, x in (("sync_corr", gen), ("sync_corr_gt", truth), ("sync_corr_noaudio", clips["silent"]),
                   ("sync_corr_codec", rt)):
        expected = sum(sync_correlation(c, lo, box.tolist()) for c, lo, box in zip(x, loud, BOXES)) / B
        assert out[key] == pytest.approx(expected), key
    assert out["psnr"] < out["codec_psnr"]  # the round trip is the closer one here
    same = clip_metrics(truth, truth)
    assert math.isinf(same["psnr"]) and same["fs_error"] == 0.0  # uncapped, as `microscope test` logged it


def test_lpips_metric_moves_and_freezes_like_a_module_and_feeds_image_quality() -> None:
    from microscope_pl.metrics.image import LPIPSMetric

    with pytest.warns(UserWarning, match="NOT LPIPS"):
        net = LPIPSMetric(pretrained_backbone=False)
    assert net.to("cpu").eval() is net and net.device == torch.device("cpu")
    for param in net.parameters():  # what PhaseModule._lpips_net does
        param.requires_grad_(False)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = image_quality(x, x.flip(-1), lpips=net)
    assert out["lpips"].ndim == 0 and float(out["lpips"]) == pytest.approx(net(x, x.flip(-1)))
