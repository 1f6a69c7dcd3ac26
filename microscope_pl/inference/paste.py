"""Paste-back (`generate --paste-back`): the animated face crop put back into the whole photo.

The photo stays still around the moving face; inside the crop the generated
frame is blended in with a feathered edge (a smooth ramp over `feather` of the
crop side), so no seam shows where the crop ends. Crop edges that lie on the
photo's own border need no ramp and get none.
"""
from __future__ import annotations

import numpy as np

MAX_SIDE = 1920  # larger photos are scaled down first: H.264 at phone-camera sizes is slow and huge
FEATHER = 0.12  # ramp width as a share of the crop side


def _ramp(length: int, width: float, start_open: bool, end_open: bool) -> np.ndarray:
    """1-D weights `[length]`: 0 -> 1 over `width` px from each end that needs feathering (smoothstep)."""
    pos = np.arange(length, dtype=np.float32) + 0.5
    weight = np.ones(length, np.float32)
    if width > 0 and start_open:
        weight = np.minimum(weight, np.clip(pos / width, 0, 1))
    if width > 0 and end_open:
        weight = np.minimum(weight, np.clip((length - pos) / width, 0, 1))
    return weight * weight * (3 - 2 * weight)


class PasteBack:
    """Composite generated frames (uint8 `[k, S, S, 3]`) into `photo` (uint8 `[H, W, 3]`) at
    the square `box` `(x0, y0, side)` in photo pixels (inputs.portrait_box).

    `size` is the output `(width, height)`: the photo's, scaled to at most
    MAX_SIDE and cut to even numbers (H.264 in yuv420p needs them).
    """

    def __init__(self, photo: np.ndarray, box: tuple[int, int, int], feather: float = FEATHER,
                 max_side: int = MAX_SIDE) -> None:
        import cv2

        h, w = photo.shape[:2]
        k = min(1.0, max_side / max(h, w))
        if k < 1.0:
            photo = cv2.resize(photo, (max(2, round(w * k)), max(2, round(h * k))), interpolation=cv2.INTER_AREA)
        h, w = photo.shape[0] // 2 * 2, photo.shape[1] // 2 * 2
        self.photo = np.ascontiguousarray(photo[:h, :w])
        x0, y0, side = (int(round(v * k)) for v in box)
        side = max(2, min(side, w - x0, h - y0))
        self.box = (x0, y0, side)
        ramp_x = _ramp(side, feather * side, x0 > 0, x0 + side < w)
        ramp_y = _ramp(side, feather * side, y0 > 0, y0 + side < h)
        self.alpha = (ramp_y[:, None] * ramp_x[None, :])[..., None]  # [side, side, 1]
        self.size = (w, h)

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 `[k, S, S, 3]` -> uint8 `[k, H, W, 3]` (the photo with each frame blended in)."""
        import cv2

        x0, y0, side = self.box
        out = np.repeat(self.photo[None], frames.shape[0], axis=0)
        still = self.photo[y0:y0 + side, x0:x0 + side].astype(np.float32)
        for i, frame in enumerate(frames):
            interp = cv2.INTER_CUBIC if side > frame.shape[0] else cv2.INTER_AREA
            face = cv2.resize(np.ascontiguousarray(frame), (side, side), interpolation=interp).astype(np.float32)
            mixed = self.alpha * face + (1.0 - self.alpha) * still
            out[i, y0:y0 + side, x0:x0 + side] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
        return out
