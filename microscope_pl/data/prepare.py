"""Turn a folder of real talking-head videos into the prepared data set layout.

Per video: decode with ffmpeg to 25 fps and 16 kHz mono, crop a fixed square
around the face (median face box of a few sampled frames), resize to S x S,
and estimate per-frame pose and blink. With the optional ``prepare`` extra
(``pip install dlib-bin face_recognition_models``) pose comes from 68 facial
landmarks via ``cv2.solvePnP`` on a generic 3-D face, and blink is the eye
aspect ratio; without it only scale/tx/ty are measured (from the face box) and
the rest is zero, which ``manifest.json`` records honestly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from microscope_pl.data.audio import SAMPLE_RATE, AudioFeatureExtractor, load_audio, write_wav
from microscope_pl.data.video_io import VideoWriter, mux_audio

FPS = 25
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp"}
EXTRA_HINT = "pip install dlib-bin face_recognition_models  (the 'prepare' extra)"

# A generic head (mm, nose tip at the origin) in the camera convention x right, y down,
# z away from the camera, so a frontal face gives R = I. dlib 68-point indices.
_MODEL_POINTS = np.array([
    [0.0, 0.0, 0.0],  # 30 nose tip
    [0.0, 330.0, 65.0],  # 8 chin
    [-225.0, -170.0, 135.0],  # 36 outer corner of the image-left eye
    [225.0, -170.0, 135.0],  # 45 outer corner of the image-right eye
    [-150.0, 150.0, 125.0],  # 48 image-left mouth corner
    [150.0, 150.0, 125.0],  # 54 image-right mouth corner
], np.float64)
_MODEL_INDICES = [30, 8, 36, 45, 48, 54]


# ---------------------------------------------------------------- detectors


class FaceTools:
    """Face box detector (OpenCV haar cascade or dlib HOG) and optional dlib 68-point landmarks."""

    def __init__(self, landmarks: str = "auto", landmark_model: str | Path | None = None) -> None:
        if landmarks not in ("auto", "dlib", "none"):
            raise ValueError(f"landmarks must be 'auto', 'dlib' or 'none', got {landmarks!r}")
        self.haar: Any = None
        if hasattr(cv2, "CascadeClassifier") and hasattr(cv2, "data"):
            xml = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
            if xml.is_file():
                self.haar = cv2.CascadeClassifier(str(xml))
        self.dlib_detector: Any = None
        self.predictor: Any = None
        self.missing = ""
        if landmarks != "none":
            self._load_dlib(landmark_model)
            if landmarks == "dlib" and self.predictor is None:
                raise ValueError(f"landmarks='dlib' but {self.missing}; {EXTRA_HINT}")

    def _load_dlib(self, landmark_model: str | Path | None) -> None:
        try:
            import dlib
        except ImportError:
            self.missing = "dlib is not installed"
            return
        self.dlib_detector = dlib.get_frontal_face_detector()
        path = Path(landmark_model) if landmark_model else None
        if path is None:
            # Locate the model file without importing face_recognition_models (it needs pkg_resources).
            spec = importlib.util.find_spec("face_recognition_models")
            if spec is not None and spec.submodule_search_locations:
                package = Path(list(spec.submodule_search_locations)[0])
                path = package / "models" / "shape_predictor_68_face_landmarks.dat"
        if path is None or not path.is_file():
            self.missing = f"no 68-point landmark model ({path or 'face_recognition_models not installed'})"
            return
        self.predictor = dlib.shape_predictor(str(path))
        self._dlib = dlib

    @property
    def has_detector(self) -> bool:
        return self.haar is not None or self.dlib_detector is not None

    @property
    def has_landmarks(self) -> bool:
        return self.predictor is not None

    def detect(self, rgb: np.ndarray, large_face: bool = False) -> list[tuple[float, float, float, float]]:
        """Face boxes ``(x, y, w, h)`` in pixels, largest first.

        ``large_face``: the face fills a good part of the image (a face-centred
        crop), so the haar cascade may run on a 160 px copy, ~3x faster.
        """
        boxes: list[tuple[float, float, float, float]] = []
        if self.dlib_detector is not None:
            boxes = [(r.left(), r.top(), r.width(), r.height()) for r in self.dlib_detector(rgb, 0)]
        if not boxes and self.haar is not None:
            k = min(1.0, 160.0 / min(rgb.shape[:2])) if large_face else 1.0
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            if k < 1.0:
                gray = cv2.resize(gray, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
            gray = cv2.equalizeHist(gray)
            side = max(24, min(gray.shape[:2]) // (5 if large_face else 10))
            found = self.haar.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
            boxes = [tuple(float(v) / k for v in b) for b in found]
        return sorted(boxes, key=lambda b: -b[2] * b[3])

    def landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """68 landmarks ``[68, 2]`` inside ``box``."""
        x, y, w, h = (int(round(v)) for v in box)
        shape = self.predictor(rgb, self._dlib.rectangle(x, y, x + w, y + h))
        return np.array([[p.x, p.y] for p in shape.parts()], np.float64)


def eye_aspect_ratio(eye: np.ndarray) -> float:
    """EAR of six eye landmarks ``[6, 2]``: (|p1 - p5| + |p2 - p4|) / (2 |p0 - p3|)."""
    vertical = np.linalg.norm(eye[1] - eye[5]) + np.linalg.norm(eye[2] - eye[4])
    return float(vertical / max(2.0 * np.linalg.norm(eye[0] - eye[3]), 1e-6))


def head_pose(points: np.ndarray, size: int, guess: tuple[np.ndarray, np.ndarray] | None = None):
    """(yaw, pitch, roll) in degrees from 68 landmarks, with R = Rz(roll) Ry(yaw) Rx(pitch).

    Returns the angles and (rvec, tvec) to seed the next frame's solve.
    """
    image_points = points[_MODEL_INDICES].astype(np.float64)
    camera = np.array([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]], np.float64)
    if guess is None:
        guess = (np.zeros((3, 1)), np.array([[0.0], [0.0], [1000.0]]))
    ok, rvec, tvec = cv2.solvePnP(_MODEL_POINTS, image_points, camera, None, guess[0].copy(), guess[1].copy(),
                                  useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok:
        return (0.0, 0.0, 0.0), None
    r, _ = cv2.Rodrigues(rvec)
    yaw = -math.degrees(math.asin(float(np.clip(r[2, 0], -1, 1))))
    pitch = math.degrees(math.atan2(r[2, 1], r[2, 2]))
    roll = math.degrees(math.atan2(r[1, 0], r[0, 0]))
    return (yaw, pitch, roll), (rvec, tvec)


# ---------------------------------------------------------------- ffmpeg helpers


def probe(path: Path) -> dict:
    """ffprobe summary: width, height (as displayed), duration, has_audio. ValueError if unreadable."""
    cmd = ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ValueError(f"unreadable ({err[-1] if err else 'ffprobe failed'})")
    info = json.loads(proc.stdout or b"{}")
    streams = info.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    if video is None or not video.get("width"):
        raise ValueError("unreadable (no video stream)")
    width, height = int(video["width"]), int(video["height"])
    rotation = int(float(video.get("tags", {}).get("rotate", 0) or 0))
    for side in video.get("side_data_list", []):
        rotation = int(float(side.get("rotation", rotation) or 0))
    if abs(rotation) % 180 == 90:  # ffmpeg auto-rotates while decoding
        width, height = height, width
    duration = float(info.get("format", {}).get("duration", 0) or video.get("duration", 0) or 0)
    return {"width": width, "height": height, "duration": duration,
            "has_audio": any(s.get("codec_type") == "audio" for s in streams)}


def _frames(path: Path, filters: str, width: int, height: int):
    """Yield uint8 ``[height, width, 3]`` frames decoded by ffmpeg through ``filters``."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-an", "-sn", "-vf", filters,
           "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    nbytes = width * height * 3
    try:
        assert proc.stdout is not None
        while True:
            buf = proc.stdout.read(nbytes)
            if len(buf) < nbytes:
                break
            yield np.frombuffer(buf, np.uint8).reshape(height, width, 3)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _even(v: float) -> int:
    return max(2, int(v) // 2 * 2)


def choose_crop(path: Path, info: dict, tools: FaceTools, face_crop: str, crop_scale: float):
    """Square crop ``(x, y, side)`` in source pixels and a note; ``None`` crop when no face (detect mode)."""
    width, height = info["width"], info["height"]
    centre = ((width - min(width, height)) // 2 // 2 * 2, (height - min(width, height)) // 2 // 2 * 2,
              _even(min(width, height)))
    if face_crop == "center":
        return centre, "centre crop (face_crop='center')"
    if not tools.has_detector:
        if face_crop == "detect":
            return None, f"no face detector available ({EXTRA_HINT} or opencv-python-headless<5)"
        return centre, "no face detector available; centre crop"
    k = min(1.0, 640.0 / max(width, height))
    sw, sh = _even(width * k), _even(height * k)
    rate = max(0.05, min(2.0, 40.0 / max(info["duration"], 1e-3)))  # about 40 sampled frames at most
    boxes = []
    for frame in _frames(path, f"fps={rate:.4f},scale={sw}:{sh}", sw, sh):
        found = tools.detect(np.ascontiguousarray(frame))
        if found:
            boxes.append(np.array(found[0]) / np.array([sw / width, sh / height, sw / width, sh / height]))
    if not boxes:
        if face_crop == "detect":
            return None, "no face detected"
        return centre, "no face detected; centre crop"
    x, y, w, h = np.median(np.stack(boxes), axis=0)
    side = min(crop_scale * max(w, h), width, height)
    cx, cy = x + w / 2, y + h / 2 + 0.1 * h  # a little below the box centre: keep the chin, trim the hair
    x0 = float(np.clip(cx - side / 2, 0, width - side))
    y0 = float(np.clip(cy - side / 2, 0, height - side))
    return (_even(x0), _even(y0), _even(side)), f"face crop from {len(boxes)} detections"


# ---------------------------------------------------------------- one video


def _process(path: Path, folder: Path, name: str, size: int, tools: FaceTools, extractor: AudioFeatureExtractor,
             face_crop: str, crop_scale: float, min_seconds: float) -> dict:
    """Write one prepared video into ``folder``; raises ValueError with a one-line reason to skip it."""
    info = probe(path)
    if not info["has_audio"]:
        raise ValueError("no audio track")
    if info["duration"] and info["duration"] < min_seconds:
        raise ValueError(f"too short ({info['duration']:.2f} s < {min_seconds} s)")
    wave = load_audio(path, SAMPLE_RATE)
    crop, note = choose_crop(path, info, tools, face_crop, crop_scale)
    if crop is None:
        raise ValueError(note)
    x0, y0, side = crop
    work = max(size, 256)  # detect and fit landmarks at >= 256 px even for small outputs
    filters = f"fps={FPS},crop={side}:{side}:{x0}:{y0},scale={work}:{work}:flags=area"
    pose, blink, misses = [], [], 0
    last_box: tuple[float, float, float, float] | None = None
    last_angles, last_ear, guess = (0.0, 0.0, 0.0), (0.0, 0.0), None
    silent = folder / "video_noaudio.mp4"
    with VideoWriter(silent, FPS, size, crf=18) as writer:
        for frame in _frames(path, filters, work, work):
            frame = np.ascontiguousarray(frame)
            small = frame if work == size else cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
            writer.write(small)
            found = tools.detect(frame, large_face=True) if tools.has_detector else []
            if found:
                last_box = found[0]
            else:
                misses += 1
            if last_box is not None and tools.has_landmarks:
                pts = tools.landmarks(frame, last_box)
                angles, solved = head_pose(pts, work, guess)
                if solved is not None:
                    last_angles, guess = angles, solved
                last_ear = (eye_aspect_ratio(pts[36:42]), eye_aspect_ratio(pts[42:48]))
            bx, by, bw, bh = last_box if last_box is not None else (0.0, 0.0, float(work), float(work))
            pose.append([*last_angles, bw / work, (bx + bw / 2) / work - 0.5, (by + bh / 2) / work - 0.5])
            blink.append(last_ear)
    frames = writer.frames_written
    if frames < min_seconds * FPS:
        raise ValueError(f"too short ({frames} frames < {min_seconds} s at {FPS} fps)")
    # Audio of exactly the frame span: frame t owns samples [t * 640, (t + 1) * 640).
    need = frames * SAMPLE_RATE // FPS
    wave = np.pad(wave[:need], (0, max(0, need - wave.size)))
    wave = write_wav(folder / "audio.wav", wave)
    mux_audio(silent, wave, folder / "video.mp4")
    silent.unlink()
    np.save(folder / "audio_feats.npy", extractor(wave, frames).astype(np.float32))
    np.save(folder / "pose.npy", np.asarray(pose, np.float32))
    np.save(folder / "blink.npy", np.asarray(blink, np.float32))
    meta = {"frames": frames, "fps": FPS, "size": size, "identity": name,
            "mouth_box": None, "mouth_open": None, "source_file": path.name, "crop": [x0, y0, side],
            "pose_source": "landmarks" if tools.has_landmarks else "box",
            "blink_source": "landmarks" if tools.has_landmarks else "none",
            "face_missed_frames": misses, "note": note}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------- data set


def split_names(names: list[str], test_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Deterministic train/test split by video: the ``round(n * test_fraction)`` (>= 1 when n >= 2)
    names with the smallest CRC32 go to test; adding videos rarely moves old ones."""
    names = sorted(names)
    if len(names) < 2:
        return names, []
    n_test = min(max(1, int(round(len(names) * test_fraction))), len(names) - 1)
    test = set(sorted(names, key=lambda n: (zlib.crc32(n.encode()), n))[:n_test])
    return [n for n in names if n not in test], [n for n in names if n in test]


def _safe_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "video"


def prepare(src: str | Path, out: str | Path, size: int = 256, audio_features: str = "logmel",
            face_crop: str = "auto", landmarks: str = "auto", test_fraction: float = 0.1,
            min_seconds: float = 1.0, crop_scale: float = 2.2, landmark_model: str | Path | None = None,
            verbose: bool = True) -> dict:
    """Prepare every video under ``src`` into ``out``; returns the report (also ``out/report.json``).

    Videos already present in ``out`` are kept (resumable); unreadable ones,
    those without audio, without a face (``face_crop="detect"``) or shorter
    than ``min_seconds`` are skipped with a one-line reason.
    ``face_crop``: "auto" (detect, else centre crop with a note), "detect", "center".
    ``landmarks``: "auto" (dlib if installed), "dlib" (required), "none".
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"source folder {src} does not exist")
    if face_crop not in ("auto", "detect", "center"):
        raise ValueError(f"face_crop must be 'auto', 'detect' or 'center', got {face_crop!r}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32, got {size}")
    old: dict = {}
    if (out / "manifest.json").is_file():
        old = json.loads((out / "manifest.json").read_text())
        for key, value in (("size", size), ("audio_features", audio_features)):
            if old.get(key) != value:
                raise ValueError(f"{out} was prepared with {key}={old.get(key)!r} but {key}={value!r} was asked; "
                                 "use another output folder")
    tools = FaceTools(landmarks, landmark_model)
    if not tools.has_landmarks and landmarks != "none" and verbose:
        print(f"note: {tools.missing}; pose will hold only scale/tx/ty and blink zeros. For landmarks: {EXTRA_HINT}")
    extractor = AudioFeatureExtractor(audio_features)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    report: dict[str, Any] = {"processed": [], "existing": [], "skipped": [], "notes": {}}
    used: set[str] = set()
    for path in files:
        name = base = _safe_name(path.stem)
        for i in range(2, 10_000):
            if name not in used:
                break
            name = f"{base}_{i}"
        used.add(name)
        final = out / "videos" / name
        if (final / "meta.json").is_file():
            report["existing"].append(name)
            continue
        tmp = out / "videos" / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            meta = _process(path, tmp, name, size, tools, extractor, face_crop, crop_scale, min_seconds)
        except (ValueError, RuntimeError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            report["skipped"].append({"file": str(path), "reason": reason})
            if verbose:
                print(f"skip {path.name}: {reason}")
            continue
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        report["processed"].append(name)
        report["notes"][name] = meta["note"]
        if verbose:
            print(f"ok   {path.name} -> {name} ({meta['frames']} frames, {meta['note']})")
    names = sorted(p.name for p in (out / "videos").iterdir()
                   if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file())
    sources = {json.loads((out / "videos" / n / "meta.json").read_text()).get("pose_source", "box") for n in names}
    pose_source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "none")
    train, test = split_names(names, test_fraction)
    manifest = {"format": "microscope-pl/1", "source": "prepared", "fps": FPS, "sample_rate": SAMPLE_RATE,
                "size": size, "audio_features": audio_features, "audio_dim": extractor.dim,
                "train": train, "test": test, "pose_source": pose_source,
                "blink_source": {"landmarks": "landmarks", "box": "none"}.get(pose_source, pose_source)}
    report.update({"train": len(train), "test": len(test), "pose_source": manifest["pose_source"],
                   "blink_source": manifest["blink_source"]})
    for fname, payload in (("manifest.json", manifest), ("report.json", report)):
        tmp_file = out / f".{fname}.tmp"
        tmp_file.write_text(json.dumps(payload, indent=1))
        os.replace(tmp_file, out / fname)
    return report
