"""From 68 facial landmarks per frame to the tracks a prepared clip stores: head
pose (``cv2.solvePnP`` on a generic 3-D face), blink (eye aspect ratio), the
per-frame and clip-level mouth boxes, all lightly smoothed in time."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np

SMOOTH_WINDOW, SMOOTH_ORDER = 5, 2  # Savitzky-Golay over 5 frames (200 ms at 25 fps), quadratic
MOUTH_MARGIN = (0.2, 0.3)  # mouth box = lip box grown by these shares of the lip width (x, y) on each side
MOUTH_ENVELOPE = 2.0  # clip-level mouth box: 2nd / 98th percentile of the per-frame box edges
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


class FaceFollower:
    """Face box and 68 landmarks frame by frame (`data prepare` and `generate --pose-video`).

    `tools` detects faces and fits landmarks (prepare.FaceTools). A frame without a
    detection (a turned head, a hand) keeps the last detected box, moved by the
    landmarks' motion since that detection. `points`, `boxes` and `hits` (frames
    with a detection) grow with every `add`.
    """

    def __init__(self, tools: Any) -> None:
        self.tools = tools
        self.points: list[np.ndarray | None] = []
        self.boxes: list[tuple | None] = []
        self.hits = 0
        self._det_box: tuple | None = None
        self._det_centre: np.ndarray | None = None  # landmark centroid of the frame _det_box was found in
        self._last_pts: np.ndarray | None = None

    def add(self, frame: np.ndarray) -> None:
        """Track one RGB frame (C-contiguous)."""
        tools = self.tools
        found = tools.detect(frame, large_face=True) if tools.has_detector else []
        box = self._det_box
        if found:
            self.hits += 1
            box = self._det_box = found[0]
        elif self._det_box is not None and self._det_centre is not None and self._last_pts is not None:
            dx, dy = self._last_pts.mean(axis=0) - self._det_centre
            box = (box[0] + dx, box[1] + dy, box[2], box[3])
        pts = tools.landmarks(frame, box) if box is not None and tools.has_landmarks else None
        if pts is not None:
            if found:
                self._det_centre = pts.mean(axis=0)
            self._last_pts = pts
        self.points.append(pts)
        self.boxes.append(box)
