"""Turn a folder of real talking-head videos into the prepared data set layout.

Per video: decode with ffmpeg to 25 fps and 16 kHz mono, skip it when the
track is missing, all zero or near silent, crop a fixed square around the
face (data/framing.py: the median face box of a few sampled frames), resize to S x S, bring the
speech to one loudness (``audio.normalize_loudness``) and compute the audio
features. With the optional ``prepare`` extra (``pip install dlib-bin
face_recognition_models``) every frame gets 68 facial landmarks, from which
come the pose (``cv2.solvePnP`` on a generic 3-D face), blink (eye aspect
ratio), a per-frame mouth box and a clip-level one, all lightly smoothed in
time (data/face_track.py); without it only scale/tx/ty are measured (from
the face box), the rest is zero and there is no mouth box, which
``manifest.json`` records honestly.
"""

from __future__ import annotations

import importlib.util
import json
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
from microscope_pl.data.face_track import SMOOTH_ORDER, SMOOTH_WINDOW, FaceFollower, clip_mouth_box, face_track
from microscope_pl.data.framing import CENTRE_FRAMING, FaceDetector, crop_box, crop_centre
from microscope_pl.data.video_io import VideoWriter, mux_audio

FPS = 25
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp"}
EXTRA_HINT = "pip install dlib-bin face_recognition_models  (the 'prepare' extra)"
PREPARE_VERSION = 2  # clips prepared by an older version are prepared again on resume
CROP_OFFSET = (0.0, 0.1)  # crop centre = face box centre + offset * (w, h): keep the chin, trim the hair
MIN_FACE_FRACTION = 0.5  # skip a video whose face the detector finds in fewer frames

# ---------------------------------------------------------------- detectors


class FaceTools(FaceDetector):
    """The face detector (framing.FaceDetector) and optional dlib 68-point landmarks."""

    def __init__(self, landmarks: str = "auto", landmark_model: str | Path | None = None) -> None:
        if landmarks not in ("auto", "dlib", "none"):
            raise ValueError(f"landmarks must be 'auto', 'dlib' or 'none', got {landmarks!r}")
        super().__init__(use_dlib=landmarks != "none")
        self.predictor: Any = None
        if self.dlib_detector is not None:
            self._load_predictor(landmark_model)
        if landmarks == "dlib" and self.predictor is None:
            raise ValueError(f"landmarks='dlib' but {self.missing}; {EXTRA_HINT}")

    def _load_predictor(self, landmark_model: str | Path | None) -> None:
        import dlib

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
    def has_landmarks(self) -> bool:
        return self.predictor is not None

    def landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
        """68 landmarks ``[68, 2]`` inside ``box``."""
        x, y, w, h = (int(round(v)) for v in box)
        shape = self.predictor(rgb, self._dlib.rectangle(x, y, x + w, y + h))
        return np.array([[p.x, p.y] for p in shape.parts()], np.float64)


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
    centred = dict(CENTRE_FRAMING)
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
    x0, y0, side = crop_box((x, y, w, h), width, height, crop_scale, CROP_OFFSET)
    crop = (_even(x0), _even(y0), _even(side))
    cx, cy = crop_centre((x, y, w, h), CROP_OFFSET)  # where the crop would sit if the frame allowed it
    framing = {"detector": detector, "scale": crop_scale, "offset": list(CROP_OFFSET), "reference": "box",
               "face_box": [round(float(v), 1) for v in (x, y, w, h)], "detections": len(boxes),
               "shifted": bool(abs(x0 + side / 2 - cx) > 1 or abs(y0 + side / 2 - cy) > 1)}
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
    follower = FaceFollower(tools)
    silent = folder / "video_noaudio.mp4"
    with VideoWriter(silent, FPS, size, crf=18) as writer:
        for frame in _frames(path, filters, work, work, info.get("limit")):
            frame = np.ascontiguousarray(frame)
            small = frame if work == size else cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
            writer.write(small)
            follower.add(frame)
    frames = writer.frames_written
    points, boxes, hits = follower.points, follower.boxes, follower.hits
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


def _assign_names(files: list[Path]) -> list[str]:
    """Clip names over the full sorted file list: the safe stem, then ``_2``, ``_3``... on collisions."""
    names: list[str] = []
    for path in files:
        name = base = _safe_name(path.stem)
        for i in range(2, 10_000):
            if name not in names:
                break
            name = f"{base}_{i}"
        names.append(name)
    return names


def in_shard(name: str, shard: tuple[int, int] | None) -> bool:
    """Whether clip ``name`` belongs to the 1-based shard ``(k, n)``: crc32(name) mod n == k - 1.

    It depends on the name only, so adding videos never moves old ones to another shard."""
    return shard is None or zlib.crc32(name.encode()) % shard[1] == shard[0] - 1


def _write_json(path: Path, payload: Any, indent: int | None = None) -> None:
    """Write ``path`` atomically (a temporary name, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=indent))
    os.replace(tmp, path)


def _skip_key(src: Path, path: Path, settings: dict) -> dict:
    """What a skip marker must match to be trusted: source file (relative path, size), version, settings."""
    return {"source": path.relative_to(src).as_posix(), "bytes": path.stat().st_size,
            "prepare_version": PREPARE_VERSION, "settings": settings}


def _remembered_skip(marker: Path, key: dict) -> str | None:
    """The reason stored in ``marker`` when it matches ``key`` (else None: prepare the video again)."""
    try:
        old = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return old.get("reason") if all(old.get(k) == v for k, v in key.items()) else None


_WORKER: dict[str, Any] = {}  # a pool worker's FaceTools and AudioFeatureExtractor (not picklable)


def _init_worker(landmarks: str, landmark_model: str | Path | None, audio_features: str, device: str,
                 threads: int) -> None:
    """Process-pool initializer: leave Ctrl-C to the parent, share the cores, build the tools once.

    Its own process group keeps the terminal's Ctrl-C from this worker's ffmpeg too (a killed decoder
    would read as a skip); the parent stops the workers instead."""
    import signal

    import torch

    if hasattr(os, "setpgrp"):
        os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        _WORKER["tools"] = FaceTools(landmarks, landmark_model)
        _WORKER["extractor"] = AudioFeatureExtractor(audio_features, device)
    except Exception as exc:  # noqa: BLE001 - raised again by every task, so the parent reports it
        _WORKER["error"] = exc


def _prepare_one(path: Path, tmp: Path, name: str, opts: _Options, tools: FaceTools | None = None,
                 extractor: AudioFeatureExtractor | None = None) -> tuple[str, Any]:
    """Prepare one video into the folder ``tmp``: ``("ok", meta)`` or ``("skip", one-line reason)``.

    Without ``tools``/``extractor`` it uses the pool worker's. ``tmp`` is removed unless ok."""
    if tools is None or extractor is None:
        if "error" in _WORKER:
            raise _WORKER["error"]
        tools, extractor = _WORKER["tools"], _WORKER["extractor"]
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return "ok", _process(path, tmp, name, tools, extractor, opts)
    except (ValueError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        text = str(exc).strip()
        return "skip", text.splitlines()[0] if text else type(exc).__name__
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run_pool(jobs: list[tuple[Path, Path, str]], opts: _Options, workers: int, init_args: tuple,
              finish: Any) -> None:
    """Run ``_prepare_one`` over ``jobs`` (path, tmp, name) in spawned processes; ``finish(k, status, payload)``
    is called in the parent as each job completes. On any exception or Ctrl-C the workers are stopped, no
    further clip is promoted and every job's ``tmp`` folder is removed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=init_args)
    futures: dict[Any, int] = {}
    try:
        futures = {pool.submit(_prepare_one, path, tmp, name, opts): k for k, (path, tmp, name) in enumerate(jobs)}
        for future in as_completed(futures):
            finish(futures[future], *future.result())
    except BaseException:
        for future in futures:
            future.cancel()
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for _, tmp, _ in jobs:
            shutil.rmtree(tmp, ignore_errors=True)


def prepare(src: str | Path, out: str | Path, size: int = 256, audio_features: str = "logmel",
            face_crop: str = "auto", landmarks: str = "auto", test_fraction: float = 0.1,
            min_seconds: float = 1.0, crop_scale: float = 2.2, landmark_model: str | Path | None = None,
            silence_dbfs: float = SILENCE_DBFS, loudness_target: float = LOUDNESS_TARGET_DBFS,
            min_face_fraction: float = MIN_FACE_FRACTION, max_seconds: float | None = None,
            workers: int = 1, device: str = "cpu", shard: tuple[int, int] | None = None,
            verbose: bool = True) -> dict:
    """Prepare every video under ``src`` into ``out``; returns the report (also ``out/report.json``).

    Videos already present in ``out`` are kept (resumable; those prepared by
    an older version of this code are prepared again). Skipped with a one-line
    reason: unreadable files, no audio stream, an all-zero track or one whose
    RMS is below ``silence_dbfs``, no face (the detector finds one in fewer
    than ``min_face_fraction`` of the frames, or, with ``face_crop="detect"``,
    in none of the sampled frames), shorter than ``min_seconds``. A skip is
    remembered in ``out/videos/.skipped/<name>.json`` and not tried again while
    the file (path, size), this version and the settings stay the same.
    ``face_crop``: "auto" (detect, else centre crop with a note), "detect", "center".
    ``landmarks``: "auto" (dlib if installed), "dlib" (required), "none".
    ``crop_scale``: crop side over the face box side (see :func:`choose_crop`).
    ``loudness_target``: gated speech level in dBFS of every stored track
    (``audio.normalize_loudness``). ``max_seconds``: keep only the first
    seconds of each video (None: all).
    ``workers``: videos prepared at once, in spawned processes that each build
    their own detector and feature extractor (same output as 1).
    ``device``: where HuBERT features are computed ("cpu", "cuda", ...; logmel ignores it).
    ``shard``: ``(k, n)``, 1-based: prepare only the videos whose name has
    ``crc32(name) % n == k - 1`` (names are given over all files first, so shards
    never collide) and write ``out/report.shard-k-of-n.json`` but no manifest.
    Cluster flow: run shards 1/n ... n/n into the same ``out`` (shared file
    system), then one unsharded pass over the same ``src``/``out``; it finds
    every clip prepared or skipped, prepares nothing new and writes
    ``manifest.json`` and ``report.json`` with every skip reason.
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
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if shard is not None and not (len(shard) == 2 and 1 <= shard[0] <= shard[1]):
        raise ValueError(f"shard must be (k, n) with 1 <= k <= n, got {shard!r}")
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
    videos, skipped_dir = out / "videos", out / "videos" / ".skipped"
    skipped_dir.mkdir(parents=True, exist_ok=True)
    from dataclasses import asdict

    settings = json.loads(json.dumps({**asdict(opts), "landmarks": landmarks, "audio_features": audio_features}))
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    names = _assign_names(files)  # over ALL files, before sharding
    results: dict[int, tuple[str, Any]] = {}  # file index -> ("existing" | "ok" | "skip", payload)
    todo: list[int] = []
    for i, (path, name) in enumerate(zip(files, names)):
        if not in_shard(name, shard):
            continue
        meta_file = videos / name / "meta.json"
        if meta_file.is_file() and json.loads(meta_file.read_text()).get("prepare_version") == PREPARE_VERSION:
            results[i] = ("existing", None)
            continue
        reason = _remembered_skip(skipped_dir / f"{name}.json", _skip_key(src, path, settings))
        if reason is not None:
            results[i] = ("skip", reason)
            continue
        if meta_file.is_file() and verbose:
            print(f"redo {path.name}: prepared by an older version (no landmarks or mouth box)")
        todo.append(i)

    def finish(i: int, status: str, payload: Any) -> None:  # in the parent: promote the clip or remember the skip
        path, name = files[i], names[i]
        marker = skipped_dir / f"{name}.json"
        if status == "ok":
            shutil.rmtree(videos / name, ignore_errors=True)
            os.replace(videos / f".{name}.tmp", videos / name)
            marker.unlink(missing_ok=True)
            if verbose:
                print(f"ok   {path.name} -> {name} ({payload['frames']} frames, {payload['note']})")
        else:
            _write_json(marker, {"file": str(path), "reason": payload, **_skip_key(src, path, settings)})
            if verbose:
                print(f"skip {path.name}: {payload}")
        results[i] = (status, payload)

    extractor: AudioFeatureExtractor | None = None
    if todo:
        tools = FaceTools(landmarks, landmark_model)
        if not tools.has_landmarks and landmarks != "none" and verbose:
            print(f"note: {tools.missing}; pose will hold only scale/tx/ty and blink zeros. "
                  f"For landmarks: {EXTRA_HINT}")
        jobs = [(files[i], videos / f".{names[i]}.tmp", names[i]) for i in todo]
        if workers == 1 or len(todo) == 1:
            extractor = AudioFeatureExtractor(audio_features, device)
            for i, job in zip(todo, jobs):
                finish(i, *_prepare_one(*job, opts, tools, extractor))
        else:
            del tools
            n = min(workers, len(todo))
            _run_pool(jobs, opts, n, (landmarks, landmark_model, audio_features, device,
                                      max(1, (os.cpu_count() or 1) // n)), lambda k, *r: finish(todo[k], *r))
    report: dict[str, Any] = {"processed": [], "existing": [], "skipped": [], "notes": {}}
    for i in sorted(results):
        status, payload = results[i]
        if status == "skip":
            report["skipped"].append({"file": str(files[i]), "reason": payload})
        else:
            report["processed" if status == "ok" else "existing"].append(names[i])
            if status == "ok":
                report["notes"][names[i]] = payload["note"]
    if shard is not None:
        report["shard"] = list(shard)
        _write_json(out / f"report.shard-{shard[0]}-of-{shard[1]}.json", report, indent=1)
        return report
    names = sorted(p.name for p in videos.iterdir()
                   if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file())
    metas = [json.loads((videos / n / "meta.json").read_text()) for n in names]
    if names:  # the stored features' width (no need to load HuBERT in a pass that prepared nothing)
        audio_dim = int(np.load(videos / names[0] / "audio_feats.npy", mmap_mode="r").shape[-1])
    else:
        audio_dim = (extractor or AudioFeatureExtractor(audio_features, device)).dim
    sources = {m.get("pose_source", "box") for m in metas}
    pose_source = sources.pop() if len(sources) == 1 else ("mixed" if sources else "none")
    detectors = sorted({m.get("framing", {}).get("detector", "unknown") for m in metas})
    train, test = split_names(names, test_fraction)
    manifest = {"format": "microscope-pl/1", "source": "prepared", "fps": FPS, "sample_rate": SAMPLE_RATE,
                "size": size, "audio_features": audio_features, "audio_dim": audio_dim,
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
    _write_json(out / "manifest.json", manifest, indent=1)
    _write_json(out / "report.json", report, indent=1)
    return report
