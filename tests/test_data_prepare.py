"""data.prepare on small real-format inputs built with ffmpeg: one good video, three bad ones."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from microscope_pl.data.audio import load_audio, read_wav, speech_level_dbfs
from microscope_pl.data.face_track import eye_aspect_ratio
from microscope_pl.data.prepare import FaceTools, prepare, split_names
from microscope_pl.data.video_io import video_info


def _portrait_frames(n: int, fps: int) -> np.ndarray:
    """The astronaut photo slowly panned inside a 320x240 window -> uint8 [n, 240, 320, 3]."""
    from skimage.data import astronaut

    photo = cv2.resize(astronaut(), (400, 400), interpolation=cv2.INTER_AREA)
    frames = []
    for i in range(n):
        dx = int(round(20 + 20 * i / max(n - 1, 1)))
        frames.append(photo[10:250, dx:dx + 320])
    return np.stack(frames)


def _encode(path: Path, frames: np.ndarray | None, fps: int, audio: bool, faststart: bool = True,
            seconds: float = 2.0) -> None:
    """mp4 from raw frames plus an optional 44.1 kHz stereo tone (ffmpeg)."""
    h, w = frames.shape[1:3]
    cmd = ["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
           "-r", str(fps), "-i", "pipe:0"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=330:sample_rate=44100:duration={seconds}",
                "-ac", "2", "-ar", "44100", "-c:a", "aac"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if faststart:
        cmd += ["-movflags", "+faststart"]
    subprocess.run(cmd + [str(path)], input=frames.tobytes(), check=True)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    frames = _portrait_frames(60, 30)
    _encode(raw / "good.mp4", frames, 30, audio=True)
    _encode(raw / "silent.mp4", frames[:40], 30, audio=False)
    full = raw / "full_no_faststart.mp4"
    _encode(full, frames, 30, audio=True, faststart=False)
    data = full.read_bytes()
    (raw / "truncated.mp4").write_bytes(data[: len(data) // 3])  # moov atom is at the end: cut off
    full.unlink()
    (raw / "notes.mp4").write_text("this is a text file, not a video\n")
    # A test pattern with a tone: sound but no face.
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-v", "error", "-f", "lavfi", "-i", "testsrc=size=160x120:rate=25:d=2",
                    "-f", "lavfi", "-i", "sine=frequency=330:sample_rate=44100:duration=2", "-c:v", "libx264",
                    "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", str(raw / "pattern.mp4")], check=True)
    return raw


def test_haar_or_dlib_finds_the_test_face() -> None:
    tools = FaceTools(landmarks="none")
    assert tools.has_detector, "no face detector: install opencv-python-headless<5 (haar cascades) or dlib-bin"
    boxes = tools.detect(np.ascontiguousarray(_portrait_frames(1, 30)[0]))
    assert boxes, "the detector should find the astronaut's face"


def test_prepare_good_and_bad_videos(raw_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    report = prepare(raw_dir, out, size=64, verbose=False)
    assert report["processed"] == ["good"]
    reasons = {Path(s["file"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"silent.mp4", "truncated.mp4", "notes.mp4", "pattern.mp4"}
    assert "no audio" in reasons["silent.mp4"]
    assert reasons["pattern.mp4"].startswith("no face: found in 0 of 50 frames"), reasons["pattern.mp4"]
    assert all(r and "\n" not in r for r in reasons.values())
    assert json.loads((out / "report.json").read_text())["skipped"] == report["skipped"]

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "microscope-pl/1" and manifest["source"] == "prepared"
    assert manifest["audio_dim"] == 80 and manifest["size"] == 64
    assert manifest["train"] + manifest["test"] == ["good"]
    folder = out / "videos" / "good"
    meta = json.loads((folder / "meta.json").read_text())
    info = video_info(folder / "video.mp4")
    assert info.fps == pytest.approx(25.0)
    assert (info.width, info.height) == (64, 64)
    assert abs(info.frames - 50) <= 1 and meta["frames"] == info.frames
    wave, rate = read_wav(folder / "audio.wav")
    assert rate == 16000 and wave.size == meta["frames"] * 640
    track = load_audio(folder / "video.mp4")
    assert abs(track.size - wave.size) / 16000 < 0.05
    assert np.load(folder / "audio_feats.npy").shape == (meta["frames"], 80)
    pose, blink = np.load(folder / "pose.npy"), np.load(folder / "blink.npy")
    assert pose.shape == (meta["frames"], 6) and blink.shape == (meta["frames"], 2)
    assert pose.dtype == np.float32 and np.isfinite(pose).all()
    assert 0.1 < float(np.median(pose[:, 3])) < 0.9, "face box width as a fraction of the frame"
    assert "face crop" in meta["note"], meta["note"]
    assert manifest["pose_source"] == meta["pose_source"]
    if meta["pose_source"] == "landmarks":
        assert np.abs(pose[:, :3]).max() < 45 and 0.1 < float(np.median(blink)) < 0.5
        points, boxes = np.load(folder / "landmarks.npy"), np.load(folder / "mouth_boxes.npy")
        assert points.shape == (meta["frames"], 68, 2) and boxes.shape == (meta["frames"], 4)
        lips = points[:, 48:68]
        assert np.all(boxes[:, :2] <= lips.min(axis=1)) and np.all(boxes[:, 2:] >= lips.max(axis=1))
        x0, y0, x1, y1 = meta["mouth_box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and len(meta["mouth_open"]) == meta["frames"]
        assert manifest["landmarks"] == meta["landmarks"] == "dlib68"
    else:
        assert np.all(pose[:, :3] == 0) and np.all(blink == 0)
        assert meta["mouth_box"] is None and not (folder / "landmarks.npy").exists()
    assert meta["framing"]["detector"] in ("dlib", "haar") and meta["framing"]["scale"] == 2.2
    assert manifest["framing"]["detector"] == meta["framing"]["detector"] and len(meta["crop"]) == 3
    wave_level = speech_level_dbfs(wave)
    assert wave_level == pytest.approx(manifest["loudness"]["target_dbfs"], abs=0.3)

    # Resumable: a second run keeps the prepared video and skips the bad ones again.
    again = prepare(raw_dir, out, size=64, verbose=False)
    assert again["existing"] == ["good"] and again["processed"] == []
    # A clip prepared by an older version (no landmarks, no mouth box) is prepared again.
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "prepare_version"}))
    redo = prepare(raw_dir, out, size=64, verbose=False)
    assert redo["processed"] == ["good"] and "prepare_version" in json.loads((folder / "meta.json").read_text())
    with pytest.raises(ValueError, match="crop_scale"):
        prepare(raw_dir, out, size=64, crop_scale=1.8, verbose=False)
    with pytest.raises(ValueError, match="size"):
        prepare(raw_dir, out, size=128, verbose=False)


def test_prepare_without_landmarks_is_honest(raw_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "clip.mp4").write_bytes((raw_dir / "good.mp4").read_bytes())
    out = tmp_path / "out"
    report = prepare(src, out, size=32, landmarks="none", face_crop="center", verbose=False)
    assert report["processed"] == ["clip"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pose_source"] == "box" and manifest["blink_source"] == "none"
    assert np.all(np.load(out / "videos" / "clip" / "blink.npy") == 0)


def test_split_and_ear_helpers() -> None:
    names = [f"v{i:02d}" for i in range(20)]
    train, test = split_names(names)
    assert len(test) == 2 and not set(train) & set(test) and split_names(names) == (train, test)
    assert split_names(["only"]) == (["only"], [])
    eye = np.array([[0, 0], [1, -0.3], [2, -0.3], [3, 0], [2, 0.3], [1, 0.3]], np.float64)
    assert eye_aspect_ratio(eye) == pytest.approx(0.2)
