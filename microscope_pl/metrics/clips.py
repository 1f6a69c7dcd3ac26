"""Metrics of batches of clips, as pure functions over tensors: the one
evaluation core behind `microscope test` on a diffusion checkpoint, the
ablation runner and `microscope eval`.

Clips are ``b n 3 h w`` float tensors in [0, 1]. Nothing here calls a model:
callers generate the clips (with audio, without it, through the codec) and
pass them in, so the same numbers come out of every entry point.

- :func:`frame_psnr` / :func:`image_quality` (re-exported from
  ``metrics.image``): per-frame PSNR and the PSNR/SSIM/LPIPS group.
- :func:`fs_figures`: flow smoothness (Appendix A.3, eq. 11-13) of generated
  and ground-truth clips and the FS error ``|FS(gen) - FS(gt)|``.
- :func:`clip_metrics`: everything above plus the codec round trip's PSNR and
  the lip-sync proxy, as floats.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from microscope_pl.metrics.flow_smoothness import flow_smoothness
from microscope_pl.metrics.image import LPIPSFn, frame_psnr, frame_ssim, image_quality
from microscope_pl.metrics.sync import sync_correlation

__all__ = ["clip_fs", "clip_metrics", "frame_psnr", "frame_ssim", "fs_figures", "fs_summary", "image_quality"]


def _check_clips(name: str, clips: Tensor, like: Tensor | None = None) -> None:
    if clips.ndim != 5 or clips.shape[2] != 3:
        raise ValueError(f"{name} must be clips b n 3 h w, got {tuple(clips.shape)}")
    if like is not None and clips.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(clips.shape)} != ground truth shape {tuple(like.shape)}")


# ---------------------------------------------------------------- flow smoothness (eq. 11-13)


def clip_fs(clips: Tensor | Sequence[Tensor]) -> list[float]:
    """:func:`flow_smoothness` of each clip (``b n 3 h w``, or a sequence of ``n 3 h w``), on the CPU."""
    return [flow_smoothness(clip.detach().cpu()) for clip in clips]


def fs_summary(fs_generated: Sequence[float], fs_ground_truth: Sequence[float]) -> dict[str, float]:
    """Means over clips of FS(generated), FS(ground truth) and the FS error ``|FS(gen) - FS(gt)|``.

    Args:
        fs_generated: per-clip FS of the generated clips.
        fs_ground_truth: per-clip FS of their ground truth, in the same order.

    Returns:
        ``{"fs_generated", "fs_ground_truth", "fs_error"}``.
    """
    if len(fs_generated) != len(fs_ground_truth):
        raise ValueError(f"need one ground-truth FS per generated clip, got {len(fs_generated)} generated and "
                         f"{len(fs_ground_truth)} ground-truth values")
    if not fs_generated:
        raise ValueError("no clips to summarise")
    b = len(fs_generated)
    return {
        "fs_generated": sum(fs_generated) / b,
        "fs_ground_truth": sum(fs_ground_truth) / b,
        "fs_error": sum(abs(g - t) for g, t in zip(fs_generated, fs_ground_truth)) / b,
    }


def fs_figures(generated_clips: Tensor, truth_clips: Tensor) -> dict[str, float]:
    """FS of each clip pair, summarised by :func:`fs_summary`.

    Args:
        generated_clips: ``b n 3 h w`` (n >= 2), float in [0, 1] or uint8.
        truth_clips: ``b n 3 h w``, the matching ground truth.
    """
    _check_clips("generated_clips", generated_clips)
    _check_clips("truth_clips", truth_clips, like=generated_clips)
    return fs_summary(clip_fs(generated_clips), clip_fs(truth_clips))


# ---------------------------------------------------------------- everything `microscope test` reports


def clip_metrics(
    generated: Tensor,
    truth: Tensor,
    *,
    silent: Tensor | None = None,
    round_trip: Tensor | None = None,
    loudness: Tensor | None = None,
    mouth_boxes: Tensor | None = None,
    lpips: LPIPSFn | None = None,
) -> dict[str, float]:
    """Held-out metrics of generated clips against their ground truth.

    Args:
        generated: ``b n 3 h w`` clips generated with audio.
        truth: ``b n 3 h w`` ground truth in [0, 1].
        silent: ``b n 3 h w`` clips generated with the same seed and the audio
            condition dropped (for ``sync_corr_noaudio``).
        round_trip: ``b n 3 h w`` ground truth encoded and decoded by the codec
            (``codec_psnr`` and ``sync_corr_codec``: the most a denoiser over
            that latent can show).
        loudness: ``b n`` loudness envelope per frame (needed with mouth boxes).
        mouth_boxes: ``b 4`` mouth boxes ``(x0, y0, x1, y1)`` in pixels; the
            sync proxy is computed only when every entry is >= 0 (data sets
            without known boxes store -1).
        lpips: ``(pred, target) -> mean LPIPS``; None leaves ``lpips`` out.

    Returns:
        ``psnr`` (mean over frames, uncapped), ``ssim``, ``lpips`` (with
        ``lpips``), ``codec_psnr`` (with ``round_trip``), ``fs_generated``,
        ``fs_ground_truth``, ``fs_error`` (:func:`fs_figures`), and, with valid
        mouth boxes, the means over clips of ``sync_corr`` (generated),
        ``sync_corr_gt``, ``sync_corr_noaudio`` (with ``silent``) and
        ``sync_corr_codec`` (with ``round_trip``), each the
        :func:`sync_correlation` of loudness and mouth motion.
    """
    _check_clips("generated", generated)
    _check_clips("truth", truth, like=generated)
    for name, clips in (("silent", silent), ("round_trip", round_trip)):
        if clips is not None:
            _check_clips(name, clips, like=truth)
    quality = image_quality(generated.flatten(0, 1), truth.flatten(0, 1), lpips)
    out = {key: float(value.mean()) for key, value in quality.items()}
    if round_trip is not None:
        out["codec_psnr"] = float(frame_psnr(round_trip.flatten(0, 1).float().clamp(0, 1),
                                             truth.flatten(0, 1).float()).mean())
    out.update(fs_figures(generated, truth))
    if mouth_boxes is not None and bool((torch.as_tensor(mouth_boxes) >= 0).all()):
        if loudness is None:
            raise ValueError("mouth_boxes are given but loudness is None: the sync proxy needs both")
        b = truth.shape[0]
        if len(loudness) != b or len(mouth_boxes) != b:
            raise ValueError(f"{b} clips but {len(loudness)} loudness envelopes and {len(mouth_boxes)} mouth boxes")
        for key, clips in (("sync_corr", generated), ("sync_corr_gt", truth), ("sync_corr_noaudio", silent),
                           ("sync_corr_codec", round_trip)):
            if clips is None:
                continue
            values = [sync_correlation(clip.detach().cpu(), loud.cpu(), box.tolist())
                      for clip, loud, box in zip(clips, loudness, mouth_boxes)]
            out[key] = sum(values) / b
    return out
