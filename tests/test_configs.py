"""Every composed config the README and `make ablations` run, checked through the parser alone.

Each composition is `microscope fit --config ... --print_config`: LightningCLI merges the
YAML files and prints the effective values without building a network or a trainer.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonargparse import dict_to_namespace

from helpers import REPO
from microscope_pl import ablations
from microscope_pl.cli import apply_run, main
from microscope_pl.phases import ORDER, PHASE_MODULES, PHASES

CONFIGS = REPO / "configs"
ON, OFF = "on", "off"

# One row per documented composition (configs/<name>.yaml, in order): frame size of model
# and data, curriculum switch epoch (None: no curriculum), the not-in-the-paper `extras`
# (None: the network has none), checkpoints/<run>/<phase>, and a few settings that matter.
COMPOSITIONS = [
    ("phase1_fde", ["phase1_fde"], 128, None, ON, "synth/phase1",
     {"model.optimizer.lr": 0.002, "model.optimizer.betas": [0.9, 0.999], "model.loss.weights": "random",
      "model.network.extras.registration_init": False}),
    ("phase2_lmae", ["phase2_lmae"], 128, None, ON, "synth/phase2",
     {"model.network.num_down": 2, "model.network.grid_mode": "offset", "model.optimizer.scheduler": "constant"}),
    ("pbnet", ["pbnet"], 128, None, None, "synth/pbnet",
     {"model.optimizer.lr": 0.001, "model.optimizer.warmup_steps": 50, "model.network.audio_dim": 80}),
    ("diffusion", ["diffusion"], 128, 3, ON, "synth/diffusion",
     {"model.optimizer.lr": 5e-4, "model.sampling.audio_scale": 4.0, "model.ema_decay": 0.995}),
    ("phase1_fde 256", ["phase1_fde", "hdtf/phase1_fde_256"], 256, None, OFF, "hdtf256/phase1",
     {"model.network.max_features": 512, "model.loss.weights": "imagenet", "model.optimizer.scheduler": "cosine"}),
    ("phase1_fde 512", ["phase1_fde", "hdtf/phase1_fde_512"], 512, None, OFF, "hdtf512/phase1",
     {"model.network.max_features": 512, "model.loss.weights": "imagenet", "model.optimizer.scheduler": "cosine"}),
    ("phase2_lmae 256", ["phase2_lmae", "hdtf/phase2_lmae_256"], 256, None, OFF, "hdtf256/phase2",
     {"model.network.num_down": 3, "model.network.grid_mode": "absolute", "model.loss.weights": "imagenet"}),
    ("pbnet hubert", ["pbnet", "hdtf/pbnet"], 256, None, None, "hdtf256/pbnet",
     {"model.network.audio_dim": 1024, "model.audio_features": "hubert:facebook/hubert-large-ls960-ft"}),
    ("diffusion 256", ["diffusion", "hdtf/diffusion_256"], 256, 50, OFF, "hdtf256/diffusion",
     {"model.denoiser.audio_dim": 1024, "model.optimizer.lr": 1e-4, "data.curriculum.max_frames": 40}),
    ("phase1_fde real", ["phase1_fde", "real/phase1_fde"], 128, None, ON, "real128/phase1",
     {"data.data_root": "data/real128", "data.holdout_seconds": 2.0, "data.synthesize_if_missing": False,
      "model.network.extras.registration_init": True, "trainer.check_val_every_n_epoch": 1}),
    ("phase2_lmae real", ["phase2_lmae", "real/phase2_lmae"], 128, None, ON, "real128/phase2",
     {"data.data_root": "data/real128", "data.holdout_seconds": 2.0, "model.fde_ckpt_path": "checkpoints/real128/phase1"}),
    ("pbnet real", ["pbnet", "real/pbnet"], 128, None, None, "real128/pbnet",
     {"data.data_root": "data/real128", "data.holdout_seconds": 2.0, "model.network.audio_dim": 80}),
    ("diffusion real", ["diffusion", "real/diffusion"], 128, 3, ON, "real128/diffusion",
     {"data.data_root": "data/real128", "data.test_split": "videos", "model.mdcf_ckpt_path": "checkpoints/real128/phase2"}),
    ("diffusion 256 ddp", ["diffusion", "hdtf/diffusion_256", "trainer/ddp"], 256, 50, OFF, "hdtf256/diffusion",
     {"model.denoiser.audio_dim": 1024}),
]
# configs/trainer/<name>.yaml: accelerator, devices, strategy, precision (None: no trainer config).
TRAINERS = {
    None: ("auto", "auto", "auto", None),
    "cpu": ("cpu", 1, "auto", "32-true"),
    "gpu": ("gpu", 1, "auto", "bf16-mixed"),
    "ddp": ("gpu", -1, "ddp", "bf16-mixed"),
    "ddp_cpu": ("cpu", 2, "ddp", "32-true"),
}
# configs/ablations/<variant>.yaml over its base, as ablations.fit_command composes it.
ABLATIONS = {
    "fde_d4": (128, None, ON, {"model.network.downsample": 4}),
    "fde_d8": (128, None, ON, {"model.network.downsample": 8}),
    "vae_d32": (128, None, None, {"model.network.num_down": 5, "model.optimizer.lr": 0.001}),
    "mdcf_d16": (128, None, ON, {"model.network.num_down": 2}),
    "mdcf_d32": (128, None, ON, {"model.network.num_down": 3}),
    "mdcf_no_igc": (128, None, ON, {"model.network.num_down": 3, "model.igc_weight": 0.0}),
    "mdcf_no_tpc": (128, None, ON, {"model.mse_weight": 0.0, "model.joint_fde.block_expansion": 32}),
    "diffusion_mdcf": (128, 10, ON, {"model.latent": "mdcf"}),
    "dawn_baseline": (128, 10, ON, {"model.latent": "fde"}),
}
# extras field: (off: the paper's, on: what the CPU configs use)
EXTRAS = {
    "source_skip": (False, True), "flow_refinement": (False, True), "global_alignment": (False, True),
    "registration_init": (False, True), "upsample": ("nearest", "bilinear"), "affine_head": (False, True),
    "audio_context": (0, 2),
}
CHECKPOINT_IO = "microscope_pl.modules.checkpoint_io.AtomicCheckpointIO"


def compose(argv: list[str]) -> dict[str, Any]:
    """The effective config of `microscope fit ARGV`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["fit", *argv, "--print_config"])
    assert done.value.code in (0, None), out.getvalue()
    return yaml.safe_load(out.getvalue())


def config_args(names: list[str]) -> list[str]:
    return [arg for name in names for arg in ("--config", str(CONFIGS / f"{name}.yaml"))]


def setting(config: dict[str, Any], key: str) -> Any:
    """`model.a.b` -> config["model"]["init_args"]["a"]["b"] (likewise data.*); trainer.* as is."""
    section, *path = key.split(".")
    node = config[section]["init_args"] if section in ("model", "data") else config[section]
    for part in path:
        node = node[part]
    return node


def extras_of(node: Any, path: str = "") -> dict[str, Any]:
    """Every field of every `extras` mapping under `node`, by dotted path."""
    found = {}
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "extras" and isinstance(value, dict):
                found.update({f"{path}{key}.{field}": v for field, v in value.items()})
            else:
                found.update(extras_of(value, f"{path}{key}."))
    return found


def check(config: dict[str, Any], size: int, switch: int | None, extras: str | None, folder: str,
          also: dict[str, Any]) -> None:
    model, data, trainer = config["model"]["init_args"], config["data"]["init_args"], config["trainer"]
    assert data["image_size"] == size
    assert model.get("image_size", size) == size  # PBNet has no frames

    classes = [c["class_path"] for c in trainer["callbacks"]]
    assert not [c for c in classes if "Curriculum" in c], "the curriculum is a data setting, not a callback"
    curriculum = data["curriculum"]
    assert (curriculum["switch_epoch"] if curriculum else None) == switch
    if curriculum:
        assert trainer["reload_dataloaders_every_n_epochs"] == 1

    found = extras_of(model)
    if extras is None:
        assert not found
    else:
        assert found, "a network with extras"
        for key, value in found.items():
            if not key.endswith(".registration_init"):  # on in configs/real only: checked by the rows
                assert value == EXTRAS[key.rsplit(".", 1)[1]][extras == ON], (key, value)

    run = dict_to_namespace(config)
    apply_run(run)  # what `microscope fit` does before building the trainer
    checkpoints = [c.init_args for c in run.trainer.callbacks if c.class_path.endswith(".ModelCheckpoint")]
    assert [c.dirpath for c in checkpoints] == [f"checkpoints/{folder}"] * 2
    best, last = checkpoints
    assert (best["filename"], best["monitor"], best["save_top_k"]) == ("best", "val/loss", 1)
    assert last["save_last"] is True and last["save_top_k"] == 0
    assert [p["class_path"] for p in trainer["plugins"]] == [CHECKPOINT_IO]
    applied = run.as_dict()  # upstream folders are filled in by apply_run
    for key, value in also.items():
        assert setting(applied, key) == value, key


def _cases() -> list[Any]:
    """COMPOSITIONS, each phase config also with every configs/trainer/ file."""
    cases = []
    for name, names, *expected in COMPOSITIONS:
        for trainer in TRAINERS if len(names) == 1 else [None]:
            configs = names if trainer is None else [*names, f"trainer/{trainer}"]
            cases.append(pytest.param(configs, tuple(expected), id=name if trainer is None else f"{name}+{trainer}"))
    return cases


@pytest.mark.parametrize("names, expected", _cases())
def test_composed_config(names: list[str], expected: tuple) -> None:
    config = compose(config_args(names))
    check(config, *expected)
    trainer = next((n.split("/")[1] for n in reversed(names) if n.startswith("trainer/")), None)
    accelerator, devices, strategy, precision = TRAINERS[trainer]
    t = config["trainer"]
    assert (t["accelerator"], t["devices"], t["strategy"], t["precision"]) == (accelerator, devices, strategy,
                                                                               precision)


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_ablation_config(variant: str, tmp_path: Path) -> None:
    v = ablations.BY_NAME[variant]
    plan = ablations.Plan(workdir=tmp_path, data=tmp_path / "data", out=tmp_path / "ablations.md",
                          variants=[v], budget=4.0, diffusion_budget=6.0)
    upstream = None
    if v.upstream:
        upstream = plan.folder(v.upstream) / "best.ckpt"
        upstream.parent.mkdir(parents=True)
        upstream.write_bytes(b"")  # only its path is parsed
    command = ablations.fit_command(v, plan)
    assert command[1:4] == ["-m", "microscope_pl", "fit"]
    config = compose(command[4:])
    size, switch, extras, also = ABLATIONS[variant]
    check(config, size, switch, extras, f"ablations/{variant}", also)
    assert config["model"]["class_path"] == PHASE_MODULES[v.phase]
    assert config["data"]["init_args"]["data_root"] == str(plan.data)
    if upstream:
        assert setting(config, f"model.{v.upstream_arg}") == str(upstream)


def test_every_config_file_is_composed_here() -> None:
    used = {f"{n}.yaml" for _, names, *_ in COMPOSITIONS for n in names}
    used |= {f"trainer/{t}.yaml" for t in TRAINERS if t}
    used |= {f"ablations/{v}.yaml" for v in ABLATIONS} | {v.base for v in ablations.VARIANTS}
    present = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")}
    assert present == used
    assert set(ABLATIONS) == set(ablations.BY_NAME)


@pytest.mark.parametrize("variant", sorted(ABLATIONS))
def test_ablation_config_over_the_real_overlays(variant: str, tmp_path: Path) -> None:
    """`make ablations ARGS="--data data/real128 --overlays configs/real"` composes every variant."""
    v = ablations.BY_NAME[variant]
    plan = ablations.Plan(workdir=tmp_path, data=tmp_path / "data", out=tmp_path / "ablations.md",
                          variants=[v], budget=4.0, diffusion_budget=6.0, overlays=CONFIGS / "real")
    if v.upstream:
        (plan.folder(v.upstream) / "best.ckpt").parent.mkdir(parents=True)
        (plan.folder(v.upstream) / "best.ckpt").write_bytes(b"")
    command = ablations.fit_command(v, plan)
    assert str(CONFIGS / "real" / v.base) in command
    config = compose(command[4:])
    size, switch, extras, also = ABLATIONS[variant]
    assert config["model"]["class_path"] == PHASE_MODULES[v.phase]
    assert setting(config, "data.holdout_seconds") == 2.0 and setting(config, "data.data_root") == str(plan.data)
    for key, value in also.items():
        assert setting(config, key) == value, key


@pytest.mark.parametrize("phase", ORDER)
def test_demo_phase_overrides_compose(phase: str) -> None:
    """`make demo`'s options over each phase config: its budget and seed, validation every epoch,
    a cosine learning rate over the budget, phase 2's dynamics MSE weight, and for diffusion the
    latent cache (read in the main process), the mouth weight, the learning rate and the audio
    guidance its checkpoint samples with."""
    from microscope_pl import demo

    cache = Path("data/synth/latents_mdcf.pt") if phase == "diffusion" else None
    extra = demo.phase_overrides(phase, 8.0, str(CONFIGS / "trainer" / "cpu.yaml"), cache, seed=3)
    config = compose(["--config", str(REPO / PHASES[phase].config), *extra])
    assert config["trainer"]["max_time"] == "00:00:08:00" and config["seed_everything"] == 3
    assert config["trainer"]["check_val_every_n_epoch"] == 1
    assert setting(config, "model.optimizer.scheduler") == "cosine"  # decays over the budget
    if phase == "phase2":
        assert setting(config, "model.mse_weight") == demo.DEMO_MSE_WEIGHT
    if phase == "diffusion":
        assert setting(config, "data.latent_cache") == str(cache) and setting(config, "data.num_workers") == 0
        assert setting(config, "model.mouth_weight") == demo.DEMO_MOUTH_WEIGHT
        assert setting(config, "model.sampling.audio_scale") == demo.DEMO_AUDIO_SCALE
        assert setting(config, "model.optimizer.lr") == demo.DEMO_DIFFUSION_LR
