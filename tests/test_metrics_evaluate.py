"""`evaluate_folders` and `microscope eval` on two tiny mp4 folders with stand-in networks."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from microscope_pl.metrics.evaluate import EvalConfig, evaluate_folders, register

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg needed to write mp4s")

N, S = 36, 32
BOX = [10, 20, 22, 28]


class StandInSync:
    def forward_lip(self, x: torch.Tensor) -> torch.Tensor:  # b 3 5 s s -> b 5
        return x.mean(dim=(1, 3, 4)) / 255.0

    def forward_aud(self, x: torch.Tensor) -> torch.Tensor:  # b 1 13 20 -> b 5
        return x[:, 0, 0].reshape(-1, 5, 4).mean(-1) / 20.0


class MeanColour:
    name = "mean colour"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1, 3).mean(1).astype(np.float64) + 1.0


def _frame_feats(x: torch.Tensor) -> torch.Tensor:  # b 3 h w -> b 6
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def _clip_feats(x: torch.Tensor) -> torch.Tensor:  # b n 3 h w -> b 4
    m = x.mean(dim=(2, 3, 4))
    return torch.stack([m.mean(1), m.std(1), m[:, 0], m[:, -1]], 1)


def _write(path: Path, loud: np.ndarray, seed: int, noise: float, wave: np.ndarray | None) -> None:
    from microscope_pl.data.video_io import VideoWriter

    rng = np.random.default_rng(seed)
    frames = np.full((N, S, S, 3), 150, np.uint8)
    frames[:, :, :, 0] = 120 + 10 * seed
    for t in range(N):
        frames[t, BOX[1] : BOX[1] + int(loud[t] * 8), BOX[0] : BOX[2]] = 30
    frames = np.clip(frames + rng.normal(0, noise, frames.shape), 0, 255).astype(np.uint8)
    with VideoWriter(path, 25, S, audio=wave) as w:
        w.write(frames)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    pred, gt = root / "pred", root / "gt"
    pred.mkdir()
    gt.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a", "b"]):
        loud = np.clip(np.convolve(rng.uniform(0, 1, N + 4), np.ones(5) / 5, "valid"), 0, 1)
        wave = (rng.standard_normal(N * 640) * np.repeat(0.02 + 0.3 * loud, 640)).astype(np.float32)
        _write(pred / f"{name}.mp4", loud, i, 6.0, np.clip(wave, -1, 1))
        _write(gt / f"{name}.mp4", loud, i, 0.0, None)
        (gt / f"{name}.json").write_text(json.dumps({"size": S, "mouth_box": BOX}))
    _write(pred / "orphan.mp4", np.zeros(N), 3, 0.0, None)
    return pred, gt


def _config(**kw: object) -> EvalConfig:
    base = dict(
        size=None, fid_net=_frame_feats, fvd_net=_clip_feats, sync_net=StandInSync(), identity=MeanColour(),
        lpips_metric=lambda p, t: float((p - t).abs().mean()), csim_stride=3,
    )
    base.update(kw)
    return EvalConfig(**base)  # type: ignore[arg-type]


def test_evaluate_folders_writes_json_and_md(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    report = evaluate_folders(pred, gt, out_dir=tmp_path, config=_config())
    m = report["metrics"]
    for key in ("psnr", "ssim", "lpips", "fid", "fvd16", "fvd32", "lse_c", "lse_d", "csim", "fs_error", "sync_corr"):
        assert key in m, key
    assert report["videos"] == 2 and report["unmatched"] == ["orphan"]
    assert 20 < m["psnr"] < 100 and 0 < m["ssim"] < 1
    assert m["sync_corr_gt"] > 0.5  # GT mouth follows the loudness (quantised rows vs dB: not 1)
    assert set(report["per_video"]) == {"a", "b"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["fid"] == pytest.approx(m["fid"])
    md = (tmp_path / "metrics.md").read_text()
    assert "| fid |" in md and "## Per video" in md and "OpenCV Farneback" in md


def test_skipped_metrics_listed_with_reason(folders: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MICROSCOPE_I3D", raising=False)
    monkeypatch.delenv("MICROSCOPE_SYNCNET", raising=False)
    pred, gt = folders
    report = evaluate_folders(
        pred, gt, out_dir=tmp_path, config=EvalConfig(size=24, metrics=("psnr", "fvd16", "lse", "sync_corr"))
    )
    assert set(report["metrics"]) == {"psnr", "sync_corr", "sync_corr_gt"}
    assert "i3d_torchscript.pt" in report["skipped"]["fvd16"]
    assert "syncnet_v2.model" in report["skipped"]["lse"]
    md = (tmp_path / "metrics.md").read_text()
    assert "## Skipped" in md and "syncnet_v2.model" in md


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["eval", "--pred", str(tmp_path / "nope"), "--gt", str(tmp_path)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err
    args = parser.parse_args(["eval", "--pred", str(tmp_path), "--gt", str(tmp_path), "--metrics", "psnr,bogus"])
    (tmp_path / "x.mp4").write_bytes(b"")
    (tmp_path / "x.json").write_text("{}")
    assert args.func(args) == 2
    assert "bogus" in capsys.readouterr().err


def test_cli_runs(folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pred, gt = folders
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["eval", "--pred", str(pred), "--gt", str(gt), "--out-dir", str(tmp_path),
         "--metrics", "psnr,ssim,fs", "--size", "16"]
    )
    assert args.func(args) == 0
    assert "| psnr |" in capsys.readouterr().out
    assert (tmp_path / "metrics.json").is_file()


def test_prepared_dataset_layout(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, gt = folders
    video_dir = tmp_path / "data" / "videos" / "a"
    video_dir.mkdir(parents=True)
    shutil.copy(gt / "a.mp4", video_dir / "video.mp4")
    (video_dir / "meta.json").write_text(json.dumps({"frames": N, "fps": 25, "size": S, "mouth_box": BOX}))
    cfg = EvalConfig(size=64, metrics=("psnr", "sync_corr"))
    report = evaluate_folders(pred, tmp_path / "data", out_dir=tmp_path, config=cfg)
    assert report["videos"] == 1 and sorted(report["unmatched"]) == ["b", "orphan"]
    assert report["metrics"]["sync_corr_gt"] > 0.5  # box scaled from 32 to 64 pixels


def test_cli_out_is_an_alias_of_out_dir(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for flag in ("--out-dir", "--out"):
        args = parser.parse_args(["eval", "--pred", "p", "--gt", "g", flag, str(tmp_path)])
        assert args.out_dir == str(tmp_path)
