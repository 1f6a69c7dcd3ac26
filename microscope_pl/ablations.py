"""`python -m microscope_pl.ablations` (`make ablations`): the paper's Tables 2
and 5 and Figure 4b at small scale on the embedded synthetic data set (or any
prepared one, `--data`, in its own `--workdir`).

Trains the seven compression variants (FDE d/4 and d/8, pixel VAE d/32, MDCF
d/16 and d/32, MDCF w/o IGC, MDCF w/o TPC) with one wall-clock budget each
(`--trainer.max_time`), then the Figure 4b pair (diffusion over MDCF d/32 vs
the DAWN-style baseline over FDE's H/4 dynamics) with one budget each, in
dependency order, each as a `python -m microscope_pl fit` process
(`configs/<base>.yaml` + `configs/ablations/<variant>.yaml`, checkpoints in
`checkpoints/ablations/<variant>/`; a variant whose `last.ckpt` exists is not
retrained). Every checkpoint is then scored in this process on clips of the
held-out identities, and `reports/ablations.{md,json}` are written atomically.
Defaults (4 minutes per variant, 6 per diffusion model) ran in 45 minutes on
2 CPU cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import lightning
import torch
from torch import Tensor

from microscope_pl.checkpointing import read_checkpoint
from microscope_pl.data.datasets import ClipDataset
from microscope_pl.metrics.clips import clip_fs, fs_summary
from microscope_pl.metrics.common import MetricUnavailable
from microscope_pl.metrics.frechet import GaussianStats, InceptionFeatures, frechet_distance
from microscope_pl.metrics.image import LPIPSMetric, frame_psnr, frame_ssim
from microscope_pl.models.lmae import LMAE
from microscope_pl.models.mdcf import DynamicsCodec
from microscope_pl.phases import load_module

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
Row = dict[str, Any]
RUN_FILE = "ablation_run.json"  # beside a variant's checkpoints: its budget, time and command


@dataclass(frozen=True)
class Variant:
    """One ablation run: `configs/<base>` + `configs/ablations/<name>.yaml`."""

    name: str
    label: str
    base: str
    phase: str  # checkpoint tag, the key of phases.PHASE_MODULES
    kind: str  # "fde", "mdcf", "vae" (reconstruction) or "diffusion" (Figure 4b)
    upstream: str | None = None  # the variant whose checkpoint this one builds on
    upstream_arg: str = ""


VARIANTS = [
    Variant("fde_d4", "FDE (d/4)", "phase1_fde.yaml", "phase1", "fde"),
    Variant("fde_d8", "FDE (d/8)", "phase1_fde.yaml", "phase1", "fde"),
    Variant("vae_d32", "VAE (d/32)", "phase1_fde.yaml", "vae", "vae"),
    Variant("mdcf_d16", "MDCF (d/16)", "phase2_lmae.yaml", "phase2", "mdcf", "fde_d4", "fde_ckpt_path"),
    Variant("mdcf_d32", "MDCF (d/32)", "phase2_lmae.yaml", "phase2", "mdcf", "fde_d4", "fde_ckpt_path"),
    Variant("mdcf_no_igc", "MDCF w/o IGC loss", "phase2_lmae.yaml", "phase2", "mdcf", "fde_d4", "fde_ckpt_path"),
    Variant("mdcf_no_tpc", "MDCF w/o TPC", "phase2_lmae.yaml", "phase2", "mdcf"),
    Variant("diffusion_mdcf", "Diffusion over MDCF d/32 (ours)", "diffusion.yaml", "diffusion", "diffusion",
            "mdcf_d32", "mdcf_ckpt_path"),
    Variant("dawn_baseline", "Diffusion over FDE H/4 dynamics (DAWN-style)", "diffusion.yaml", "diffusion",
            "diffusion", "fde_d4", "mdcf_ckpt_path"),
]
BY_NAME = {v.name: v for v in VARIANTS}

# Facts from the paper (HDTF, 256x256): (tables, FID, FVD16, FVD32, LSE-C, LSE-D).
PAPER_COLUMNS = ("FID ↓", "FVD16 ↓", "FVD32 ↓", "LSE-C ↑", "LSE-D ↓")
PAPER = {
    "fde_d4": ("2, 5", 7.90, 21.18, 30.45, 7.92, 7.89),
    "fde_d8": ("2", 10.33, 35.07, 62.60, 6.89, 8.26),
    "vae_d32": ("2", 24.26, 62.84, 100.61, 7.64, 7.52),
    "mdcf_d16": ("2", 7.85, 21.31, 30.40, 7.95, 7.38),
    "mdcf_d32": ("2, 5", 7.84, 20.84, 29.46, 7.92, 7.36),
    "mdcf_no_igc": ("5", 8.79, 27.19, 40.69, 7.58, 7.59),
    "mdcf_no_tpc": ("5", 12.75, 42.00, 64.52, 7.00, 7.59),
}
PAPER_GT = (0.0, 0.0, 0.0, 8.30, 7.05)

# ---------------------------------------------------------------- --smoke settings (64x64, tiny widths)

def _model_args(**values: str | dict[str, Any]) -> tuple[str, ...]:
    """`--model.init_args.KEY VALUE` pairs; a dict value is a nested settings field
    (`network={"norm": "group"}` -> `--model.init_args.network.norm group`)."""
    def pairs(prefix: str, items: dict[str, Any]) -> Iterable[str]:
        for key, value in items.items():
            if isinstance(value, dict):
                yield from pairs(f"{prefix}{key}.", value)
            else:
                yield from (f"{prefix}{key}", value)

    return tuple(pairs("--model.init_args.", values))


_LOSS: dict[str, Any] = {"image_size": "64", "loss": {"scales": "[1.0]"}, "lpips": "off"}
_TINY_FDE = _model_args(network={"block_expansion": "8", "max_features": "16", "motion_block_expansion": "8",
                                 "motion_max_features": "16", "motion_num_blocks": "3", "num_res_blocks": "1",
                                 "num_regions": "4"}, **_LOSS)
_TINY_LMAE = _model_args(network={"base_channels": "8", "channel_mult": "[1, 1, 2, 2]", "norm_groups": "4"}, **_LOSS)
_TINY_UNET = _model_args(image_size="64", denoiser={"base_channels": "16", "channel_mult": "[1]", "attn_levels": "[0]",
                                                    "num_heads": "2", "cond_dim": "16", "image_cond_channels": "8"},
                         sampling={"steps": "2", "decode_chunk": "4"}, lpips="off")
SMOKE_MODEL = {
    "fde_d4": _TINY_FDE, "fde_d8": _TINY_FDE,
    "vae_d32": _model_args(network={"base_channels": "8", "channel_mult": "[1, 1, 1, 1, 1, 1]", "norm_groups": "4"},
                           **_LOSS),
    "mdcf_d16": (*_TINY_LMAE, *_model_args(network={"channel_mult": "[1, 1, 2]"})),
    "mdcf_d32": _TINY_LMAE, "mdcf_no_igc": _TINY_LMAE,
    # w/o TPC: the FDE trained jointly from scratch, as tiny as phase 1's, without extras
    "mdcf_no_tpc": (*_TINY_LMAE, *_model_args(joint_fde={
        "downsample": "4", "block_expansion": "8", "max_features": "16", "num_regions": "4",
        "motion_block_expansion": "8", "motion_max_features": "16", "motion_num_blocks": "3", "num_res_blocks": "1",
        "norm": "group", "extras": {"source_skip": "false", "flow_refinement": "false", "global_alignment": "false"}})),
    "diffusion_mdcf": _TINY_UNET, "dawn_baseline": _TINY_UNET,
}
SMOKE_FRAMES = 8
SMOKE_DATA = ("--data.init_args.image_size", "64", "--data.init_args.batch_size", "2",
              "--data.init_args.num_workers", "0", "--data.init_args.samples_per_video", "1",
              "--data.init_args.val_samples", "2")
SMOKE_TRAINER = ("--trainer.max_steps", "2", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                 "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1")


def max_time(minutes: float) -> str:
    """Minutes -> Lightning's `DD:HH:MM:SS` for --trainer.max_time."""
    s = max(1, round(minutes * 60))
    return f"{s // 86400:02d}:{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- plan and training


@dataclass
class Plan:
    """Resolved options of one run (all paths absolute)."""

    workdir: Path
    data: Path
    out: Path
    variants: list[Variant]
    budget: float  # minutes per Table 2/5 variant
    diffusion_budget: float  # minutes per Figure 4b model
    smoke: bool = False
    skip_training: bool = False
    trainer_config: str | None = None
    overlays: Path | None = None  # a folder of per-phase overlays (e.g. configs/real), added to each base
    command: str = ""

    def minutes(self, v: Variant) -> float:
        """The training budget of `v` in minutes."""
        return self.diffusion_budget if v.kind == "diffusion" else self.budget

    def folder(self, name: str) -> Path:
        """`checkpoints/ablations/<name>` under the work dir."""
        return self.workdir / "checkpoints" / "ablations" / name


def find_ckpt(folder: Path, prefer_last: bool = False) -> Path | None:
    """`best.ckpt` then `last.ckpt` of a variant folder (the other way round with `prefer_last`)."""
    names = ("last.ckpt", "best.ckpt") if prefer_last else ("best.ckpt", "last.ckpt")
    return next((folder / n for n in names if (folder / n).is_file()), None)


def select_variants(only: list[str] | None, workdir: Path) -> list[Variant]:
    """The requested variants plus every upstream that has no checkpoint yet, in dependency order."""
    if not only:
        return list(VARIANTS)
    unknown = [n for n in only if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {', '.join(BY_NAME)}")
    chosen = set(only)
    for name in list(only):
        up = BY_NAME[name].upstream
        while up and find_ckpt(workdir / "checkpoints" / "ablations" / up) is None:
            chosen.add(up)
            up = BY_NAME[up].upstream
    return [v for v in VARIANTS if v.name in chosen]


def fit_command(v: Variant, plan: Plan) -> list[str]:
    """The `microscope fit` command line of a variant."""
    cmd = [sys.executable, "-m", "microscope_pl", "fit", "--config", str(CONFIGS / v.base)]
    if plan.overlays is not None and (plan.overlays / Path(v.base).name).is_file():
        cmd += ["--config", str(plan.overlays / Path(v.base).name)]
    cmd += ["--config", str(CONFIGS / "ablations" / f"{v.name}.yaml")]
    if plan.trainer_config:
        cmd += ["--config", plan.trainer_config]
    cmd += ["--data.init_args.data_root", str(plan.data), "--trainer.max_time", max_time(plan.minutes(v))]
    if v.kind != "diffusion":  # validate every epoch and at the time limit: best.ckpt sees the final weights
        cmd += ["--trainer.check_val_every_n_epoch", "1"]
    if v.upstream:
        upstream = find_ckpt(plan.folder(v.upstream))
        cmd += [f"--model.init_args.{v.upstream_arg}", str(upstream)]
    if plan.smoke:
        cmd += [*SMOKE_DATA, *SMOKE_MODEL[v.name], *SMOKE_TRAINER]
        if v.kind == "diffusion":
            cmd += ["--data.init_args.num_frames", str(SMOKE_FRAMES)]
    return cmd


def train_all(plan: Plan) -> dict[str, Row]:
    """Train the plan's variants in order, each in its own process; returns a record per variant."""
    records: dict[str, Row] = {}
    for v in plan.variants:
        folder = plan.folder(v.name)
        if (folder / "last.ckpt").is_file():
            print(f"[{v.name}] {folder / 'last.ckpt'} exists: not retrained", flush=True)
            sidecar = folder / RUN_FILE  # the budget it was trained with, when this runner trained it
            earlier = json.loads(sidecar.read_text()) if sidecar.is_file() else {"budget_minutes": None}
            trained_on = earlier.get("data")
            if trained_on and Path(trained_on).resolve() != plan.data.resolve():
                raise ValueError(f"{folder} was trained on {trained_on}, not {plan.data}; "
                                 "use another --workdir for another data set")
            records[v.name] = {**earlier, "status": "ok", "trained": "earlier run"}
            continue
        if plan.skip_training:
            records[v.name] = {"status": "not trained (--skip-training)"}
            continue
        if v.upstream and find_ckpt(plan.folder(v.upstream)) is None:
            records[v.name] = {"status": f"not run: upstream {v.upstream} has no checkpoint"}
            print(f"[{v.name}] {records[v.name]['status']}", file=sys.stderr, flush=True)
            continue
        cmd = fit_command(v, plan)
        log = plan.workdir / "logs" / "ablations" / f"{v.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        shown = shlex.join(["python", *cmd[1:]])
        print(f"[{v.name}] {v.label}: budget {plan.minutes(v):g} min, log {log}\n  {shown}", flush=True)
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as handle:
            code = subprocess.call(cmd, cwd=plan.workdir, stdout=handle, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        run = {"budget_minutes": plan.minutes(v), "train_seconds": round(seconds, 1), "command": shown,
               "data": str(plan.data)}
        records[v.name] = {"status": "ok" if code == 0 else f"training failed (exit {code}, log {log})",
                           "trained": "this run", **run}
        if code != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            print(f"[{v.name}] failed (exit {code}); last lines of {log}:\n{tail}", file=sys.stderr, flush=True)
        else:
            write_atomic(folder / RUN_FILE, json.dumps(run, indent=1) + "\n")
            print(f"[{v.name}] done in {seconds / 60:.1f} min", flush=True)
    return records


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalSettings:
    """How many held-out clips are scored, and where."""

    frames: int = 25
    clips_per_video: int = 2
    gen_clips_per_video: int = 1
    chunk: int = 16
    device: str = "cpu"
    seed: int = 0


@dataclass
class ClipSet:
    """Held-out clips with their ground-truth FS and Inception statistics (filled lazily)."""

    items: list[dict[str, Any]]
    real_fs: list[float] = field(default_factory=list)
    real_stats: Any = None


class Evaluator:
    """Scores reconstructed or generated clips against the test split of `data_root`.

    `feature_net` (b 3 h w in [0, 1] -> b d) and `lpips` ((pred, target) -> mean)
    default to the offline InceptionV3 and LPIPS-Alex; a missing weight file
    skips that metric with its reason (never faked).
    """

    def __init__(self, data_root: Path, settings: EvalSettings,
                 feature_net: Callable[[Tensor], Tensor] | None = None,
                 lpips: Callable[[Tensor, Tensor], float] | None = None) -> None:
        self.data_root, self.settings = data_root, settings
        self.skipped: dict[str, str] = {}
        device = settings.device
        self.feature_net = feature_net if feature_net is not None else \
            self._optional("fid", lambda: InceptionFeatures(device=device))
        self.lpips = lpips if lpips is not None else self._optional("lpips", lambda: LPIPSMetric(device=device))
        self._sets: dict[tuple[int, int], ClipSet] = {}

    def _optional(self, name: str, build: Callable[[], Any]) -> Any:
        """`build()`, or None with the reason recorded when its weights are missing."""
        try:
            return build()
        except MetricUnavailable as err:
            self.skipped[name] = str(err)
            return None

    def clips(self, image_size: int, per_video: int) -> ClipSet:
        """Deterministic test clips (first frame as reference) at `image_size`, cached."""
        key = (image_size, per_video)
        if key not in self._sets:
            data = ClipDataset(self.data_root, "test", num_frames=self.settings.frames, reference="first",
                               image_size=image_size, samples_per_video=per_video)
            self._sets[key] = ClipSet([data[i] for i in range(len(data))])
        return self._sets[key]

    def _features(self, frames: Tensor) -> Tensor:
        chunk = self.settings.chunk
        return torch.cat([self.feature_net(frames[i:i + chunk].to(self.settings.device)).cpu()
                          for i in range(0, len(frames), chunk)])

    def score(self, clip_set: ClipSet, predictions: Iterable[Tensor]) -> Row:
        """PSNR/SSIM/LPIPS over frames, FID over pooled frames, FS error over clips."""
        first = not clip_set.real_fs
        fake, real = GaussianStats(), clip_set.real_stats or GaussianStats()
        sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
        frames_seen, fs_pred = 0, []
        for item, pred in zip(clip_set.items, predictions):
            truth, pred = item["frames"].float(), pred.detach().float().cpu().clamp(0, 1)
            if pred.shape != truth.shape:
                raise ValueError(f"prediction {tuple(pred.shape)} != ground truth {tuple(truth.shape)}")
            # Identical frames give inf; cap each at 100 dB so a mean stays finite.
            sums["psnr"] += float(frame_psnr(pred, truth).clamp(max=100.0).sum())
            sums["ssim"] += float(frame_ssim(pred, truth).sum())
            if self.lpips is not None:
                sums["lpips"] += self.lpips(pred, truth) * len(pred)
            if self.feature_net is not None:
                fake.update(self._features(pred))
                if first:
                    real.update(self._features(truth))
            if first:
                clip_set.real_fs.extend(clip_fs([truth]))  # the same clips for every variant: computed once
            fs_pred.extend(clip_fs([pred]))
            frames_seen += len(pred)
        if frames_seen == 0:
            raise ValueError(f"{self.data_root}: no test clips of {self.settings.frames} frames to score")
        clip_set.real_stats = real
        row: Row = {k: v / frames_seen for k, v in sums.items() if k != "lpips" or self.lpips is not None}
        if self.feature_net is not None:
            row["fid"] = frechet_distance(*real.compute(), *fake.compute())
        row.update(fs_summary(fs_pred, clip_set.real_fs), frames=frames_seen, clips=len(fs_pred))
        return row


@torch.no_grad()
def reconstruct(module: torch.nn.Module, kind: str, frames: Tensor, reference: Tensor,
                chunk: int = 16) -> tuple[Tensor, tuple[int, ...]]:
    """Reconstruct `frames` (n 3 H W) from `reference` (1 3 H W) with one variant.

    Returns the reconstruction `n 3 H W` and the shape `(c, h, w)` of what the
    variant compresses a frame to: [f; m] for FDE, the LMAE mean for MDCF, the
    pixel VAE mean for VAE.
    """
    if kind not in ("fde", "mdcf", "vae"):
        raise ValueError(f"kind must be 'fde', 'mdcf' or 'vae', got {kind!r}")
    codec = DynamicsCodec(module.fde, module.lmae) if kind == "mdcf" else None
    outs, shape = [], ()
    for i in range(0, len(frames), chunk):
        dri = frames[i:i + chunk]
        src = reference.expand(len(dri), -1, -1, -1)
        if kind == "vae":  # the frame itself through the pixel VAE's mean
            out = module.vae(dri, sample=False)
            code = out["mu"]
        elif kind == "fde":
            out = module.fde(src, dri)
            code = out["dynamics"]
        else:  # MDCF's round trip: [f; m] -> LMAE mean -> [f^; m^] -> FDE decode
            out = codec.reconstruct(src, dri, sample=False)
            code = out["mu"]
        outs.append(out["frame"])
        shape = tuple(code.shape[1:])
    return torch.cat(outs), shape


def evaluate_module(evaluator: Evaluator, v: Variant, module: torch.nn.Module) -> Row:
    """Metrics, latent shape and compression ratio (from shapes) of one trained variant."""
    device = torch.device(evaluator.settings.device)
    module = module.to(device).eval()
    size = int(module.hparams.image_size)
    shapes: list[tuple[int, ...]] = []
    if v.kind == "diffusion":
        clip_set = evaluator.clips(size, evaluator.settings.gen_clips_per_video)
        _, channels, _, height, width = module.pipeline.latent_shape(1, 1)  # b c n h w of one frame
        shapes.append((channels, height, width))

        def predictions() -> Iterable[Tensor]:
            for k, item in enumerate(clip_set.items):
                batch = {key: item[key][None].to(device) for key in ("reference", "audio", "pose", "blink")}
                gen = torch.Generator().manual_seed(evaluator.settings.seed + k)
                yield module.generate_clip(batch, generator=gen)[0]
    else:
        clip_set = evaluator.clips(size, evaluator.settings.clips_per_video)

        def predictions() -> Iterable[Tensor]:
            for item in clip_set.items:
                rec, shape = reconstruct(module, v.kind, item["frames"].to(device), item["reference"][None].to(device),
                                         evaluator.settings.chunk)
                shapes.append(shape)
                yield rec

    row = evaluator.score(clip_set, predictions())
    row["image_size"] = size
    row["latent_shape"] = list(shapes[0])
    row["compression_ratio"] = LMAE.compression_ratio((3, size, size), shapes[0])
    return row


def evaluate_all(plan: Plan, records: dict[str, Row], settings: EvalSettings) -> tuple[dict[str, Row], dict[str, str]]:
    """Score each variant's checkpoint (best, or last for diffusion): a row per variant and the skipped metrics."""
    evaluator = Evaluator(plan.data, settings)
    rows: dict[str, Row] = {}
    for v in plan.variants:
        row: Row = {"label": v.label, "budget_minutes": plan.minutes(v), **records.get(v.name, {})}
        ckpt = find_ckpt(plan.folder(v.name), prefer_last=v.kind == "diffusion")
        if row.get("status", "ok") == "ok" and ckpt is None:
            row["status"] = f"no checkpoint in {plan.folder(v.name)}"
        if row.get("status", "ok") == "ok":
            start = time.perf_counter()
            print(f"[{v.name}] evaluating {ckpt}", flush=True)
            row["checkpoint"] = str(ckpt)
            try:
                row["steps"] = int(read_checkpoint(ckpt).get("global_step", 0))
                row.update(evaluate_module(evaluator, v, load_module(ckpt, v.phase)))
            except Exception as err:  # noqa: BLE001 (one broken variant must not sink the report)
                traceback.print_exc()
                row["status"] = f"evaluation failed: {type(err).__name__}: {err}"
            row["eval_seconds"] = round(time.perf_counter() - start, 1)
        rows[v.name] = row
    return rows, dict(evaluator.skipped)


# ---------------------------------------------------------------- report


RECON_CELLS = (("psnr", 2), ("ssim", 3), ("lpips", 3), ("fid", 2), ("fs_error", 4))
GEN_CELLS = (("fs_generated", 4), ("fs_ground_truth", 4), ("fs_error", 4), ("psnr", 2), ("fid", 2))


def _num(value: Any, digits: int) -> str:
    """A number with `digits` decimals, or a dash when there is none."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def _cells(row: Row, spec: Iterable[tuple[str, int]]) -> list[str]:
    """Latent shape, compression ratio, the metrics of `spec`, budget and steps of one row."""
    shape = "×".join(str(s) for s in row["latent_shape"]) if row.get("latent_shape") else "—"
    ratio = row.get("compression_ratio")
    ratio_text = "—" if ratio is None else f"{ratio:.0f}" if float(ratio).is_integer() else f"{ratio:.2f}"
    budget = row.get("budget_minutes")
    return [shape, ratio_text, *(_num(row.get(k), d) for k, d in spec),
            f"{budget:g}" if isinstance(budget, (int, float)) else "—", str(row.get("steps", "—"))]


def render_markdown(report: dict[str, Any]) -> str:
    """The report in the paper's layout: reconstruction table (ours beside the paper's) and Figure 4b."""
    rows, meta = report["rows"], report["meta"]
    size = next((r["image_size"] for r in rows.values() if "image_size" in r), "?")
    smoke = " (--smoke: every run stops after at most 2 training steps)" if meta.get("smoke") else ""
    lines = [
        "# MICROSCOPE ablations at small scale (paper Tables 2 and 5, Figure 4b)", "",
        f"- Date: {meta['date']}", f"- Command: `{meta['command']}`", f"- Machine: {meta['machine']}",
        f"- Budget: {meta['budget_minutes']:g} min of training per compression variant and "
        f"{meta['diffusion_budget_minutes']:g} min per diffusion model (`--trainer.max_time`){smoke}; "
        f"whole run {meta.get('total_minutes', 0):.1f} min",
        f"- Data: {meta['data']}; evaluated on held-out identities (test split) at {size}x{size}: {meta['eval']}",
        "", "## Reconstruction (Tables 2 and 5)", "",
        "Each test-clip frame is reconstructed from the clip's first frame (the VAE from the frame itself). "
        "Ours: PSNR/SSIM/LPIPS per frame, FID over pooled frames, FS error = |FS(reconstruction) - FS(real)| "
        "per clip. Compression = pixels x 3 / elements of the compressed representation, from tensor shapes. "
        "The right-hand columns are the paper's own values (HDTF at 256x256; Tables 2 and 5), copied as "
        f"published; only FID is a shared metric, and ours is on the small {meta.get('data_kind', 'synthetic')} "
        "set, so compare rankings, not values.", "",
        "| Variant | Paper table | Latent (c×h×w) | Compression (×) | PSNR ↑ | SSIM ↑ | LPIPS ↓ | FID ↓ "
        "| FS error ↓ | Budget (min) | Steps | " + " | ".join(f"Paper {c}" for c in PAPER_COLUMNS) + " |",
        "|" + "---|" * (11 + len(PAPER_COLUMNS)),
    ]
    for name, paper in PAPER.items():
        if name in rows:
            cells = [rows[name]["label"], paper[0], *_cells(rows[name], RECON_CELLS), *(f"{x:.2f}" for x in paper[1:])]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paper ground-truth row: FID 0, FVD16 0, FVD32 0, LSE-C 8.30, LSE-D 7.05 (Table 5 also lists "
              "LIA, an external method not reproduced here).",
              "MDCF rows use the FDE (d/4) row's checkpoint frozen (two-phase training), so they inherit its "
              "budget too; MDCF w/o TPC trains FDE and LMAE jointly from scratch in one budget."]
    lines += ["", "## Figure 4b: flow smoothness of generated videos", "",
              "Latent diffusion with the same denoiser and budget over the MDCF d/32 latent and over FDE's H/4 "
              "dynamics (the DAWN-style baseline); each test clip is generated from its first frame with its own "
              "audio, pose and blink. FS error = |FS(generated) - FS(ground truth)| per clip (lower is closer to "
              "the real motion). The paper's Figure 4b bar values are not in our copy of the paper (the figure "
              "is an image); the paper reports that videos generated over MDCF are closer to the ground truth "
              "in FS than DAWN's.", "",
              "| Latent diffused | Latent (c×h×w) | Compression (×) | FS generated | FS ground truth | FS error ↓ "
              "| PSNR ↑ | FID ↓ | Budget (min) | Steps |", "|" + "---|" * 10]
    for name in ("diffusion_mdcf", "dawn_baseline"):
        if name in rows:
            lines.append("| " + " | ".join([rows[name]["label"], *_cells(rows[name], GEN_CELLS)]) + " |")
    lines += ["", "## Notes", "",
              "- Not computed: FVD (needs the StyleGAN-V I3D file) and LSE-C/D (needs SyncNet weights"
              + ("; the synthetic faces' mouths are drawn, so LSE would not be meaningful on them)."
                 if meta.get("data_kind", "synthetic") == "synthetic" else ")."),
              "- FS uses OpenCV Farneback flow (a weight-free fallback; the paper does not name its estimator), "
              "so FS values are comparable between our rows, not with the paper's.",
              *(f"- {k.upper()} skipped: {reason}" for k, reason in report.get("skipped_metrics", {}).items()),
              *(f"- {r['label']}: {r['status']}" for r in rows.values() if r.get("status", "ok") != "ok")]
    return "\n".join(lines) + "\n"


def machine_description(device: str) -> str:
    """CPU/GPU, core count and library versions, for the report header."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return (f"{platform.platform()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
            f"{gpu}; evaluation on {device}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"lightning {lightning.__version__}")


def write_reports(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write `out` (markdown) and `out` with suffix .json, each atomically."""
    json_path = out.with_suffix(".json")
    write_atomic(json_path, json.dumps(report, indent=1, sort_keys=False, default=str) + "\n")
    write_atomic(out, render_markdown(report))
    return out, json_path


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command-line options (see `--help`)."""
    p = argparse.ArgumentParser(prog="python -m microscope_pl.ablations", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-minutes", type=float, default=4.0, help="training minutes per compression variant, "
                   "the same for all seven (default %(default)s)")
    p.add_argument("--diffusion-minutes", type=float, default=6.0,
                   help="training minutes per Figure 4b diffusion model (default %(default)s)")
    p.add_argument("--data", help="data set root, synthesised when it has no manifest.json "
                   "(default data/synth; --smoke: a tiny set in the work dir)")
    p.add_argument("--out", help="markdown report, the JSON beside it (default WORKDIR/reports/ablations.md)")
    p.add_argument("--workdir", help="where checkpoints/ and logs/ go (default: here; --smoke: a temporary dir)")
    p.add_argument("--smoke", action="store_true", help="64x64, tiny widths, at most 2 training steps per variant, "
                   "tiny data set, all in a temporary directory: checks the pipeline in about 2 minutes")
    p.add_argument("--only", nargs="+", metavar="VARIANT", choices=list(BY_NAME),
                   help="train and report only these (upstreams without a checkpoint are trained too)")
    p.add_argument("--skip-training", action="store_true", help="evaluate existing checkpoints only")
    p.add_argument("--trainer-config", help="extra config for every fit, e.g. configs/trainer/gpu.yaml")
    p.add_argument("--overlays", metavar="DIR", help="per-phase overlays added to each variant's base config "
                   "(e.g. configs/real with --data data/real128)")
    p.add_argument("--device", help="evaluation device (default: cuda when available, else cpu)")
    p.add_argument("--eval-frames", type=int, help="frames per test clip (default 25; --smoke 8)")
    p.add_argument("--eval-clips", type=int, help="reconstruction clips per test video (default 2; --smoke 1)")
    p.add_argument("--gen-clips", type=int, default=1, help="generated clips per test video (default 1)")
    return p.parse_args(argv)


def ensure_data(root: Path, smoke: bool) -> None:
    """Synthesise the embedded data set at `root` (as `make data`, or tiny for --smoke) when missing."""
    if (root / "manifest.json").is_file():
        return
    from microscope_pl.data.synth import synthesize

    print(f"synthesising the embedded data set into {root}", flush=True)
    if smoke:
        synthesize(root, videos=4, size=64, seconds=2.0, seed=0, verbose=False)
    else:
        synthesize(root, videos=40, size=128, seconds=8.0, seed=0)


def make_plan(args: argparse.Namespace, argv: list[str]) -> Plan:
    """Resolve paths (relative to the current directory) and the variants to run."""
    if args.budget_minutes <= 0 or args.diffusion_minutes <= 0:
        raise ValueError(f"budgets must be positive, got --budget-minutes {args.budget_minutes} and "
                         f"--diffusion-minutes {args.diffusion_minutes}")
    if args.overlays and not Path(args.overlays).is_dir():
        raise ValueError(f"--overlays {args.overlays} is not a folder")
    if args.workdir:
        workdir = Path(args.workdir).resolve()
    else:
        workdir = Path(tempfile.mkdtemp(prefix="microscope-ablations-smoke-")) if args.smoke else Path.cwd()
    workdir.mkdir(parents=True, exist_ok=True)
    default_data = workdir / "data" / "synth_smoke" if args.smoke else Path("data/synth")
    data = Path(args.data).resolve() if args.data else default_data.resolve()
    out = Path(args.out).resolve() if args.out else workdir / "reports" / "ablations.md"
    trainer = str(Path(args.trainer_config).resolve()) if args.trainer_config else None
    return Plan(workdir=workdir, data=data, out=out, variants=select_variants(args.only, workdir),
                budget=args.budget_minutes, diffusion_budget=args.diffusion_minutes, smoke=args.smoke,
                skip_training=args.skip_training, trainer_config=trainer,
                overlays=Path(args.overlays).resolve() if args.overlays else None,
                command=shlex.join(["python", "-m", "microscope_pl.ablations", *argv]))


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, report; 0 when every row has numbers, 1 when some have not, 2 on bad options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        plan = make_plan(args, argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = EvalSettings(frames=args.eval_frames or (SMOKE_FRAMES if plan.smoke else 25),
                            clips_per_video=args.eval_clips or (1 if plan.smoke else 2),
                            gen_clips_per_video=args.gen_clips, device=device)
    print(f"ablations: work dir {plan.workdir}, data {plan.data}, report {plan.out}", flush=True)
    ensure_data(plan.data, plan.smoke)
    records = train_all(plan)
    rows, skipped = evaluate_all(plan, records, settings)
    manifest = json.loads((plan.data / "manifest.json").read_text())
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": plan.command, "machine": machine_description(device), "smoke": plan.smoke,
        "budget_minutes": plan.budget, "diffusion_budget_minutes": plan.diffusion_budget,
        "data_kind": "synthetic" if manifest.get("source") == "synthetic" else "real-face",
        "data": f"{plan.data} ({manifest.get('source', '?')}, {len(manifest['train'])} train / "
                f"{len(manifest['test'])} test videos, stored at {manifest.get('size')}px)",
        "eval": f"{settings.clips_per_video} clip(s) of {settings.frames} frames per test video for "
                f"reconstruction, {settings.gen_clips_per_video} for generation",
        "workdir": str(plan.workdir), "total_minutes": (time.perf_counter() - start) / 60,
    }
    paper = {name: dict(zip(("tables", *PAPER_COLUMNS), values)) for name, values in PAPER.items()}
    report = {"meta": meta, "rows": rows, "skipped_metrics": skipped, "paper_hdtf_256": paper,
              "paper_ground_truth": PAPER_GT}
    md, js = write_reports(report, plan.out)
    failed = [n for n, r in rows.items() if r.get("status", "ok") != "ok"]
    print(f"wrote {md} and {js} ({meta['total_minutes']:.1f} min)", flush=True)
    if failed:
        print(f"error: no numbers for {', '.join(failed)} (see the report's notes)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
