"""The ablation runner (`python -m microscope_pl.ablations`): variant planning,
metric collection on tiny randomly initialised modules, the report layout,
and (slow) the whole `--smoke` run with real subprocess training."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from microscope_pl import ablations
from microscope_pl.ablations import BY_NAME, VARIANTS, EvalSettings, Evaluator

FDE_CONFIG = {"downsample": 4, "block_expansion": 8, "max_features": 16, "num_regions": 4,
              "motion_block_expansion": 8, "motion_max_features": 16, "motion_num_blocks": 3,
              "num_res_blocks": 1, "norm": "group"}
LOSS = {"loss": {"weights": "random", "scales": [1.0]}, "lpips": "off"}
RATIOS = {"fde_d4": 16, "fde_d8": 64, "vae_d32": 768, "mdcf_d16": 192, "mdcf_d32": 768, "mdcf_no_igc": 768,
          "mdcf_no_tpc": 768, "diffusion_mdcf": 768, "dawn_baseline": 16}


def upstream(phase: str, **networks: dict) -> dict:
    """An upstream record as a checkpoint keeps it: the frozen networks are built from it, untrained."""
    return {"phase": phase, "path": "untrained", "sha256": "", "image_size": 64, "networks": networks}


def tiny_modules() -> dict[str, torch.nn.Module]:
    """One randomly initialised 64x64 module per variant, as its checkpoint would rebuild it."""
    from microscope_pl.models.config import to_dict
    from microscope_pl.modules.diffusion_module import LatentDiffusionModule
    from microscope_pl.modules.fde_module import FDEModule
    from microscope_pl.modules.lmae_module import LMAEModule
    from microscope_pl.modules.pixel_vae_module import PixelVAEModule

    torch.manual_seed(0)
    fde = {k: v for k, v in FDE_CONFIG.items() if k != "downsample"}
    lmae = {"image_size": 64, **LOSS}
    tiny_lmae = {"base_channels": 8, "norm_groups": 4}
    phase1 = upstream("phase1", fde=FDE_CONFIG)
    d32 = LMAEModule(network={**tiny_lmae, "channel_mult": [1, 1, 2, 2]}, upstream=phase1, **lmae)
    unet = {"image_size": 64, "lpips": "off", "sampling": {"steps": 2, "decode_chunk": 4},
            "denoiser": {"base_channels": 16, "channel_mult": [1], "attn_levels": [0], "num_heads": 2,
                         "cond_dim": 16, "image_cond_channels": 8}}
    return {
        "fde_d4": FDEModule(image_size=64, network={"downsample": 4, **fde}, **LOSS),
        "fde_d8": FDEModule(image_size=64, network={"downsample": 8, **fde}, **LOSS),
        "vae_d32": PixelVAEModule(image_size=64, network={"base_channels": 8, "channel_mult": [1] * 6,
                                                          "norm_groups": 4}, **LOSS),
        "mdcf_d16": LMAEModule(network={**tiny_lmae, "num_down": 2, "channel_mult": [1, 1, 2]}, upstream=phase1,
                               **lmae),
        "mdcf_d32": d32,
        "mdcf_no_igc": LMAEModule(network={**tiny_lmae, "channel_mult": [1, 1, 2, 2]}, igc_weight=0.0,
                                  upstream=phase1, **lmae),
        "mdcf_no_tpc": LMAEModule(network={**tiny_lmae, "channel_mult": [1, 1, 2, 2]}, joint_fde=FDE_CONFIG, **lmae),
        "diffusion_mdcf": LatentDiffusionModule(
            latent="mdcf", upstream=upstream("phase2", fde=FDE_CONFIG, lmae=to_dict(d32.network)), **unet),
        "dawn_baseline": LatentDiffusionModule(latent="fde", upstream=phase1, **unet),
    }


def table_cells(markdown: str, label: str) -> list[str]:
    """The cells of the one table row whose first cell is `label`."""
    rows = [line for line in markdown.splitlines() if line.startswith(f"| {label} |")]
    assert len(rows) == 1, f"expected one row for {label!r}, found {len(rows)}"
    return [cell.strip() for cell in rows[0].strip().strip("|").split("|")]


def check_report(markdown: str, lpips_expected: bool) -> None:
    """One row per variant with finite numbers and shape-derived ratios, plus the Figure 4b table."""
    assert "## Reconstruction (Tables 2 and 5)" in markdown and "## Figure 4b" in markdown
    assert "HDTF at 256x256" in markdown
    for v in VARIANTS:
        cells = table_cells(markdown, v.label)
        if v.kind == "diffusion":
            ratio, metrics = cells[2], cells[3:8]  # FS gen, FS GT, FS error, PSNR, FID
        else:
            ratio, metrics = cells[3], [cells[4], cells[5], cells[7], cells[8]]  # PSNR, SSIM, FID, FS error
            assert cells[-5:] == [f"{x:.2f}" for x in ablations.PAPER[v.name][1:]]  # the paper's values beside
            if lpips_expected:
                metrics.append(cells[6])
            else:
                assert cells[6] == "—" and "LPIPS skipped:" in markdown
        assert float(ratio) == RATIOS[v.name], (v.name, ratio)
        assert all(math.isfinite(float(x)) for x in metrics), (v.name, cells)


def test_select_variants_adds_missing_upstreams(tmp_path: Path) -> None:
    names = [v.name for v in ablations.select_variants(["dawn_baseline", "mdcf_d16"], tmp_path)]
    assert names == ["fde_d4", "mdcf_d16", "dawn_baseline"]
    (tmp_path / "checkpoints/ablations/fde_d4").mkdir(parents=True)
    (tmp_path / "checkpoints/ablations/fde_d4/best.ckpt").write_bytes(b"")
    assert [v.name for v in ablations.select_variants(["mdcf_d16"], tmp_path)] == ["mdcf_d16"]
    with pytest.raises(ValueError, match="unknown variant"):
        ablations.select_variants(["fde_d2"], tmp_path)


def test_fit_command_has_budget_upstream_and_smoke_settings(tmp_path: Path) -> None:
    (tmp_path / "checkpoints/ablations/fde_d4").mkdir(parents=True)
    (tmp_path / "checkpoints/ablations/fde_d4/last.ckpt").write_bytes(b"")
    plan = ablations.Plan(workdir=tmp_path, data=tmp_path / "data", out=tmp_path / "r.md", variants=list(VARIANTS),
                          budget=7.5, diffusion_budget=10.0, smoke=True)
    cmd = ablations.fit_command(BY_NAME["mdcf_no_igc"], plan)
    assert cmd[1:4] == ["-m", "microscope_pl", "fit"] and cmd[cmd.index("--trainer.max_time") + 1] == "00:00:07:30"
    upstream = tmp_path / "checkpoints/ablations/fde_d4/last.ckpt"
    assert cmd[cmd.index("--model.init_args.fde_ckpt_path") + 1] == str(upstream)
    assert str(ablations.CONFIGS / "ablations/mdcf_no_igc.yaml") in cmd and "--trainer.max_steps" in cmd
    dawn = ablations.fit_command(BY_NAME["dawn_baseline"], plan)
    assert dawn[dawn.index("--trainer.max_time") + 1] == "00:00:10:00" and "--model.init_args.mdcf_ckpt_path" in dawn
    for v in VARIANTS:  # every override config the runner names exists
        assert (ablations.CONFIGS / "ablations" / f"{v.name}.yaml").is_file()


def test_smoke_model_args_name_init_arguments_of_the_new_layout() -> None:
    """Every `--model.init_args.a.b` of --smoke (and every upstream argument) names an init
    argument of the variant's module, then fields of its nested settings dataclasses."""
    import dataclasses
    import importlib
    import inspect
    import typing

    from microscope_pl.phases import PHASE_MODULES

    assert ablations._model_args(network={"extras": {"source_skip": "true"}}, lpips="off") == (
        "--model.init_args.network.extras.source_skip", "true", "--model.init_args.lpips", "off")
    for v in VARIANTS:
        module_path, name = PHASE_MODULES[v.phase].rsplit(".", 1)
        cls = getattr(importlib.import_module(module_path), name)
        args = ablations.SMOKE_MODEL[v.name]
        keys = list(args[::2]) + ([f"--model.init_args.{v.upstream_arg}"] if v.upstream else [])
        for key in keys:
            assert key.startswith("--model.init_args."), key
            path = key.removeprefix("--model.init_args.").split(".")
            hints = typing.get_type_hints(cls.__init__)
            assert path[0] in inspect.signature(cls.__init__).parameters, (v.name, key)
            hint = hints[path[0]]
            for field_name in path[1:]:
                config = next(t for t in typing.get_args(hint) or (hint,) if dataclasses.is_dataclass(t))
                hint = typing.get_type_hints(config)[field_name]  # KeyError: no such setting
    assert "--model.init_args.joint_fde.block_expansion" in ablations.SMOKE_MODEL["mdcf_no_tpc"]
    assert "--model.init_args.sampling.steps" in ablations.SMOKE_MODEL["dawn_baseline"]


def test_metrics_and_report_from_tiny_random_modules(synth_root: Path, tmp_path: Path) -> None:
    feature_net = lambda x: F.adaptive_avg_pool2d(x.float(), 4).flatten(1)  # noqa: E731 (stand-in Inception)
    lpips = lambda p, t: float((p - t).abs().mean())  # noqa: E731 (stand-in LPIPS)
    evaluator = Evaluator(synth_root, EvalSettings(frames=6, clips_per_video=1), feature_net, lpips)
    rows = {}
    for name, module in tiny_modules().items():
        v = BY_NAME[name]
        rows[name] = {"label": v.label, "budget_minutes": 1.0, "status": "ok", "steps": 0,
                      **ablations.evaluate_module(evaluator, v, module)}
    assert rows["fde_d4"]["latent_shape"] == [3, 16, 16] and rows["mdcf_d16"]["latent_shape"] == [4, 4, 4]
    assert rows["vae_d32"]["latent_shape"] == [4, 2, 2] and rows["dawn_baseline"]["latent_shape"] == [3, 16, 16]
    assert rows["fde_d4"]["fs_ground_truth"] == rows["mdcf_d32"]["fs_ground_truth"]  # same clips, cached
    meta = {"date": "today", "command": "python -m microscope_pl.ablations --smoke", "machine": "test",
            "budget_minutes": 1.0, "diffusion_budget_minutes": 1.0, "data": str(synth_root), "eval": "1 clip"}
    md, js = ablations.write_reports({"meta": meta, "rows": rows}, tmp_path / "reports/ablations.md")
    check_report(md.read_text(), lpips_expected=True)
    assert json.loads(js.read_text())["rows"]["mdcf_d32"]["compression_ratio"] == 768
    assert not list(md.parent.glob("*.tmp"))


@pytest.mark.slow
def test_smoke_run_trains_every_variant_and_writes_the_report(synth_root: Path, tmp_path: Path) -> None:
    code = ablations.main(["--smoke", "--workdir", str(tmp_path), "--data", str(synth_root)])
    assert code == 0
    markdown = (tmp_path / "reports/ablations.md").read_text()
    check_report(markdown, lpips_expected="LPIPS skipped:" not in markdown)
    report = json.loads((tmp_path / "reports/ablations.json").read_text())
    assert report["meta"]["smoke"] and "--smoke" in report["meta"]["command"]
    for v in VARIANTS:
        assert (tmp_path / "checkpoints/ablations" / v.name / "last.ckpt").is_file()
        assert report["rows"][v.name]["status"] == "ok" and report["rows"][v.name]["trained"] == "this run"
    again = tmp_path / "again.md"  # finished variants are evaluated, not retrained; their budget is remembered
    assert ablations.main(["--smoke", "--workdir", str(tmp_path), "--data", str(synth_root), "--skip-training",
                           "--only", "fde_d8", "--budget-minutes", "3", "--out", str(again)]) == 0
    rows = json.loads(again.with_suffix(".json").read_text())["rows"]
    assert list(rows) == ["fde_d8"] and rows["fde_d8"]["trained"] == "earlier run"
    assert rows["fde_d8"]["budget_minutes"] == 7.0 and table_cells(again.read_text(), "FDE (d/8)")[9] == "7"
