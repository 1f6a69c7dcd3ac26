"""Turn a folder of real talking-head videos into the prepared data set layout.

Per video: decode with ffmpeg to 25 fps and 16 kHz mono, skip it when the
track is missing, all zero or near silent, crop a fixed square around the
face (median face box of a few sampled frames), resize to S x S, bring the
speech to one loudness (``audio.normalize_loudness``) and compute the audio
features. With the optional ``prepare`` extra (``pip install dlib-bin
face_recognition_models``) every frame gets 68 facial landmarks, from which
come the pose (``cv2.solvePnP`` on a generic 3-D face), blink (eye aspect
ratio), a per-frame mouth box and a clip-level one, all lightly smoothed in
time (:func:`smooth_track`); without it only scale/tx/ty are measured (from
the face box), the rest is zero and there is no mouth box, which
``manifest.json`` records honestly.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from microscope_pl.data.audio import (LOUDNESS_TARGET_DBFS, SAMPLE_RATE, SILENCE_DBFS, AudioFeatureExtractor,
                                      load_audio, normalize_loudness, rms_dbfs, speech_level_dbfs, write_wav)
from microscope_pl.data.video_io import VideoWriter, mux_audio

FPS = 25
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp"}
EXTRA_HINT = "pip install dlib-bin face_recognition_models  (the 'prepare' extra)"
PREPARE_VERSION = 2  # clips prepared by an older version are prepared again on resume
CROP_OFFSET = (0.0, 0.1)  # crop centre = face box centre + offset * (w, h): keep the chin, trim the hair
SMOOTH_WINDOW, SMOOTH_ORDER = 5, 2  # Savitzky-Golay over 5 frames (200 ms at 25 fps), quadratic
MOUTH_MARGIN = (0.2, 0.3)  # mouth box = lip box grown by these shares of the lip width (x, y) on each side
MOUTH_ENVELOPE = 2.0  # clip-level mouth box: 2nd / 98th percentile of the per-frame box edges
MIN_FACE_FRACTION = 0.5  # skip a video whose face the detector finds in fewer frames
LIPS = slice(48, 68)

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
        self.last_source = ""  # "dlib" or "haar": which detector found the boxes of the last detect()
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
        self.last_source = ""
        if self.dlib_detector is not None:
            boxes = [(r.left(), r.top(), r.width(), r.height()) for r in self.dlib_detector(rgb, 0)]
            self.last_source = "dlib" if boxes else ""
        if not boxes and self.haar is not None:
            k = min(1.0, 160.0 / min(rgb.shape[:2])) if large_face else 1.0
            gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            if k < 1.0:
                gray = cv2.resize(gray, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
            gray = cv2.equalizeHist(gray)
            side = max(24, min(gray.shape[:2]) // (5 if large_face else 10))
            found = self.haar.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
            boxes = [tuple(float(v) / k for v in b) for b in found]
            self.last_source = "haar" if boxes else ""
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


# ---------------------------------------------------------------- face tracks (landmarks -> pose, blink, mouth)


def smooth_track(x: np.ndarray, window: int = SMOOTH_WINDOW, order: int = SMOOTH_ORDER) -> np.ndarray:
    """Light temporal smoothing of a per-frame track ``[T, ...]``: Savitzky-Golay along axis 0.

    A centred ``window``-frame polynomial fit of degree ``order`` (5 frames,
    quadratic: it removes landmark jitter but keeps a 3-frame blink or a
    syllable's mouth opening). Tracks shorter than the window are returned as
    they are.
    """
    from scipy.signal import savgol_filter

    x = np.asarray(x, np.float64)
    if x.shape[0] < window:
        return x.copy()
    return savgol_filter(x, window, order, axis=0, mode="interp")


def mouth_boxes(points: np.ndarray, size: int, margin: tuple[float, float] = MOUTH_MARGIN) -> np.ndarray:
    """Per-frame mouth boxes ``[T, 4]`` (x0, y0, x1, y1) from landmarks ``[T, 68, 2]`` in S x S pixels.

    The box of the lip points (48-67) grown by ``margin`` times the lip width
    on each side, smoothed with :func:`smooth_track`, then widened where
    needed so it still holds that frame's lip points; clipped to the frame.
    """
    lips = np.asarray(points, np.float64)[:, LIPS]
    tight = np.concatenate([lips.min(axis=1), lips.max(axis=1)], axis=1)  # [T, 4]
    width = (tight[:, 2] - tight[:, 0])[:, None]
    grow = np.concatenate([-width * margin[0], -width * margin[1], width * margin[0], width * margin[1]], axis=1)
    boxes = smooth_track(tight + grow)
    boxes[:, :2] = np.minimum(boxes[:, :2], tight[:, :2] - 1.0)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], tight[:, 2:] + 1.0)
    return np.clip(boxes, 0.0, float(size)).astype(np.float32)


def clip_mouth_box(boxes: np.ndarray, size: int, envelope: float = MOUTH_ENVELOPE) -> list[int]:
    """One integer box for the whole clip from per-frame boxes ``[T, 4]``: a robust envelope.

    Each edge is the ``envelope``-th percentile outwards (2nd for x0, y0; 98th
    for x1, y1), so a few badly fitted frames do not blow the box up.
    """
    lo = np.percentile(boxes[:, :2], envelope, axis=0)
    hi = np.percentile(boxes[:, 2:], 100.0 - envelope, axis=0)
    x0, y0 = (int(np.clip(np.floor(v), 0, size - 1)) for v in lo)
    x1, y1 = (int(np.clip(np.ceil(v), 1, size)) for v in hi)
    return [x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)]


def _fill_missing(items: list[np.ndarray | None]) -> np.ndarray:
    """Stack per-frame arrays, holding the nearest earlier (else later) one where an entry is None."""
    first = next(v for v in items if v is not None)
    out, last = [], first
    for v in items:
        last = v if v is not None else last
        out.append(last)
    return np.stack(out)


def face_track(points: list[np.ndarray | None], boxes: list[tuple | None], work: int, size: int) -> dict:
    """Per-frame face arrays from the fitted landmarks (``work`` px) or, without them, the face boxes.

    Returns ``pose`` [T, 6] (yaw, pitch, roll in degrees; face width and
    centre offset as fractions of the frame), ``blink`` [T, 2] (EAR of the
    image-left and image-right eye) and, with landmarks, ``landmarks``
    [T, 68, 2], ``mouth_boxes`` [T, 4] (both in S x S output pixels) and
    ``mouth_open`` [T] (inner-lip gap over mouth width: about 0 closed,
    0.3-0.6 wide open). Frames without a fit hold the nearest fitted one;
    pose, blink and the mouth boxes are smoothed with :func:`smooth_track`,
    the landmarks are stored as fitted.
    """
    if any(p is not None for p in points):
        pts = _fill_missing(points)  # [T, 68, 2] in work pixels
        angles, guess = [], None
        for frame_pts in pts:
            a, solved = head_pose(frame_pts, work, guess)
            if solved is not None:
                guess = solved
            elif angles:
                a = angles[-1]
            angles.append(a)
        lo, hi = pts.min(axis=1), pts.max(axis=1)
        geometry = np.stack([(hi[:, 0] - lo[:, 0]) / work, (lo[:, 0] + hi[:, 0]) / 2 / work - 0.5,
                             (lo[:, 1] + hi[:, 1]) / 2 / work - 0.5], axis=1)
        pose = np.concatenate([np.asarray(angles, np.float64), geometry], axis=1)
        blink = np.array([[eye_aspect_ratio(p[36:42]), eye_aspect_ratio(p[42:48])] for p in pts])
        out_pts = (pts + 0.5) * (size / work) - 0.5  # pixel centres of the work frame -> of the S x S frame
        gap = np.linalg.norm(pts[:, [61, 62, 63]] - pts[:, [67, 66, 65]], axis=-1).mean(axis=1)
        return {"pose": smooth_track(pose).astype(np.float32), "blink": smooth_track(blink).astype(np.float32),
                "landmarks": out_pts.astype(np.float32), "mouth_boxes": mouth_boxes(out_pts, size),
                "mouth_open": gap / np.maximum(np.linalg.norm(pts[:, 54] - pts[:, 48], axis=-1), 1e-6)}
    b = np.array([v if v is not None else (0.0, 0.0, work, work) for v in boxes], np.float64).reshape(-1, 4)
    geometry = np.stack([b[:, 2] / work, (b[:, 0] + b[:, 2] / 2) / work - 0.5,
                         (b[:, 1] + b[:, 3] / 2) / work - 0.5], axis=1)
    pose = np.concatenate([np.zeros((len(b), 3)), smooth_track(geometry)], axis=1)
    return {"pose": pose.astype(np.float32), "blink": np.zeros((len(b), 2), np.float32)}


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


def _frames(path: Path, filters: str, width: int, height: int, limit: float | None = None):
    """Yield uint8 ``[height, width, 3]`` frames decoded by ffmpeg through ``filters`` (the first
    ``limit`` seconds when given)."""
    head = ["-t", f"{limit:.3f}"] if limit else []
    cmd = ["ffmpeg", "-nostdin", "-v", "error", *head, "-i", str(path), "-an", "-sn", "-vf", filters,
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
    """Square crop ``(x, y, side)`` in source pixels, a note and the framing recipe; ``None`` crop when no
    face (detect mode).

    The recipe: the median face box ``(x, y, w, h)`` of up to 40 sampled frames
    (dlib boxes when dlib found any, else haar ones: the two frame a face
    differently), ``side = scale * max(w, h)``, centred on the box centre plus
    ``offset * (w, h)``, shifted (not shrunk) to stay inside the frame.
    """
    width, height = info["width"], info["height"]
    centre = ((width - min(width, height)) // 2 // 2 * 2, (height - min(width, height)) // 2 // 2 * 2,
              _even(min(width, height)))
    centred = {"detector": "center", "scale": None, "offset": None, "reference": "frame"}
    if face_crop == "center":
        return centre, "centre crop (face_crop='center')", centred
    if not tools.has_detector:
        if face_crop == "detect":
            return None, f"no face detector available ({EXTRA_HINT} or opencv-python-headless<5)", centred
        return centre, "no face detector available; centre crop", centred
    k = min(1.0, 640.0 / max(width, height))
    sw, sh = _even(width * k), _even(height * k)
    rate = max(0.05, min(2.0, 40.0 / max(info["duration"], 1e-3)))  # about 40 sampled frames at most
    found_by: dict[str, list[np.ndarray]] = {"dlib": [], "haar": []}
    for frame in _frames(path, f"fps={rate:.4f},scale={sw}:{sh}", sw, sh, info.get("limit")):
        found = tools.detect(np.ascontiguousarray(frame))
        if found:
            found_by[tools.last_source].append(
                np.array(found[0]) / np.array([sw / width, sh / height, sw / width, sh / height]))
    detector = "dlib" if found_by["dlib"] else "haar"
    boxes = found_by[detector]
    if not boxes:
        if face_crop == "detect":
            return None, "no face detected", centred
        return centre, "no face detected; centre crop", centred
    x, y, w, h = np.median(np.stack(boxes), axis=0)
    side = min(crop_scale * max(w, h), width, height)
    cx, cy = x + w / 2 + CROP_OFFSET[0] * w, y + h / 2 + CROP_OFFSET[1] * h
    x0 = float(np.clip(cx - side / 2, 0, width - side))
    y0 = float(np.clip(cy - side / 2, 0, height - side))
    crop = (_even(x0), _even(y0), _even(side))
    framing = {"detector": detector, "scale": crop_scale, "offset": list(CROP_OFFSET), "reference": "box",
               "face_box": [round(float(v), 1) for v in (x, y, w, h)], "detections": len(boxes),
               "shifted": bool(abs(x0 - (cx - side / 2)) > 1 or abs(y0 - (cy - side / 2)) > 1)}
    return crop, f"face crop from {len(boxes)} {detector} detections", framing


# ---------------------------------------------------------------- one video


@dataclass(frozen=True)
class _Options:
    """The per-video settings of :func:`prepare` (documented there)."""

    size: int
    face_crop: str
    crop_scale: float
    min_seconds: float
    max_seconds: float | None
    silence_dbfs: float
    loudness_target: float
    min_face_fraction: float


def _speech(path: Path, info: dict, opts: _Options) -> np.ndarray:
    """The decoded 16 kHz mono track; ValueError (the skip reason) for none, all zero, near silent, too short."""
    if not info["has_audio"]:
        raise ValueError("no audio track")
    if info["duration"] and info["duration"] < opts.min_seconds:
        raise ValueError(f"too short ({info['duration']:.2f} s < {opts.min_seconds} s)")
    wave = load_audio(path, SAMPLE_RATE)
    if opts.max_seconds:
        wave = wave[:int(round(opts.max_seconds * SAMPLE_RATE))]
    if not np.any(wave):
        raise ValueError("all-zero audio track")
    level = rms_dbfs(wave)
    if level < opts.silence_dbfs:
        raise ValueError(f"near-silent audio track (RMS {level:.1f} dBFS < {opts.silence_dbfs:g} dBFS)")
    return wave


def _process(path: Path, folder: Path, name: str, tools: FaceTools, extractor: AudioFeatureExtractor,
             opts: _Options) -> dict:
    """Write one prepared video into ``folder``; raises ValueError with a one-line reason to skip it."""
    info = probe(path)
    if opts.max_seconds:
        info = {**info, "limit": opts.max_seconds, "duration": min(info["duration"] or opts.max_seconds,
                                                                    opts.max_seconds)}
    wave = _speech(path, info, opts)
    size = opts.size
    crop, note, framing = choose_crop(path, info, tools, opts.face_crop, opts.crop_scale)
    if crop is None:
        raise ValueError(note)
    x0, y0, side = crop
    work = max(size, 256)  # detect and fit landmarks at >= 256 px even for small outputs
    filters = f"fps={FPS},crop={side}:{side}:{x0}:{y0},scale={work}:{work}:flags=area"
    points: list[np.ndarray | None] = []
    boxes: list[tuple | None] = []
    hits = 0
    det_box: tuple | None = None
    det_centre: np.ndarray | None = None  # landmark centroid of the frame det_box was detected in
    last_pts: np.ndarray | None = None
    silent = folder / "video_noaudio.mp4"
    with VideoWriter(silent, FPS, size, crf=18) as writer:
        for frame in _frames(path, filters, work, work, info.get("limit")):
            frame = np.ascontiguousarray(frame)
            small = frame if work == size else cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
            writer.write(small)
            found = tools.detect(frame, large_face=True) if tools.has_detector else []
            box = det_box
            if found:
                hits += 1
                box = det_box = found[0]
            elif det_box is not None and det_centre is not None and last_pts is not None:
                # Missed (a turned head, a hand): follow the face by the landmarks' motion since the detection.
                dx, dy = last_pts.mean(axis=0) - det_centre
                box = (det_box[0] + dx, det_box[1] + dy, det_box[2], det_box[3])
            pts = tools.landmarks(frame, box) if box is not None and tools.has_landmarks else None
            if pts is not None:
                if found:
                    det_centre = pts.mean(axis=0)
                last_pts = pts
            points.append(pts)
            boxes.append(box)
    frames = writer.frames_written
    if frames < opts.min_seconds * FPS:
        raise ValueError(f"too short ({frames} frames < {opts.min_seconds} s at {FPS} fps)")
    if tools.has_detector and hits < opts.min_face_fraction * frames:
        raise ValueError(f"no face: found in {hits} of {frames} frames (< {opts.min_face_fraction:.0%})")
    track = face_track(points, boxes, work, size)
    # Audio of exactly the frame span: frame t owns samples [t * 640, (t + 1) * 640).
    need = frames * SAMPLE_RATE // FPS
    wave = np.pad(wave[:need], (0, max(0, need - wave.size)))
    source_level = speech_level_dbfs(wave)
    wave = write_wav(folder / "audio.wav", normalize_loudness(wave, opts.loudness_target))
    mux_audio(silent, wave, folder / "video.mp4")
    silent.unlink()
    np.save(folder / "audio_feats.npy", extractor(wave, frames).astype(np.float32))
    np.save(folder / "pose.npy", track["pose"])
    np.save(folder / "blink.npy", track["blink"])
    mouth_box, mouth_open = None, None
    if "landmarks" in track:
        np.save(folder / "landmarks.npy", track["landmarks"])
        np.save(folder / "mouth_boxes.npy", track["mouth_boxes"])
        mouth_box = clip_mouth_box(track["mouth_boxes"], size)
        mouth_open = [round(float(v), 4) for v in track["mouth_open"]]
    meta = {"frames": frames, "fps": FPS, "size": size, "identity": name,
            "mouth_box": mouth_box, "mouth_open": mouth_open, "source_file": path.name, "crop": [x0, y0, side],
            "framing": framing, "landmarks": "dlib68" if "landmarks" in track else None,
            "pose_source": "landmarks" if "landmarks" in track else "box",
            "blink_source": "landmarks" if "landmarks" in track else "none",
            "face_missed_frames": frames - hits, "landmark_held_frames": sum(p is None for p in points),
            "speech_level_dbfs": {"source": round(source_level, 2), "stored": round(speech_level_dbfs(wave), 2)},
            "prepare_version": PREPARE_VERSION, "note": note}
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
            silence_dbfs: float = SILENCE_DBFS, loudness_target: float = LOUDNESS_TARGET_DBFS,
            min_face_fraction: float = MIN_FACE_FRACTION, max_seconds: float | None = None,
            verbose: bool = True) -> dict:
    """Prepare every video under ``src`` into ``out``; returns the report (also ``out/report.json``).

    Videos already present in ``out`` are kept (resumable; those prepared by
    an older version of this code are prepared again). Skipped with a one-line
    reason: unreadable files, no audio stream, an all-zero track or one whose
    RMS is below ``silence_dbfs``, no face (the detector finds one in fewer
    than ``min_face_fraction`` of the frames, or, with ``face_crop="detect"``,
    in none of the sampled frames), shorter than ``min_seconds``.
    ``face_crop``: "auto" (detect, else centre crop with a note), "detect", "center".
    ``landmarks``: "auto" (dlib if installed), "dlib" (required), "none".
    ``crop_scale``: crop side over the face box side (see :func:`choose_crop`).
    ``loudness_target``: gated speech level in dBFS of every stored track
    (``audio.normalize_loudness``). ``max_seconds``: keep only the first
    seconds of each video (None: all).
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ValueError(f"source folder {src} does not exist")
    if face_crop not in ("auto", "detect", "center"):
        raise ValueError(f"face_crop must be 'auto', 'detect' or 'center', got {face_crop!r}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32, got {size}")
    if crop_scale <= 0:
        raise ValueError(f"crop_scale must be positive, got {crop_scale}")
    if max_seconds is not None and max_seconds < min_seconds:
        raise ValueError(f"max_seconds={max_seconds} is below min_seconds={min_seconds}")
    opts = _Options(size, face_crop, crop_scale, min_seconds, max_seconds, silence_dbfs, loudness_target,
                    min_face_fraction)
    if (out / "manifest.json").is_file():  # a resumed folder: the settings that shape every clip must agree
        old = json.loads((out / "manifest.json").read_text())
        for key, was, value in (("size", old.get("size"), size),
                                ("audio_features", old.get("audio_features"), audio_features),
                                ("crop_scale", old.get("framing", {}).get("scale", crop_scale), crop_scale),
                                ("loudness_target", old.get("loudness", {}).get("target_dbfs", loudness_target),
                                 loudness_target)):
            if was != value:
                raise ValueError(f"{out} was prepared with {key}={was!r} but {key}={value!r} was asked; "
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
            if json.loads((final / "meta.json").read_text()).get("prepare_version") == PREPARE_VERSION:
                report["existing"].append(name)
                continue
            if verbose:
                print(f"redo {path.name}: prepared by an older version (no landmarks or mouth box)")
        tmp = out / "videos" / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            meta = _process(path, tmp, name, tools, extractor, opts)
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
    metas = [json.loads((out / "videos" / n / "meta.json").read_text()) for n in names]
    sources = {m.get("pose_source", "box") for m in metas}
    pose_source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "none")
    detectors = sorted({m.get("framing", {}).get("detector", "unknown") for m in metas})
    train, test = split_names(names, test_fraction)
    manifest = {"format": "microscope-pl/1", "source": "prepared", "fps": FPS, "sample_rate": SAMPLE_RATE,
                "size": size, "audio_features": audio_features, "audio_dim": extractor.dim,
                "train": train, "test": test, "pose_source": pose_source,
                "blink_source": {"landmarks": "landmarks", "box": "none"}.get(pose_source, pose_source),
                "landmarks": "dlib68" if metas and all(m.get("landmarks") for m in metas) else None,
                # How each clip was framed (per clip: meta.json "crop" in source pixels and "framing"):
                # side = scale * max(w, h) of the median face box, centre = box centre + offset * (w, h).
                "framing": {"detector": detectors[0] if len(detectors) == 1 else "mixed", "scale": crop_scale,
                            "offset": list(CROP_OFFSET), "reference": "box"},
                "loudness": {"target_dbfs": loudness_target, "function": "microscope_pl.data.audio.normalize_loudness",
                             "measure": "gated RMS (BS.1770 gating, no K-weighting)",
                             "silence_dbfs": silence_dbfs},
                "smoothing": {"method": "savgol", "window": SMOOTH_WINDOW, "order": SMOOTH_ORDER},
                "max_seconds": max_seconds}
    report.update({"train": len(train), "test": len(test), "pose_source": manifest["pose_source"],
                   "blink_source": manifest["blink_source"]})
    for fname, payload in (("manifest.json", manifest), ("report.json", report)):
        tmp_file = out / f".{fname}.tmp"
        tmp_file.write_text(json.dumps(payload, indent=1))
        os.replace(tmp_file, out / fname)
    return report
