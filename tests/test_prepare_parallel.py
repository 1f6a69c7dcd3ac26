"""data prepare with a process pool (--workers), shards (--shard K/N) and the final merging pass."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_data_prepare import _encode, _portrait_frames

import microscope_pl.data.prepare as prep
from microscope_pl.cli import main
from microscope_pl.data.prepare import in_shard, prepare


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 1.2 s talking faces, one without an audio track and an unreadable file whose name collides."""
    raw = tmp_path_factory.mktemp("raw")
    frames = _portrait_frames(36, 30)
    _encode(raw / "anna.mp4", frames, 30, audio=True, seconds=1.2)
    _encode(raw / "bert.mp4", frames[::-1].copy(), 30, audio=True, seconds=1.2)
    _encode(raw / "mute.mp4", frames, 30, audio=False)  # ffmpeg without -i audio: like -an
    (raw / "extra").mkdir()
    (raw / "extra" / "bert.mp4").write_text("not a video\n")  # named bert_2 over the full file list
    return raw


@pytest.fixture(scope="module")
def one_pass(raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("serial") / "out"
    return out, prepare(raw_dir, out, size=64, verbose=False)


def _reasons(report: dict) -> dict[str, str]:
    return {Path(s["file"]).name if "extra" not in s["file"] else "extra/bert.mp4": s["reason"]
            for s in report["skipped"]}


def test_one_pass_names_and_skips(one_pass: tuple[Path, dict]) -> None:
    out, report = one_pass
    assert report["processed"] == ["anna", "bert"]
    reasons = _reasons(report)
    assert set(reasons) == {"mute.mp4", "extra/bert.mp4"} and "no audio" in reasons["mute.mp4"]
    marker = json.loads((out / "videos" / ".skipped" / "mute.json").read_text())
    assert marker["reason"] == reasons["mute.mp4"] and marker["prepare_version"] == prep.PREPARE_VERSION
    assert (out / "videos" / ".skipped" / "bert_2.json").is_file()


def test_workers_give_the_same_output(raw_dir: Path, one_pass: tuple[Path, dict], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    serial, report1 = one_pass
    out = tmp_path / "out"
    # Interrupted at the first promotion: nothing promoted, no .tmp folder left, no manifest or report.
    real_replace = os.replace

    def interrupt(a, b):
        if Path(a).name.endswith(".tmp") and Path(a).parent == out / "videos":
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(raw_dir, out, size=64, workers=2, verbose=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [p.name for p in (out / "videos").iterdir() if p.name != ".skipped"]
    assert not (out / "manifest.json").exists() and not (out / "report.json").exists()

    report2 = prepare(raw_dir, out, size=64, workers=2, verbose=False)
    assert report2 == report1
    for name in ("manifest.json", "report.json"):
        assert json.loads((out / name).read_text()) == json.loads((serial / name).read_text())
    for clip in report1["processed"]:
        a, b = serial / "videos" / clip, out / "videos" / clip
        assert json.loads((a / "meta.json").read_text()) == json.loads((b / "meta.json").read_text())
        assert np.array_equal(np.load(a / "audio_feats.npy"), np.load(b / "audio_feats.npy"))
    assert not list((out / "videos").glob(".*.tmp"))


def test_shards_then_a_final_pass(raw_dir: Path, one_pass: tuple[Path, dict], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    serial, report1 = one_pass
    assert in_shard("bert", (1, 2)) and in_shard("mute", (1, 2)) and in_shard("anna", (2, 2))
    out = tmp_path / "out"
    base = ["data", "prepare", "--src", str(raw_dir), "--out", str(out), "--size", "64", "--quiet"]
    for k in (1, 2):
        assert main([*base, "--shard", f"{k}/2"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"shard {k}/2: prepared"), lines
        assert not (out / "manifest.json").exists()
    shard1 = json.loads((out / "report.shard-1-of-2.json").read_text())
    shard2 = json.loads((out / "report.shard-2-of-2.json").read_text())
    assert shard1["processed"] == ["bert"] and shard2["processed"] == ["anna"]
    assert "mute.mp4" in _reasons(shard1)

    # The final pass decodes nothing: every clip is found prepared or remembered as skipped.
    def no_decoding(*args, **kwargs):
        raise AssertionError("the final pass should not prepare any video")

    monkeypatch.setattr(prep, "_process", no_decoding)
    final = prepare(raw_dir, out, size=64, verbose=False)
    assert final["processed"] == [] and final["existing"] == ["anna", "bert"]
    assert final["skipped"] == report1["skipped"] and _reasons(final)["mute.mp4"].startswith("no audio")
    assert json.loads((out / "manifest.json").read_text()) == json.loads((serial / "manifest.json").read_text())
    assert json.loads((out / "report.json").read_text()) == final


@pytest.mark.parametrize("flags", [["--shard", "3/2"], ["--shard", "0/2"], ["--shard", "two"], ["--workers", "0"]])
def test_bad_workers_or_shard(flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "prepare", "--src", str(tmp_path), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("--shard must be K/N with 1 <= K <= N" in err[0] or "--workers" in err[0]), err
    assert not (tmp_path / "out").exists()
