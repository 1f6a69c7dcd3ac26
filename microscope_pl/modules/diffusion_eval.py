"""Held-out metrics of generated clips for `microscope test` on a diffusion
checkpoint: PSNR/SSIM/LPIPS against ground truth, flow smoothness (FS) error,
and the lip-sync proxy for data sets with known mouth boxes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from microscope_pl.metrics.flow_smoothness import flow_smoothness
from microscope_pl.metrics.sync import sync_correlation

if TYPE_CHECKING:
    from microscope_pl.modules.diffusion_module import LatentDiffusionModule


def clip_metrics(module: LatentDiffusionModule, batch: dict[str, torch.Tensor],
                 generator: torch.Generator) -> dict[str, float]:
    """Generate each clip with audio and with the audio condition dropped
    (same seed) and compare both with the ground truth.

    `test/sync_corr*` correlate the audio loudness envelope with mouth-region
    motion (metrics.sync.sync_correlation) for generated, ground-truth and
    no-audio clips, and for the ground truth after the codec's round trip
    (`sync_corr_codec`: the most a denoiser over this latent can show);
    FS error is |FS(generated) - FS(ground truth)|.
    """
    state = generator.get_state()
    generated = module.generate_clip(batch, generator=generator)
    generator.set_state(state)
    silent = module.generate_clip(batch, generator=generator, drop_audio=True)
    truth = batch["frames"]
    round_trip = codec_round_trip(module, batch)
    b, n = truth.shape[:2]
    flat = module.image_metrics(generated.flatten(0, 1), truth.flatten(0, 1))
    out: dict[str, float] = {k: float(v.mean()) for k, v in flat.items()}
    fs_gen = [flow_smoothness(clip.cpu()) for clip in generated]
    fs_gt = [flow_smoothness(clip.cpu()) for clip in truth]
    out["codec_psnr"] = float(peak_signal_noise_ratio(round_trip.flatten(0, 1).float().clamp(0, 1),
                                                      truth.flatten(0, 1).float(), data_range=1.0, dim=(1, 2, 3)))
    out["fs_generated"] = sum(fs_gen) / b
    out["fs_ground_truth"] = sum(fs_gt) / b
    out["fs_error"] = sum(abs(g - t) for g, t in zip(fs_gen, fs_gt)) / b
    boxes = batch.get("mouth_box")
    if boxes is not None and bool((boxes >= 0).all()):
        for key, clips in (("sync_corr", generated), ("sync_corr_gt", truth), ("sync_corr_noaudio", silent),
                           ("sync_corr_codec", round_trip)):
            values = [sync_correlation(clip.cpu(), loud.cpu(), box.tolist())
                      for clip, loud, box in zip(clips, batch["loudness"], boxes)]
            out[key] = sum(values) / b
    return out


@torch.no_grad()
def codec_round_trip(module: LatentDiffusionModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Ground-truth clips `b n 3 H W` encoded to latents and decoded again by the frozen codec."""
    return module.decode_clips(batch["reference"], module.codec.encode(batch["reference"], batch["frames"]))
