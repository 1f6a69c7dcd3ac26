"""Trained models into plain networks for generation, without Lightning.

Two sources give the same `GenerationModel`:
- a diffusion checkpoint: its record (`checkpoint["microscope"]`, phases.py)
  names the settings of FDE, LMAE and the denoiser, its state dict holds their
  weights; the EMA copy (`ema.*`) is what generation samples from. PBNet is
  found beside it (`<run>/pbnet/`), or named explicitly.
- a generation bundle (`microscope export`, export.py): a folder with
  `model.safetensors` (the EMA pipeline and PBNet; its header metadata holds
  the settings as JSON) and a model card. Reading one parses that header and
  JSON only: nothing is unpickled, so no code can run.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from microscope_pl.checkpointing import CheckpointError
from microscope_pl.diffusion.pipeline import TalkingHeadPipeline
from microscope_pl.models.config import DenoiserConfig, SamplingConfig, ScheduleConfig, from_dict
from microscope_pl.models.mdcf import DynamicsCodec
from microscope_pl.phases import (build_network, checkpoint_record, find_checkpoint, load_weights,
                                  read_phase_checkpoint, sub_state_dict)

BUNDLE_FORMAT = "microscope-bundle/1"
WEIGHTS = "model.safetensors"


def read_with_record(path: str | os.PathLike, phase: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint of `phase` (refused in one line otherwise) and its microscope record."""
    ckpt = read_phase_checkpoint(path, phase)
    return ckpt, checkpoint_record(ckpt, path)


def build_pipeline(record: dict[str, Any]) -> TalkingHeadPipeline:
    """An untrained pipeline with the settings of a diffusion record (checkpoint or bundle)."""
    nets = record["networks"]
    lmae = build_network("lmae", nets["lmae"]) if "lmae" in nets else None
    codec = DynamicsCodec(build_network("fde", nets["fde"]), lmae, record["latent_source"])
    return TalkingHeadPipeline.build(
        codec, from_dict(DenoiserConfig, nets["denoiser"]), from_dict(ScheduleConfig, record["schedule"]),
        from_dict(SamplingConfig, record["sampling"]), int(record["image_size"]))


def frozen(net: nn.Module) -> nn.Module:
    """Eval mode, no gradients: generation only samples."""
    for param in net.parameters():
        param.requires_grad_(False)
    return net.eval()


# ---------------------------------------------------------------- bundles


def is_bundle(path: str | os.PathLike) -> bool:
    """A bundle folder (holding model.safetensors) or a `.safetensors` file."""
    p = Path(path)
    return p.suffix.lower() == ".safetensors" or (p.is_dir() and (p / WEIGHTS).is_file())


def _weights_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p / WEIGHTS if p.is_dir() else p


@dataclass
class Bundle:
    """A read bundle: its tensors and the settings recorded with them."""

    path: Path
    tensors: dict[str, Any]
    settings: dict[str, Any]  # the diffusion record: what load_pipeline returns for a checkpoint
    pbnet_settings: dict[str, Any] | None
    provenance: dict[str, Any]

    def _part(self, prefix: str) -> dict[str, Any]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def pipeline(self) -> Any:
        """The EMA generation pipeline (eval mode, CPU)."""
        return frozen(load_weights(build_pipeline(self.settings), self._part("pipeline."), self.path,
                                   "diffusion pipeline"))

    def pbnet(self) -> Any:
        """PBNet (eval mode, CPU); CheckpointError when the bundle was exported without one."""
        if self.pbnet_settings is None:
            raise CheckpointError(f"the bundle {self.path} holds no PBNet: use --pose still, a pose file or video, "
                                  "or pass --pbnet-ckpt-path")
        net = build_network("pbnet", self.pbnet_settings["networks"]["pbnet"])
        return frozen(load_weights(net, self._part("pbnet."), self.path, "PBNet"))


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Read a bundle (folder or `.safetensors` file); CheckpointError in one line when it is
    missing, not a safetensors file, or not a microscope bundle."""
    from safetensors import safe_open

    file = _weights_file(path)
    if not file.is_file():
        raise CheckpointError(f"bundle not found: {file}")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises SafetensorError / OSError for foreign or truncated files
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{file} is not a readable safetensors file ({first})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{file} is not a microscope generation bundle (format {meta.get('format')!r}, "
                              f"expected {BUNDLE_FORMAT!r})")
    try:
        settings = json.loads(meta["settings"])
        pbnet = json.loads(meta["pbnet"]) if meta.get("pbnet") else None
        provenance = json.loads(meta.get("provenance") or "{}")
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable bundle settings ({err})") from None
    return Bundle(file, tensors, settings, pbnet, provenance)


# ---------------------------------------------------------------- loading


def load_pipeline(path: str | os.PathLike) -> tuple[TalkingHeadPipeline, dict[str, Any]]:
    """The EMA generation pipeline (eval mode, CPU) and its record, from a diffusion
    checkpoint or a generation bundle."""
    if is_bundle(path):
        bundle = read_bundle(path)
        return bundle.pipeline(), bundle.settings
    ckpt, record = read_with_record(path, "diffusion")
    pipeline = build_pipeline(record)
    load_weights(pipeline, sub_state_dict(ckpt, "ema"), path, "diffusion pipeline")
    return frozen(pipeline), record


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
    ckpt, record = read_with_record(path, "pbnet")
    net = load_weights(build_network("pbnet", record["networks"]["pbnet"]), sub_state_dict(ckpt, "net"), path, "PBNet")
    return net.eval(), record


def resolve_model_path(explicit: str | os.PathLike | None) -> Path:
    """What `--checkpoint` names: a bundle (folder or .safetensors file) as it is, else a
    diffusion checkpoint file or folder (default checkpoints/synth/diffusion/)."""
    if explicit and is_bundle(explicit):
        return Path(explicit)
    return find_checkpoint("diffusion", str(explicit) if explicit else None)


@dataclass
class GenerationModel:
    """A loaded pipeline with its record, kept between generations (batch runs, the app).

    PBNet is loaded on first use and kept: the bundle's own, an explicit
    checkpoint, or the one beside a diffusion checkpoint.
    """

    path: Path
    pipeline: TalkingHeadPipeline
    record: dict[str, Any]
    bundle: Any = None  # bundle.Bundle when loaded from one
    _pbnets: dict[str, tuple[nn.Module, str]] = field(default_factory=dict, repr=False)

    def pbnet(self, explicit: str | None = None) -> tuple[nn.Module, str]:
        """(PBNet, where it came from): `explicit` > the bundle's > beside the checkpoint."""
        key = str(explicit or "")
        if key not in self._pbnets:
            if not explicit and self.bundle is not None:
                self._pbnets[key] = (self.bundle.pbnet(), f"the bundle {self.path}")
            else:
                path = find_pbnet(self.path, explicit)
                self._pbnets[key] = (load_pbnet(path)[0], str(path))
        return self._pbnets[key]


def load_model(path: str | os.PathLike) -> GenerationModel:
    """A `GenerationModel` from a diffusion checkpoint or a generation bundle."""
    if is_bundle(path):
        bundle = read_bundle(path)
        return GenerationModel(Path(path), bundle.pipeline(), bundle.settings, bundle)
    pipeline, record = load_pipeline(path)
    return GenerationModel(Path(path), pipeline, record)


def pbnet_of(model: GenerationModel | str | os.PathLike, explicit: str | None = None) -> tuple[nn.Module, str]:
    """(PBNet, where it came from) for a loaded model or a checkpoint/bundle path."""
    if isinstance(model, GenerationModel):
        return model.pbnet(explicit)
    if not explicit and is_bundle(model):
        return read_bundle(model).pbnet(), f"the bundle {model}"
    path = find_pbnet(model, explicit)
    return load_pbnet(path)[0], str(path)
