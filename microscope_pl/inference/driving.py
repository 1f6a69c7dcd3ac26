"""Head pose and blinks copied from a real video (`generate --pose-video / --blink-video`).

The reference video goes through the landmark tools of `data prepare`
(data/prepare.py `FaceTools`, data/framing.py, data/face_track.py): decoded
at the generation frame rate, framed by the checkpoint's recipe (the crop its
training data had, so scale and offsets are in the units the model learned),
68 landmarks per frame, pose by `solvePnP` and blink by eye aspect ratio,
lightly smoothed. The track is then fitted to the speech length (trimmed, or
looped back and forth so it never jumps) and made relative to the reference
video's first frame, as the denoiser expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

WORK = 256  # landmarks are fitted on crops of this size, as data prepare does for outputs up to 256 px
MIN_FACE_FRACTION = 0.5  # refuse a video whose face is found in fewer of its frames
BOX_SAMPLES = 12  # frames sampled to place the crop (median face box)


@dataclass(frozen=True)
class VideoMotion:
    """Per-frame tracks of a reference video, relative to its first frame.

    `pose` `[n, 6]` (yaw, pitch, roll in degrees; face width and centre offset as
    fractions of the crop), `blink` `[n, 2]` (eye aspect ratios) or None when no
    landmark model is installed (then the angles are zero too), `note` for the log.
    """

    pose: np.ndarray
    blink: np.ndarray | None
    note: str


def fit_length(track: np.ndarray, n: int) -> np.ndarray:
    """Trim `track` `[T, ...]` to `n` rows, or extend it by playing it back and forth
    (0 1 2 ... T-1 T-2 ... 1 0 1 ...): a loop without a jump at the seam."""
    if n < 1:
        raise ValueError(f"need at least one frame, got {n}")
    count = track.shape[0]
    if count >= n:
        return track[:n].copy()
    if count == 1:
        return np.repeat(track, n, axis=0)
    period = 2 * (count - 1)
    phase = np.arange(n) % period
    return track[np.where(phase < count, phase, period - phase)].copy()


def _label(path: Path, role: str) -> str:
    return f"{role} video {path}"


def _check_video(path: str | Path, role: str) -> tuple[Path, dict[str, Any]]:
    """The path and ffprobe summary of a readable video; one-line ValueError otherwise."""
    from microscope_pl.data.prepare import probe

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{_label(path, role)} not found")
    try:
        return path, probe(path)
    except ValueError as err:
        raise ValueError(f"{_label(path, role)} is {err}") from None


def check_reference_videos(pose_video: str | Path | None, blink_video: str | Path | None) -> None:
    """Refuse a missing or unreadable reference video in one line, before any model is loaded."""
    for path, role in ((pose_video, "pose"), (blink_video, "blink")):
        if path is not None:
            _check_video(path, role)


def _crop(path: Path, info: dict[str, Any], recipe: dict[str, Any], seconds: float, role: str
          ) -> tuple[int, int, int]:
    """Square crop `(x0, y0, side)` in source pixels: the recipe applied to the median face
    box of a few frames of the first `seconds` (found by the recipe's detector on copies of
    at most DETECT_MAX_SIDE px), like `data prepare` frames a clip and `generate` a portrait."""
    from microscope_pl.data.framing import DETECT_MAX_SIDE, FaceDetector, centre_box, crop_box
    from microscope_pl.data.prepare import _frames

    width, height = info["width"], info["height"]
    if recipe["detector"] == "center":
        box = centre_box(width, height)
    else:
        detector = FaceDetector(use_dlib=recipe["detector"] in ("dlib", "mixed"))
        k = min(1.0, DETECT_MAX_SIDE / max(width, height))
        sw, sh = max(2, int(width * k) // 2 * 2), max(2, int(height * k) // 2 * 2)
        rate = max(0.2, BOX_SAMPLES / max(min(seconds, info["duration"] or seconds), 1e-3))
        frames = _frames(path, f"fps={rate:.4f},scale={sw}:{sh}", sw, sh, seconds)
        found = [detector.detect(np.ascontiguousarray(f)) for f in frames]
        boxes = [np.asarray(f[0]) * np.array([width / sw, height / sh] * 2) for f in found if f]
        if not boxes:
            raise ValueError(f"{_label(path, role)}: no face found")
        box = crop_box(tuple(np.median(np.stack(boxes), axis=0)), width, height, recipe["scale"], recipe["offset"])
    x0, y0, side = box
    side_px = max(2, int(side) // 2 * 2)
    return (int(np.clip(round(x0), 0, width - side_px)), int(np.clip(round(y0), 0, height - side_px)), side_px)


def _track_landmarks(frames: Any, tools: Any) -> tuple[list, list, int, int]:
    """Per-frame landmarks and face boxes of face-centred crops (`data prepare`'s
    tracking, data.face_track.FaceFollower). Returns (points, boxes, frames read,
    frames with a detection)."""
    from microscope_pl.data.face_track import FaceFollower

    follower = FaceFollower(tools)
    for frame in frames:
        follower.add(np.ascontiguousarray(frame))
    return follower.points, follower.boxes, len(follower.points), follower.hits


def video_motion(path: str | Path, num_frames: int, fps: float, framing: dict[str, Any] | None = None,
                 role: str = "pose", need_blink: bool = False) -> VideoMotion:
    """Pose and blink tracks of the first `num_frames` frames (at `fps`) of the video `path`.

    `framing`: the checkpoint's recipe (None: the synthetic set's). `need_blink`:
    refuse, in one line, when no landmark model is installed (without landmarks
    there are no eyes to measure). Raises ValueError for an unreadable video,
    one without a face, or one whose face is found in too few frames.
    """
    from microscope_pl.data.face_track import face_track
    from microscope_pl.data.framing import SYNTH_FRAMING, check_recipe
    from microscope_pl.data.prepare import EXTRA_HINT, FaceTools, _frames

    path, info = _check_video(path, role)
    recipe = check_recipe(SYNTH_FRAMING if framing is None else framing)
    tools = FaceTools("auto")
    if not tools.has_detector:
        raise ValueError(f"{_label(path, role)}: no face detector available ({EXTRA_HINT} or opencv-python-headless)")
    if need_blink and not tools.has_landmarks:
        raise ValueError(f"blinks from {_label(path, role)} need 68-point landmarks ({tools.missing}); {EXTRA_HINT}")
    seconds = (num_frames + 1) / fps  # decode only what the speech needs
    x0, y0, side = _crop(path, info, recipe, seconds, role)
    filters = f"fps={fps:g},crop={side}:{side}:{x0}:{y0},scale={WORK}:{WORK}:flags=area"
    points, boxes, count, hits = _track_landmarks(_frames(path, filters, WORK, WORK, seconds), tools)
    if count == 0:
        raise ValueError(f"{_label(path, role)} has no frames that ffmpeg can decode")
    if hits < MIN_FACE_FRACTION * count:
        raise ValueError(f"{_label(path, role)}: face found in {hits} of {count} frames "
                         f"(< {MIN_FACE_FRACTION:.0%})")
    track = face_track(points, boxes, WORK, WORK)
    pose = fit_length(track["pose"].astype(np.float32), num_frames)
    blink = fit_length(track["blink"].astype(np.float32), num_frames) if "landmarks" in track else None
    how = "looped back and forth" if count < num_frames else "trimmed"
    note = (f"{role} from {path}: {count} frames at {fps:g} fps, {how} to {num_frames}, crop {side}px at "
            f"({x0}, {y0}), " + ("68 landmarks" if blink is not None else f"face boxes only ({tools.missing}): "
                                 "no angles, no blinks"))
    return VideoMotion(pose - pose[:1], None if blink is None else blink - blink[:1], note)
