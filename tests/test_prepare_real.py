"""data.prepare on real faces (the shared development clips) and its audio gates.

The real-clip tests skip when ``../shared/data/real-clips`` is absent or
dlib's 68-point model is not installed; the loudness, silence and mouth-box
tests build their own inputs and always run.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from microscope_pl.data.audio import (LOUDNESS_TARGET_DBFS, PEAK_CEILING_DBFS, SILENCE_DBFS, normalize_loudness,
                                      read_wav, rms_dbfs, speech_level_dbfs)
from microscope_pl.data.face_track import clip_mouth_box, mouth_boxes, smooth_track
from microscope_pl.data.prepare import FaceTools, prepare

REAL = Path(__file__).resolve().parents[2] / "shared/data/real-clips"
SIZE = 64


def _lavfi_clip(path: Path, audio: str, seconds: float = 1.5) -> None:
    """A 1.5 s test-pattern video whose track is the lavfi source ``audio`` (44.1 kHz stereo AAC), via ffmpeg."""
    cmd = ["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "lavfi", "-i", f"testsrc=size=160x120:rate=25:d={seconds}",
           "-f", "lavfi", "-i", audio, "-t", str(seconds), "-ac", "2", "-ar", "44100", "-c:a", "aac",
           "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path)]
    subprocess.run(cmd, check=True)


# ---------------------------------------------------------------- loudness (no real clip needed)


def _bursts(gain: float, seconds: float = 4.8, sr: int = 16000) -> np.ndarray:
    """A 220 Hz tone in 0.6 s bursts with 1 s pauses (speech-like gaps) at amplitude ``gain``."""
    t = np.arange(int(seconds * sr)) / sr
    on = ((t % 1.6) < 0.6).astype(np.float64)
    return (gain * on * np.sin(2 * np.pi * 220 * t) * (1 + 0.3 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def test_normalize_loudness_same_level_at_two_gains() -> None:
    quiet, loud = _bursts(0.02), _bursts(0.5)
    assert speech_level_dbfs(loud) - speech_level_dbfs(quiet) == pytest.approx(20 * math.log10(25), abs=0.01)
    a, b = normalize_loudness(quiet), normalize_loudness(loud)
    assert speech_level_dbfs(a) == pytest.approx(LOUDNESS_TARGET_DBFS, abs=0.05)
    assert speech_level_dbfs(b) == pytest.approx(LOUDNESS_TARGET_DBFS, abs=0.05)
    np.testing.assert_allclose(a, b, atol=1e-4)  # one gain each: the same wave
    # The gate ignores the pauses: the gated level is the bursts' level, above the plain RMS.
    assert speech_level_dbfs(quiet) > rms_dbfs(quiet) + 2.0
    assert speech_level_dbfs(normalize_loudness(quiet, -30.0)) == pytest.approx(-30.0, abs=0.05)


def test_normalize_loudness_never_clips_and_leaves_silence() -> None:
    clicks = np.zeros(16000, np.float32)
    clicks[::4000] = 0.5  # a crest factor far above speech: the target gain would clip it
    out = normalize_loudness(clicks)
    assert 20 * math.log10(float(np.abs(out).max())) == pytest.approx(PEAK_CEILING_DBFS, abs=1e-3)
    assert speech_level_dbfs(out) < LOUDNESS_TARGET_DBFS
    silence = np.zeros(8000, np.float32)
    assert math.isinf(speech_level_dbfs(silence)) and np.array_equal(normalize_loudness(silence), silence)


def test_all_zero_and_near_silent_tracks_are_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _lavfi_clip(src / "zeros.mp4", "anullsrc=r=44100:cl=stereo")
    _lavfi_clip(src / "hum.mp4", "aevalsrc=0.0005*sin(2*PI*120*t):s=44100")  # a hum at about -69 dBFS
    report = prepare(src, tmp_path / "out", size=SIZE, verbose=False)
    reasons = {Path(s["file"]).name: s["reason"] for s in report["skipped"]}
    assert report["processed"] == [] and set(reasons) == {"zeros.mp4", "hum.mp4"}
    assert reasons["zeros.mp4"] == "all-zero audio track"
    assert reasons["hum.mp4"].startswith("near-silent audio track (RMS -") and f"{SILENCE_DBFS:g} dBFS" in reasons[
        "hum.mp4"]


def test_cli_defaults_match_the_audio_constants() -> None:
    from microscope_pl.data import cli

    assert (cli.SILENCE_DBFS, cli.LOUDNESS_TARGET_DBFS) == (SILENCE_DBFS, LOUDNESS_TARGET_DBFS)


# ---------------------------------------------------------------- mouth boxes (synthetic landmarks)


def test_mouth_boxes_hold_the_lips_and_follow_them() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(100)
    points = np.tile(rng.uniform(20, 40, (1, 68, 2)), (100, 1, 1))
    centre = np.stack([30 + 8 * np.sin(t / 9), 40 + 5 * np.cos(t / 7)], axis=1)
    lips = rng.uniform(-6, 6, (100, 20, 2)) * np.array([1.0, 0.5])  # jittery lip shapes
    points[:, 48:68] = centre[:, None] + lips
    boxes = mouth_boxes(points, SIZE)
    assert boxes.shape == (100, 4) and boxes.dtype == np.float32
    lip = points[:, 48:68]
    assert np.all(boxes[:, :2] <= lip.min(axis=1)) and np.all(boxes[:, 2:] >= lip.max(axis=1))
    mid = (boxes[:, :2] + boxes[:, 2:]) / 2
    for axis in (0, 1):
        assert np.corrcoef(mid[:, axis], lip.mean(axis=1)[:, axis])[0, 1] > 0.9
    whole = clip_mouth_box(boxes, SIZE)
    assert all(isinstance(v, int) for v in whole) and 0 <= whole[0] < whole[2] <= SIZE
    inside = (boxes[:, 0] >= whole[0]) & (boxes[:, 1] >= whole[1]) & (boxes[:, 2] <= whole[2]) & (
        boxes[:, 3] <= whole[3])
    assert inside.mean() > 0.9
    ramp = np.arange(20, dtype=np.float64)[:, None] ** 2
    np.testing.assert_allclose(smooth_track(ramp), ramp, atol=1e-9)  # quadratic: kept as it is


# ---------------------------------------------------------------- one real clip


def _has_landmarks() -> bool:
    return FaceTools().has_landmarks


@pytest.fixture(scope="module")
def real_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """clip_d12 (speech, a moving head) for its first 3 s and clip_d18 (all-zero audio) prepared at 64 px."""
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is absent")
    if not _has_landmarks():
        pytest.skip("dlib's 68-point model is not installed (pip install dlib-bin face_recognition_models)")
    src = tmp_path_factory.mktemp("real_src")
    for name in ("clip_d12.mp4", "clip_d18.mp4"):
        (src / name).symlink_to(REAL / name)
    out = tmp_path_factory.mktemp("real_out")
    report = prepare(src, out, size=SIZE, max_seconds=3.0, verbose=False)
    return out, report, src


def test_real_clip_kept_and_zero_audio_skipped(real_out: tuple[Path, dict, Path]) -> None:
    out, report, src = real_out
    assert report["processed"] == ["clip_d12"]
    assert [(Path(s["file"]).name, s["reason"]) for s in report["skipped"]] == [("clip_d18.mp4",
                                                                                  "all-zero audio track")]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["landmarks"] == "dlib68" and manifest["pose_source"] == "landmarks"
    assert manifest["framing"] == {"detector": "dlib", "scale": 2.2, "offset": [0.0, 0.1], "reference": "box"}
    assert manifest["loudness"]["target_dbfs"] == LOUDNESS_TARGET_DBFS
    meta = json.loads((out / "videos" / "clip_d12" / "meta.json").read_text())
    assert meta["frames"] == 75 and meta["framing"]["detector"] == "dlib" and len(meta["crop"]) == 3
    wave, _ = read_wav(out / "videos" / "clip_d12" / "audio.wav")
    assert wave.size == 75 * 640
    assert speech_level_dbfs(wave) == pytest.approx(LOUDNESS_TARGET_DBFS, abs=0.3)  # the source is at -8.7
    again = prepare(src, out, size=SIZE, max_seconds=3.0, verbose=False)
    assert again["existing"] == ["clip_d12"] and again["processed"] == []


def test_real_landmarks_land_on_the_face(real_out: tuple[Path, dict, Path]) -> None:
    folder = real_out[0] / "videos" / "clip_d12"
    pts = np.load(folder / "landmarks.npy")
    assert pts.shape == (75, 68, 2) and pts.dtype == np.float32 and np.isfinite(pts).all()
    assert pts.min() >= 0 and pts.max() < SIZE
    width = pts[:, :, 0].max(axis=1) - pts[:, :, 0].min(axis=1)
    assert np.all(width > 0.2 * SIZE) and np.all(width < 0.95 * SIZE), "a face spread across the crop"
    y = pts[:, :, 1]
    brows, eyes, nose, lips, chin = y[:, 17:27].mean(1), y[:, 36:48].mean(1), y[:, 30], y[:, 48:68].mean(1), y[:, 8]
    assert np.all((brows < eyes) & (eyes < nose) & (nose < lips) & (lips < chin)), "face parts in order"
    assert np.all(pts[:, 36:42, 0].mean(1) < pts[:, 42:48, 0].mean(1)), "image-left eye left of the other"
    pose, blink = np.load(folder / "pose.npy"), np.load(folder / "blink.npy")
    assert np.abs(pose[:, :3]).max() < 60 and 0.1 < float(np.median(blink)) < 0.5


def test_real_mouth_box_holds_and_follows_the_lips(real_out: tuple[Path, dict, Path]) -> None:
    folder = real_out[0] / "videos" / "clip_d12"
    pts, boxes = np.load(folder / "landmarks.npy"), np.load(folder / "mouth_boxes.npy")
    lips = pts[:, 48:68]
    assert boxes.shape == (75, 4)
    assert np.all(boxes[:, :2] <= lips.min(axis=1)) and np.all(boxes[:, 2:] >= lips.max(axis=1))
    mid, centroid = (boxes[:, :2] + boxes[:, 2:]) / 2, lips.mean(axis=1)
    assert centroid[:, 0].std() > 1.0, "the head moves in this clip"
    assert np.corrcoef(mid[:, 0], centroid[:, 0])[0, 1] > 0.9
    assert np.corrcoef(mid[:, 1], centroid[:, 1])[0, 1] > 0.8


def test_real_clip_feeds_the_dataset_and_sync_proxy(real_out: tuple[Path, dict, Path]) -> None:
    from microscope_pl.data.datasets import ClipDataset
    from microscope_pl.metrics.sync import sync_correlation

    out = real_out[0]
    meta = json.loads((out / "videos" / "clip_d12" / "meta.json").read_text())
    box = meta["mouth_box"]
    assert box is not None and 0 <= box[0] < box[2] <= SIZE and 0 <= box[1] < box[3] <= SIZE
    item = ClipDataset(out, "train", num_frames=8, samples_per_video=1)[0]
    assert item["mouth_box"].tolist() == [float(v) for v in box]
    corr = sync_correlation(item["frames"], item["loudness"], item["mouth_box"].tolist())
    assert -1.0 <= corr <= 1.0


def test_generation_frames_a_raw_frame_like_the_data_set(real_out: tuple[Path, dict, Path], tmp_path: Path) -> None:
    """Frame k of a raw clip framed both ways with the data set's recipe: by `data prepare`
    (its crop of a still clip of that frame) and by generation (`portrait_box`)."""
    from microscope_pl.data.datasets import data_record, load_manifest
    from microscope_pl.data.prepare import choose_crop, probe
    from microscope_pl.inference.inputs import crop_portrait, portrait_box

    out, _, src = real_out
    recipe = data_record(load_manifest(out))["framing"]
    assert recipe["detector"] == "dlib"
    tools = FaceTools()
    for k in (10, 60):
        raw = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(src / "clip_d12.mp4"),
                              "-vf", f"select=eq(n\\,{k})", "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24",
                              "-"], capture_output=True, check=True).stdout
        rgb = np.frombuffer(raw, np.uint8).reshape(512, 512, 3)
        still = tmp_path / f"still{k}.mp4"
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                        "-s", "512x512", "-r", "25", "-i", "-", "-c:v", "libx264", "-crf", "10", "-pix_fmt",
                        "yuv444p", str(still)], input=raw * 30, check=True)
        data_crop, _, framing = choose_crop(still, probe(still), tools, "auto", recipe["scale"])
        assert framing["detector"] == "dlib"
        (x0, y0, side), how = portrait_box(rgb, recipe)
        assert how.startswith("face crop (dlib box"), how
        assert max(abs(a - b) for a, b in zip((x0, y0, side), data_crop)) <= 3, ((x0, y0, side), data_crop)
        assert crop_portrait(rgb, SIZE, framing=recipe)[0].shape == (SIZE, SIZE, 3)
