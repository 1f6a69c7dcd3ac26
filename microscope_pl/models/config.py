"""Network settings as typed data: one dataclass per network of models/.

A config holds the constructor settings of one network and builds it with
`build()`. Defaults are the paper's (section 4.1, DESIGN.md). Settings the
paper does not have, which the CPU-scale configs turn on so that minutes of
training learn something, live in one nested `extras` field per network: a
paper-faithful config leaves `extras` empty.

Checkpoints store configs as plain dicts (`to_dict`); `from_dict` rebuilds
them and refuses keys this version does not know, naming them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from torch import nn

C = TypeVar("C")


def to_dict(config: Any) -> Any:
    """A config (or a structure holding configs) as plain dicts/lists, safe for weights-only checkpoints."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    return config


def from_dict(cls: type[C], value: C | dict[str, Any] | None) -> C:
    """`cls` from a dict (nested dataclass fields included), an instance, or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{cls.__name__} must be given as a mapping, got {type(value).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting(s) {', '.join(unknown)} "
                         f"(known: {', '.join(fields)}); was it written by another version?")
    kwargs = {}
    for name, item in value.items():
        sub = _dataclass_type(fields[name])
        kwargs[name] = from_dict(sub, item) if sub is not None else item
    return cls(**kwargs)


def constructor_kwargs(config: Any) -> dict[str, Any]:
    """A network config as its constructor's keyword arguments: `extras` flattened in."""
    kwargs = to_dict(config)
    return {**{k: v for k, v in kwargs.items() if k != "extras"}, **kwargs.get("extras", {})}


def _dataclass_type(f: dataclasses.Field) -> type | None:
    """The dataclass type of a field (its default factory), or None for plain values."""
    factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


# ------------------------------------------------------------------ phase 1


@dataclass
class FDEExtras:
    """FDE additions that are not in eq. 5 / MRAA (all off in the paper).

    Args:
        source_skip: blend the warped source image into the output frame.
        flow_refinement: a dense residual flow from the driving image on top of the region mixture.
        global_alignment: the background affine starts from a Lucas-Kanade registration.
        registration_init: with global_alignment, start training as that registration
            (background weight ~0.98, visible pixels copied), so learning begins at its PSNR.
    """

    source_skip: bool = False
    flow_refinement: bool = False
    global_alignment: bool = False
    registration_init: bool = False


@dataclass
class FDEConfig:
    """The flow-aware dynamics extractor (models/fde.py, eq. 5).

    Args:
        downsample: flow resolution factor d (4 in the paper; 8 for the FDE d/8 ablation).
        block_expansion: generator width of the first block.
        max_features: generator width cap.
        num_regions: affine motion regions of the region predictor.
        motion_block_expansion: motion-network hourglass width.
        motion_max_features: motion-network width cap.
        motion_num_blocks: motion-network hourglass depth.
        num_res_blocks: residual blocks at the generator bottleneck.
        norm: "group" (DDP-safe, batch-size independent) or "batch" (the baseline's).
        extras: additions that are not in the paper (FDEExtras).
    """

    downsample: int = 4
    block_expansion: int = 64
    max_features: int = 256
    num_regions: int = 10
    motion_block_expansion: int = 32
    motion_max_features: int = 1024
    motion_num_blocks: int = 5
    num_res_blocks: int = 6
    norm: str = "group"
    extras: FDEExtras = field(default_factory=FDEExtras)

    def build(self) -> nn.Module:
        from microscope_pl.models.fde import FDE

        return FDE(**constructor_kwargs(self))


# ------------------------------------------------------------------ phase 2


@dataclass
class LMAEExtras:
    """LMAE additions that are not in the paper (off by default).

    Args:
        upsample: decoder upsampling, "nearest" (LDM's) or "bilinear".
        affine_head: the decoder adds a global affine displacement (needs grid_mode "offset").
    """

    upsample: str = "nearest"
    affine_head: bool = False


@dataclass
class LMAEConfig:
    """The latent motion auto-encoder over [f; m] (models/lmae.py, eq. 4 and 6-9).

    Args:
        latent_channels: channels of z (4 in the paper).
        num_down: 2x downsamplings (3: H/32 and 768x at 256 px; 2: H/16 and 192x).
        base_channels: width of the first level.
        channel_mult: width multipliers per level (num_down + 1 entries; null: 1, 2, 4, 4).
        num_res_blocks: residual blocks per level.
        norm_groups: GroupNorm groups.
        mid_attention: self-attention at the lowest resolution.
        grid_mode: decoded grid as "absolute" (tanh of the grid) or "offset" (identity + offsets).
        flow_scale: the encoder sees the displacement f - id times this.
        extras: additions that are not in the paper (LMAEExtras).
    """

    latent_channels: int = 4
    num_down: int = 3
    base_channels: int = 64
    channel_mult: Optional[list[int]] = None
    num_res_blocks: int = 1
    norm_groups: int = 32
    mid_attention: bool = True
    grid_mode: str = "absolute"
    flow_scale: float = 10.0
    extras: LMAEExtras = field(default_factory=LMAEExtras)

    def build(self) -> nn.Module:
        from microscope_pl.models.lmae import LMAE

        return LMAE(**constructor_kwargs(self))


@dataclass
class PixelVAEConfig:
    """The single-stage pixel VAE of the "VAE d/32" ablation (Table 5).

    Args:
        latent_channels: channels of z (4, as MDCF).
        num_down: 2x downsamplings on pixels (5: H/32, as MDCF's latent).
        base_channels: width of the first level.
        channel_mult: width multipliers per level (num_down + 1 entries; null: 1, 2, 4, 4, ...).
        num_res_blocks: residual blocks per level.
        norm_groups: GroupNorm groups.
    """

    latent_channels: int = 4
    num_down: int = 5
    base_channels: int = 32
    channel_mult: Optional[list[int]] = None
    num_res_blocks: int = 1
    norm_groups: int = 8

    def build(self) -> nn.Module:
        from microscope_pl.models.pixel_vae import PixelVAE

        return PixelVAE(**constructor_kwargs(self))


# ------------------------------------------------------------------ phase 3


@dataclass
class DenoiserExtras:
    """Denoiser additions that are not in the paper (off by default).

    Args:
        audio_context: audio frames on each side that a frame's audio token reads.
    """

    audio_context: int = 0


@dataclass
class DenoiserConfig:
    """The 3D U-Net denoiser (models/unet3d.py, eq. 10) and its image condition.

    Args:
        audio_dim: per-frame audio feature width (80 log-mel, 1024 HuBERT).
        base_channels: width of the first level.
        channel_mult: width multipliers per level.
        num_res_blocks: residual blocks per level.
        attn_levels: levels with spatial self-attention.
        num_heads: attention heads.
        temporal_window: local temporal attention half-width (frames); null = global.
        cond_mode: "cross_attn" (per-frame tokens) or "film".
        cond_dim: width of the condition tokens.
        image_cond_channels: channels of E(x_src) at the latent resolution.
        dropout: dropout in residual blocks.
        extras: additions that are not in the paper (DenoiserExtras).
    """

    audio_dim: int = 80
    base_channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    num_res_blocks: int = 1
    attn_levels: list[int] = field(default_factory=lambda: [1])
    num_heads: int = 4
    temporal_window: Optional[int] = None
    cond_mode: str = "cross_attn"
    cond_dim: int = 128
    image_cond_channels: int = 64
    dropout: float = 0.0
    extras: DenoiserExtras = field(default_factory=DenoiserExtras)

    def build(self, latent_channels: int) -> nn.Module:
        from microscope_pl.models.unet3d import UNet3D

        return UNet3D(in_channels=latent_channels, **constructor_kwargs(self))


@dataclass
class ScheduleConfig:
    """The noise schedule (diffusion/schedule.py).

    Args:
        num_train_steps: diffusion steps T (1000).
        schedule: "cosine" or "linear" betas.
        prediction: "eps" or "v".
    """

    num_train_steps: int = 1000
    schedule: str = "cosine"
    prediction: str = "eps"

    def build(self) -> Any:
        from microscope_pl.diffusion.schedule import DiffusionSchedule

        return DiffusionSchedule(self.num_train_steps, self.schedule, self.prediction)


@dataclass
class SamplingConfig:
    """How clips are sampled and decoded (validation, test and `microscope generate` defaults).

    Args:
        sampler: "ddim" or "dpm" (DPM-Solver++ 2M).
        steps: sampling steps (DPM-Solver++ 2M at 12 matches DDIM at 20 in sync and PSNR).
        audio_scale: classifier-free guidance scale of the audio condition.
        motion_scale: guidance scale of the pose/blink condition.
        guidance_every: evaluate the guidance branches every k-th step and reuse their
            correction between (samplers.guided_model_fn): 3 forwards per step become 1 + 2/k.
        decode_chunk: frames decoded at once by LMAE + FDE.
    """

    sampler: str = "dpm"
    steps: int = 12
    audio_scale: float = 1.0
    motion_scale: float = 1.0
    guidance_every: int = 4
    decode_chunk: int = 16


# ------------------------------------------------------------------ PBNet


@dataclass
class PBNetConfig:
    """The pose/blink CVAE (models/pbnet.py).

    Args:
        audio_dim: per-frame audio feature width (80 log-mel, 1024 HuBERT).
        d_model: transformer width.
        num_heads: attention heads.
        num_layers: encoder and decoder layers.
        latent_dim: width of the sequence-level latent.
        dropout: transformer dropout.
    """

    audio_dim: int = 80
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    latent_dim: int = 64
    dropout: float = 0.1

    def build(self) -> nn.Module:
        from microscope_pl.models.pbnet import PBNet

        return PBNet(motion_dim=8, **constructor_kwargs(self))
