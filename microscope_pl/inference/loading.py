"""Trained checkpoints into plain networks for generation, without Lightning.

A diffusion checkpoint carries everything sampling needs: its record
(`checkpoint["microscope"]`, phases.py) names the settings of FDE, LMAE and
the denoiser, and its state dict holds their weights; the EMA copy
(`ema.*`) is what generation samples from. PBNet is found beside it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from microscope_pl.checkpointing import CheckpointError
from microscope_pl.diffusion.pipeline import TalkingHeadPipeline
from microscope_pl.models.config import DenoiserConfig, SamplingConfig, ScheduleConfig, from_dict
from microscope_pl.models.mdcf import DynamicsCodec
from microscope_pl.phases import (build_network, checkpoint_record, find_checkpoint, load_weights,
                                  read_phase_checkpoint, sub_state_dict)


def _read(path: str | os.PathLike, phase: str) -> tuple[dict[str, Any], dict[str, Any]]:
    ckpt = read_phase_checkpoint(path, phase)
    return ckpt, checkpoint_record(ckpt, path)


def load_pipeline(path: str | os.PathLike) -> tuple[TalkingHeadPipeline, dict[str, Any]]:
    """The EMA generation pipeline of a diffusion checkpoint (eval mode, CPU) and its record."""
    ckpt, record = _read(path, "diffusion")
    nets = record["networks"]
    lmae = build_network("lmae", nets["lmae"]) if "lmae" in nets else None
    codec = DynamicsCodec(build_network("fde", nets["fde"]), lmae, record["latent_source"])
    pipeline = TalkingHeadPipeline.build(
        codec, from_dict(DenoiserConfig, nets["denoiser"]), from_dict(ScheduleConfig, record["schedule"]),
        from_dict(SamplingConfig, record["sampling"]), int(record["image_size"]))
    load_weights(pipeline, sub_state_dict(ckpt, "ema"), path, "diffusion pipeline")
    for param in pipeline.parameters():
        param.requires_grad_(False)
    return pipeline.eval(), record


def find_pbnet(diffusion_checkpoint: str | os.PathLike, explicit: str | None = None) -> Path:
    """PBNet: `explicit`, else `pbnet/{best,last}.ckpt` in the run folder of the
    diffusion checkpoint (`<run>/diffusion/last.ckpt` -> `<run>/pbnet/`)."""
    if explicit:
        return find_checkpoint("pbnet", explicit)
    folder = Path(diffusion_checkpoint).resolve().parent.parent / "pbnet"
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no pbnet checkpoint beside {diffusion_checkpoint} ({folder}/best.ckpt or last.ckpt): "
                          "train it (`make pbnet`), pass --pbnet-ckpt-path, or use --pose still")


def load_pbnet(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """PBNet of a pbnet checkpoint (eval mode, CPU) and its record."""
    ckpt, record = _read(path, "pbnet")
    net = load_weights(build_network("pbnet", record["networks"]["pbnet"]), sub_state_dict(ckpt, "net"), path, "PBNet")
    return net.eval(), record
