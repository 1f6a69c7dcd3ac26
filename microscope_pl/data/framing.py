"""How a face is framed in a square crop: one recipe from the data set to generation.

A recipe (``manifest.json`` "framing", carried into every checkpoint's record
as ``record["data"]["framing"]``) says: find the face box ``(x, y, w, h)``
with ``detector``; the crop side is ``scale * max(w, h)``; its centre is the
box centre plus ``offset * (w, h)``; a crop that would leave the image is
shifted inside it (never padded: the model never saw borders). ``data
prepare`` applies it to the median box of a clip's sampled frames,
``generate`` to the one box of a portrait, so both frame a face alike.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

DETECT_MAX_SIDE = 640  # boxes are found on a copy no larger than this: cost grows with pixels
# The embedded synthetic set (data/synth.py `_astronaut`): face box / crop side in [0.36, 0.46]
# (1 / 0.41 = 2.44), crop centre about a fifth of a face width below the Haar box centre.
SYNTH_FRAMING: dict[str, Any] = {"detector": "haar", "scale": 2.44, "offset": [0.0, 0.2], "reference": "box"}
CENTRE_FRAMING: dict[str, Any] = {"detector": "center", "scale": None, "offset": None, "reference": "frame"}

Box = tuple[float, float, float, float]


class FaceDetector:
    """Face boxes from dlib's HOG detector when installed (and wanted), else OpenCV's Haar cascade."""

    def __init__(self, use_dlib: bool = True) -> None:
        self.haar: Any = None
        if hasattr(cv2, "CascadeClassifier") and hasattr(cv2, "data"):
            xml = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
            if xml.is_file():
                self.haar = cv2.CascadeClassifier(str(xml))
        self.dlib_detector: Any = None
        self.missing = ""
        if use_dlib:
            try:
                import dlib
            except ImportError:
                self.missing = "dlib is not installed"
            else:
                self.dlib_detector = dlib.get_frontal_face_detector()
        self.last_source = ""  # "dlib" or "haar": which detector found the boxes of the last detect()

    @property
    def has_detector(self) -> bool:
        return self.haar is not None or self.dlib_detector is not None

    def detect(self, rgb: np.ndarray, large_face: bool = False) -> list[Box]:
        """Face boxes ``(x, y, w, h)`` in pixels, largest first.

        ``large_face``: the face fills a good part of the image (a face-centred
        crop), so the haar cascade may run on a 160 px copy, ~3x faster.
        """
        boxes: list[Box] = []
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

    def detect_downscaled(self, rgb: np.ndarray) -> Box | None:
        """The largest face box of ``rgb`` in its own pixels, found on a copy of at most DETECT_MAX_SIDE."""
        h, w = rgb.shape[:2]
        k = min(1.0, DETECT_MAX_SIDE / max(h, w))
        sw, sh = max(2, round(w * k / 2) * 2), max(2, round(h * k / 2) * 2)
        small = rgb if (sw, sh) == (w, h) else cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
        found = self.detect(np.ascontiguousarray(small))
        if not found:
            return None
        x, y, bw, bh = found[0]
        fx, fy = w / sw, h / sh
        return (x * fx, y * fy, bw * fx, bh * fy)


def crop_centre(box: Box, offset: tuple[float, float] | list[float]) -> tuple[float, float]:
    """The recipe's crop centre for face ``box``: the box centre plus ``offset * (w, h)``."""
    x, y, w, h = box
    return x + w / 2 + offset[0] * w, y + h / 2 + offset[1] * h


def crop_box(box: Box, width: int, height: int, scale: float, offset: tuple[float, float] | list[float]
             ) -> tuple[float, float, float]:
    """The recipe's square ``(x0, y0, side)`` for face ``box`` in a ``width`` x ``height`` image."""
    side = min(scale * max(box[2], box[3]), width, height)
    cx, cy = crop_centre(box, offset)
    x0 = float(np.clip(cx - side / 2, 0, width - side))
    y0 = float(np.clip(cy - side / 2, 0, height - side))
    return x0, y0, float(side)


def centre_box(width: int, height: int) -> tuple[float, float, float]:
    side = min(width, height)
    return (width - side) / 2, (height - side) / 2, float(side)


def describe(recipe: dict[str, Any] | None) -> str:
    """One-line summary of a recipe for logs."""
    if not recipe or recipe.get("detector") == "center":
        return "centre crop"
    offset = recipe.get("offset") or (0.0, 0.0)
    return (f"{recipe['detector']} box x {recipe['scale']:g}, centre + ({offset[0]:g}, {offset[1]:g}) x box")


def check_recipe(recipe: Any) -> dict[str, Any]:
    """A framing recipe as a plain dict; ValueError in one line when it is not one."""
    if not isinstance(recipe, dict) or recipe.get("detector") not in ("dlib", "haar", "center", "mixed"):
        raise ValueError(f"not a framing recipe: {recipe!r}")
    if recipe["detector"] != "center":
        scale, offset = recipe.get("scale"), recipe.get("offset")
        if not isinstance(scale, (int, float)) or scale <= 0 or not isinstance(offset, (list, tuple)) \
                or len(offset) != 2:
            raise ValueError(f"framing recipe needs a positive scale and a 2-value offset, got {recipe!r}")
    return dict(recipe)
