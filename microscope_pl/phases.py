"""The phase registry and orchestrator.

Order: phase1 (FDE) -> phase2 (LMAE, FDE frozen) -> diffusion (FDE + LMAE
frozen); pbnet trains beside them on pose/blink tracks. Each phase writes
`checkpoints/<run>/<phase>/{best,last}.ckpt` (the config's `run`, "synth" for
the default configs); a downstream phase finds its upstream as: explicit path >
`best.ckpt` > `last.ckpt` of the same run, checks it is of the right phase with
compatible settings, and freezes it with `load_frozen()`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from microscope_pl.checkpointing import CheckpointError, file_sha256, read_checkpoint
from microscope_pl.models.config import FDEConfig, LMAEConfig, PBNetConfig, PixelVAEConfig, from_dict

FORMAT = 2  # checkpoint["microscope"]["format"]; older checkpoints are refused with a one-line message
NETWORK_CONFIGS = {"fde": FDEConfig, "lmae": LMAEConfig, "vae": PixelVAEConfig, "pbnet": PBNetConfig}

@dataclass(frozen=True)
class Phase:
    name: str
    config: str
    upstream: str | None
    summary: str


PHASES: dict[str, Phase] = {
    "phase1": Phase("phase1", "configs/phase1_fde.yaml", None, "FDE: flow + occlusion at H/4 (eq. 5)"),
    "phase2": Phase("phase2", "configs/phase2_lmae.yaml", "phase1", "LMAE over [f; m], FDE frozen (eq. 6-9)"),
    "pbnet": Phase("pbnet", "configs/pbnet.yaml", None, "PBNet: pose and blink from audio"),
    "diffusion": Phase("diffusion", "configs/diffusion.yaml", "phase2", "3D U-Net latent diffusion (eq. 10)"),
}
ORDER = ["phase1", "phase2", "pbnet", "diffusion"]


DEFAULT_RUN = "synth"  # the run of the default configs and the demo
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def checkpoint_root() -> Path:
    """`checkpoints/` under the working directory."""
    return Path("checkpoints")


def check_run_name(run: str) -> str:
    """A run name is one folder name (letters, digits, `_.-`); ValueError otherwise."""
    if not RUN_NAME.fullmatch(str(run)):
        raise ValueError(f"run name {run!r} must be one folder name of letters, digits, '_', '.' or '-'")
    return str(run)


def checkpoint_dir(phase: str, run: str = DEFAULT_RUN) -> Path:
    """`checkpoints/<run>/<phase>/`: each configuration's run keeps its own checkpoints."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; known: {', '.join(ORDER)}")
    return checkpoint_root() / check_run_name(run) / phase


def find_checkpoint(phase: str, explicit: str | None = None, run: str = DEFAULT_RUN) -> Path:
    """Explicit file > explicit folder's best.ckpt > its last.ckpt; without one, the
    folder is checkpoints/<run>/<phase>/."""
    folder = checkpoint_dir(phase, run)
    if explicit:
        path = Path(explicit)
        if path.is_file():
            return path
        if not path.is_dir():
            raise CheckpointError(f"{phase} checkpoint not found: {path}")
        folder = path
    for name in ("best.ckpt", "last.ckpt"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(
        f"no {phase} checkpoint in {folder}/ (best.ckpt or last.ckpt): "
        f"train it first (`microscope fit` with that run's {phase} config) or pass its path explicitly"
    )


def phase_of_module(class_path: str) -> str | None:
    """The phase a LightningModule class path trains ("...FDEModule" -> "phase1"), or None."""
    name = str(class_path).rsplit(".", 1)[-1]
    return next((phase for phase, path in PHASE_MODULES.items()
                 if path.rsplit(".", 1)[-1] == name and phase in PHASES), None)


def upstream_argument(class_path: str, init_args: Any) -> tuple[str, str] | None:
    """(model argument, upstream phase) of a downstream module, e.g. ("fde_ckpt_path", "phase1")."""
    phase = phase_of_module(class_path)
    if phase == "phase2":
        return None if init_args.get("joint_fde") else ("fde_ckpt_path", "phase1")
    if phase == "diffusion":
        return "mdcf_ckpt_path", "phase2" if init_args.get("latent", "mdcf") == "mdcf" else "phase1"
    return None


def normalized_networks(networks: dict[str, Any]) -> dict[str, Any]:
    """Network settings with every default filled in, so a record written before a setting
    existed compares equal to one that holds its default."""
    from microscope_pl.models.config import DenoiserConfig, to_dict

    known = {**NETWORK_CONFIGS, "denoiser": DenoiserConfig}
    return {name: to_dict(from_dict(known[name], settings)) if name in known and isinstance(settings, dict)
            else settings for name, settings in (networks or {}).items()}


def first_difference(a: Any, b: Any, where: str) -> str | None:
    """The first setting in which two records differ, as "where.key: a != b", or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            found = first_difference(a.get(key), b.get(key), f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        a, b = list(a), list(b)
    return None if a == b else f"{where}: checkpoint {a!r}, config {b!r}"


def read_phase_checkpoint(path: str | os.PathLike, phase: str, map_location: str = "cpu") -> dict[str, Any]:
    """`read_checkpoint`, refusing a checkpoint of another phase in one line."""
    ckpt = read_checkpoint(path, map_location)
    found = ckpt.get("microscope_phase")
    if found != phase:
        raise CheckpointError(f"{path} is a {found or 'foreign'!s} checkpoint, expected a {phase} checkpoint")
    return ckpt


def load_upstream(phase: str, explicit: str | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Find and read the checkpoint of `phase`; refuse one of another phase.

    Returns the checkpoint dict and `{"path", "sha256"}` to record downstream.
    """
    path = find_checkpoint(phase, explicit)
    ckpt = read_phase_checkpoint(path, phase)
    return ckpt, {"path": str(path), "sha256": file_sha256(path)}


def checkpoint_record(ckpt: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The `microscope` record of a checkpoint; refuses one written by another format version."""
    record = ckpt.get("microscope")
    found = record.get("format") if isinstance(record, dict) else None
    if found != FORMAT:
        raise CheckpointError(f"{path} was written by another version of microscope-pl (checkpoint format "
                              f"{found or 1}, this version reads {FORMAT}); retrain it with this version")
    return record


def build_network(name: str, config: dict[str, Any]) -> nn.Module:
    """An untrained network `name` ("fde", "lmae", "vae", "pbnet") from its recorded settings."""
    if name not in NETWORK_CONFIGS:
        raise CheckpointError(f"unknown network {name!r} in a checkpoint record")
    return from_dict(NETWORK_CONFIGS[name], config).build()


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike, what: str) -> nn.Module:
    """`net.load_state_dict(state)`, a mismatch reported in one line naming the file."""
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"{path} does not fit this version's {what} ({detail}); "
                              "retrain it with this version") from None
    return net


@dataclass
class Upstream:
    """A frozen upstream phase: its networks by name and the record a downstream checkpoint keeps."""

    networks: dict[str, nn.Module]
    record: dict[str, Any]  # {"phase", "path", "sha256", "image_size", "networks": {name: settings}}


def freeze_upstream(phase: str, explicit: str | None = None, *, image_size: int | None = None,
                    record: dict[str, Any] | None = None) -> Upstream:
    """The one way to bring in an upstream phase: load, check, freeze and describe it.

    Without `record`: finds the checkpoint (explicit path > best > last), refuses
    another phase, another format or another image size, builds its networks
    from its record and loads their weights, frozen. With `record` (a
    downstream checkpoint being restored, whose own state dict carries these
    weights) the networks are built from the record and nothing is read.
    """
    if record is None:
        ckpt, info = load_upstream(phase, explicit)
        own = checkpoint_record(ckpt, info["path"])
        if image_size is not None:
            require_equal("image_size", image_size, own["image_size"])
        record = {"phase": phase, **info, "image_size": own["image_size"], "networks": own["networks"],
                  "data": own.get("data")}
        state = ckpt["state_dict"]
    else:
        state = None
    networks = {}
    for name, settings in record["networks"].items():
        net = build_network(name, settings)
        if state is not None:
            load_weights(net, sub_state_dict({"state_dict": state}, name), record["path"], f"{phase} {name}")
        networks[name] = load_frozen(net)
    return Upstream(networks, record)


def sub_state_dict(ckpt: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """The weights of submodule `prefix` (e.g. "fde") from a Lightning checkpoint."""
    head = prefix + "."
    state = {k[len(head):]: v for k, v in ckpt["state_dict"].items() if k.startswith(head)}
    if not state:
        raise CheckpointError(f"checkpoint has no weights for {prefix!r}")
    return state


def require_equal(name: str, ours: Any, upstream: Any) -> None:
    """Raise ValueError naming both values when settings disagree."""
    if ours != upstream:
        raise ValueError(f"incompatible {name}: this phase has {ours!r}, the upstream checkpoint has {upstream!r}")


def _train_disabled(self: nn.Module, mode: bool = True) -> nn.Module:
    return self  # frozen upstream networks stay in eval mode, whatever fit() asks


def load_frozen(module: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Load weights (when given), set eval, disable train() and gradients."""
    if state_dict is not None:
        module.load_state_dict(state_dict)
    module.eval()
    for sub in module.modules():
        sub.train = types.MethodType(_train_disabled, sub)
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


# ---------------------------------------------------------------- orchestrator


def overlay_config(phase: str, overlays: str | os.PathLike | None) -> Path | None:
    """The overlay of `phase` in the folder `overlays` (same file name as its base config), if any."""
    if overlays is None:
        return None
    folder = Path(overlays)
    if not folder.is_dir():
        raise ValueError(f"overlay folder {folder} does not exist")
    path = folder / Path(PHASES[phase].config).name
    return path if path.is_file() else None


def configured_run(configs: Iterable[Path]) -> str:
    """The `run:` of the last config file that names one (DEFAULT_RUN when none does)."""
    import yaml

    run = DEFAULT_RUN
    for path in configs:
        if not Path(path).is_file():  # `fit` itself reports a missing config
            continue
        data = yaml.safe_load(Path(path).read_text()) or {}
        if isinstance(data, dict) and data.get("run"):
            run = str(data["run"])
    return check_run_name(run)


def run_phases(until: str, extra_args: Iterable[str] = (), force: bool = False, only: str | None = None,
               run: str | None = None, overlays: str | os.PathLike | None = None) -> int:
    """Train the phases in order up to `until`, skipping finished ones.

    Each phase is `microscope fit --config <base config> [--config <overlays>/<same name>]`;
    its run is `run`, else the configs' `run:`. A phase counts as finished when
    `checkpoints/<run>/<phase>/last.ckpt` exists (`force=True` retrains, resuming
    from it). Each phase runs in its own process so one failure stops the chain.
    """
    if until not in PHASES:
        raise ValueError(f"unknown phase {until!r}; known: {', '.join(ORDER)}")
    if only is not None and only not in PHASES:
        raise ValueError(f"unknown phase {only!r}; known: {', '.join(ORDER)}")
    names = ORDER[: ORDER.index(until) + 1] if only is None else [only]
    extra = list(extra_args)
    for name in names:
        phase = PHASES[name]
        configs = [Path(phase.config)] + [p for p in [overlay_config(name, overlays)] if p is not None]
        name_of_run = check_run_name(run) if run else configured_run(configs)
        last = checkpoint_dir(name, name_of_run) / "last.ckpt"
        if last.is_file() and not force:
            print(f"[{name}] {last} exists: skipped (use --force to train further)")
            continue
        cmd = [sys.executable, "-m", "microscope_pl", "fit"]
        for config in configs:
            cmd += ["--config", str(config)]
        cmd += (["--run", name_of_run] if run else []) + extra
        print(f"[{name}] {phase.summary}: {' '.join(cmd[2:])}", flush=True)
        code = subprocess.call(cmd)
        if code != 0:
            print(f"error: phase {name} failed (exit {code}); later phases not run", file=sys.stderr)
            return code
    return 0


# ---------------------------------------------------------------- loading

PHASE_MODULES = {
    "phase1": "microscope_pl.modules.fde_module.FDEModule",
    "phase2": "microscope_pl.modules.lmae_module.LMAEModule",
    "pbnet": "microscope_pl.modules.pbnet_module.PBNetModule",
    "diffusion": "microscope_pl.modules.diffusion_module.LatentDiffusionModule",
    "vae": "microscope_pl.modules.pixel_vae_module.PixelVAEModule",
}


def load_module(path: str | os.PathLike, phase: str, map_location: str = "cpu") -> nn.Module:
    """Rebuild a trained LightningModule of `phase` from its own checkpoint
    (weights_only load; upstream weights travel inside it), in eval mode."""
    import importlib

    ckpt = read_phase_checkpoint(path, phase, map_location)
    checkpoint_record(ckpt, path)
    module_path, cls_name = PHASE_MODULES[phase].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_path), cls_name)
    hparams = {k: v for k, v in ckpt.get("hyper_parameters", {}).items() if not k.startswith("_")}
    model = cls(**hparams)
    return load_weights(model, ckpt["state_dict"], path, f"{phase} network").eval()
