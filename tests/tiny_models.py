"""Tiny untrained generation checkpoints in the run-folder layout, speech, and a drawn clip
whose head pose is known: shared by the generation-controls, bundle and app tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

SR = 16000


def save_module(module: Any, path: Path) -> Path:
    """A checkpoint in the Lightning layout, written by hand (no Trainer)."""
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(ckpt)  # adds the phase tag and the record
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def tiny_run(root: Path, image_size: int = 64) -> dict[str, Path]:
    """`root/run/{phase1,phase2,diffusion,pbnet}/last.ckpt`: tiny random networks, PBNet beside
    the diffusion checkpoint where generation looks for it."""
    from microscope_pl.modules.diffusion_module import LatentDiffusionModule
    from microscope_pl.modules.fde_module import FDEModule
    from microscope_pl.modules.lmae_module import LMAEModule
    from microscope_pl.modules.pbnet_module import PBNetModule

    run = root / "run"
    torch.manual_seed(0)
    fde = FDEModule(image_size=image_size, network={"block_expansion": 8, "max_features": 16, "num_regions": 2,
                                                    "motion_block_expansion": 8, "motion_max_features": 16,
                                                    "motion_num_blocks": 2, "num_res_blocks": 1},
                    loss={"weights": "random"}, lpips="off")
    p1 = save_module(fde, run / "phase1" / "last.ckpt")
    lmae = LMAEModule(image_size=image_size, network={"base_channels": 8, "channel_mult": [1, 1, 1, 1],
                                                      "norm_groups": 4, "mid_attention": False},
                      loss={"weights": "random"}, lpips="off", fde_ckpt_path=str(p1))
    p2 = save_module(lmae, run / "phase2" / "last.ckpt")
    diffusion = LatentDiffusionModule(image_size=image_size, denoiser={"base_channels": 16, "channel_mult": [1, 2],
                                                                       "attn_levels": [1], "num_heads": 2,
                                                                       "cond_dim": 16, "image_cond_channels": 8},
                                      sampling={"steps": 2}, mdcf_ckpt_path=str(p2), lpips="off")
    wake_up(diffusion, "")  # the codec and the denoiser
    pbnet = PBNetModule(network={"audio_dim": 80, "d_model": 16, "num_heads": 2, "num_layers": 1, "latent_dim": 8})
    with torch.no_grad():  # an untrained PBNet's zero-initialised head would say "still" for every input
        for param in pbnet.parameters():
            param.normal_(0.0, 0.2)
    return {"phase1": p1, "phase2": p2, "diffusion": save_module(diffusion, run / "diffusion" / "last.ckpt"),
            "pbnet": save_module(pbnet, run / "pbnet" / "last.ckpt")}


def wake_up(module: Any, part: str, std: float = 0.2) -> None:
    """Give the zero-initialised weights of `part` (e.g. the denoiser's residual outputs) small random
    values, in the training and the EMA copy, so that every condition changes the frames."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if part in key and key.endswith(".weight") and value.is_floating_point() and not value.any():
                value.copy_(torch.randn(value.shape, generator=generator) * std)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced, syllable-like tone: loud enough, not silent."""
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.3 * envelope * np.sin(2 * np.pi * 170 * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_speech(path: Path, seconds: float, seed: int = 0) -> Path:
    from microscope_pl.data.audio import write_wav

    write_wav(path, speech(seconds, seed))
    return path


def known_pose_clip(path: Path, frames: int = 40, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Draw the synthetic set's astronaut (data/synth.py) turning and shifting on a known track,
    blinking once, into the mp4 `path` (25 fps, no audio).

    Returns the true pose `[frames, 6]` in the synthetic set's units (yaw, pitch, roll in
    degrees; face width and centre offset as fractions of the frame) and the lid closure `[frames]`.
    """
    from microscope_pl.data.synth import make_portrait, pose_homography, render_frame
    from microscope_pl.data.video_io import VideoWriter

    portrait = make_portrait("astronaut", 0, np.random.default_rng(seed), size)
    t = np.arange(frames) / 25.0
    yaw, pitch, roll = 10 * np.sin(2 * np.pi * t / 2.0), 6 * np.sin(2 * np.pi * t / 1.5 + 1), 8 * np.sin(np.pi * t)
    scale = 1 + 0.05 * np.sin(2 * np.pi * t / 2.2)
    shift = 0.04 * size * np.stack([np.sin(2 * np.pi * t / 1.9), np.cos(2 * np.pi * t / 2.1)], 1)
    closure = np.zeros(frames)
    closure[20:26] = [0.4, 0.9, 1.0, 1.0, 0.9, 0.4]
    ox, oy = portrait.origin
    to_frame = np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1.0]])
    pivot = (portrait.pivot[0] - ox, portrait.pivot[1] - oy)
    pose = np.zeros((frames, 6))
    with VideoWriter(path, 25, size) as writer:
        for i in range(frames):
            m = pose_homography(yaw[i], pitch[i], roll[i], scale[i], tuple(shift[i]), pivot, 3.0 * size) @ to_frame
            c = m @ np.array([*portrait.face_centre, 1.0])
            pose[i] = [yaw[i], pitch[i], roll[i], portrait.face_width * scale[i] / size,
                       c[0] / c[2] / size - 0.5, c[1] / c[2] / size - 0.5]
            writer.write(render_frame(portrait, m, size, 0.0, float(closure[i]))[None])
    return pose, closure
