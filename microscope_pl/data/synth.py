"""The embedded synthetic talking-head data set.

Portraits (scikit-image's astronaut photo, upscaled LFW faces, procedurally
drawn heads) are animated by smooth head motion (a planar head rotated in 3-D
and projected: yaw/pitch/roll-like homographies plus scale and translation),
eye blinks at natural intervals, and a mouth (lips, cavity and a dropping
jaw) whose opening is the smoothed loudness envelope of the clip's own speech
(espeak-ng, or synthetic syllables when espeak-ng is missing). True pose and
blink are written per frame, in the layout of docs/interfaces.md.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.signal import resample_poly

from microscope_pl.data.audio import (SAMPLE_RATE, AudioFeatureExtractor, loudness_db, read_wav, write_wav)
from microscope_pl.data.framing import SYNTH_FRAMING
from microscope_pl.data.video_io import VideoWriter

FPS = 25
OPEN_EAR, CLOSED_EAR = 0.30, 0.05  # eye aspect ratio of an open / closed eye
JAW_DROP = 0.1  # how far the chin travels at full mouth opening, in face widths

# Our own sentences: varied phonetics, short enough to leave pauses in a few seconds.
SENTENCES = [
    "Please bring the blue folder to the meeting tomorrow morning.",
    "The weather will turn colder after the long weekend.",
    "My grandmother grew tomatoes beside the garden wall.",
    "We missed the early train, so we walked along the river.",
    "Seven orange boats drifted slowly past the harbour.",
    "Could you check whether the kettle is still warm?",
    "Nobody expected the quiet student to win the prize.",
    "The library opens at nine and closes before dinner.",
    "A small brown dog chased the pigeons across the square.",
    "Turn left at the bakery and look for the green door.",
    "Fresh bread and hot soup are waiting in the kitchen.",
    "The old piano sounded wonderful after it was tuned.",
    "Thank you for listening, and good luck with the project.",
    "Every winter the lake freezes and the children skate.",
    "She painted the fence white and planted yellow tulips.",
    "Numbers on the screen changed faster than we could read.",
    "Let me explain how the machine learns to move the lips.",
    "Heavy rain delayed the football match by an hour.",
    "Why do the stars look brighter far away from the city?",
    "I would like a cup of tea with a little milk, please.",
]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029"]
VARIANTS = ["", "+m1", "+m3", "+m7", "+f1", "+f2", "+f3", "+f4"]
SKIN = np.array([[255, 224, 196], [241, 194, 160], [224, 172, 128], [198, 134, 96],
                 [160, 104, 72], [118, 76, 52], [90, 58, 40]], np.float32)
HAIR = np.array([[25, 20, 18], [60, 40, 28], [110, 72, 40], [190, 150, 90], [150, 60, 30],
                 [160, 160, 160], [235, 225, 200]], np.float32)
IRIS = np.array([[70, 45, 25], [40, 25, 15], [70, 110, 160], [80, 120, 80], [110, 90, 60]], np.float32)

_NOTICE_SHOWN = False


# ---------------------------------------------------------------- speech


def _espeak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One utterance from espeak-ng -> float32 [samples] at 16 kHz, peak 1."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "u.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                       check=True, capture_output=True)
        wave, rate = read_wav(path)
    if rate != SAMPLE_RATE:
        g = math.gcd(rate, SAMPLE_RATE)
        wave = resample_poly(wave, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return (wave / max(float(np.abs(wave).max()), 1e-6)).astype(np.float32)


def _syllables(rng: np.random.Generator, base_f0: float) -> np.ndarray:
    """A word group of voiced syllables (harmonics through two vowel formants) -> [samples], peak 1."""
    sr = SAMPLE_RATE
    vowels = [(730, 1090), (270, 2290), (300, 870), (530, 1840), (640, 1190), (440, 1020)]
    pieces = []
    for _ in range(int(rng.integers(3, 9))):
        dur = rng.uniform(0.12, 0.28)
        t = np.arange(int(dur * sr)) / sr
        f0 = base_f0 * (1.0 + rng.uniform(-0.12, 0.12) + rng.uniform(-0.1, 0.1) * t / dur)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        f1, f2 = vowels[int(rng.integers(len(vowels)))]
        voiced = np.zeros_like(t)
        for k in range(1, 25):
            fk = k * f0.mean()
            if fk > 5000:
                break
            gain = np.exp(-((fk - f1) / 180.0) ** 2) + 0.6 * np.exp(-((fk - f2) / 250.0) ** 2) + 0.05 / k
            voiced += gain * np.sin(k * phase)
        voiced *= np.sin(np.pi * t / dur) ** 0.6
        if rng.random() < 0.5:  # a consonant: a short noise burst before the vowel
            burst = rng.standard_normal(int(rng.uniform(0.02, 0.05) * sr)) * 0.3
            voiced = np.concatenate([burst * np.hanning(burst.size), voiced])
        pieces += [voiced, np.zeros(int(rng.uniform(0.02, 0.08) * sr))]
    wave = np.concatenate(pieces).astype(np.float32)
    return wave / max(float(np.abs(wave).max()), 1e-6)


def _speech_backend(speech: str) -> str:
    """Resolve ``speech`` ("auto" | "espeak" | "syllables") to the backend used."""
    global _NOTICE_SHOWN
    if speech not in ("auto", "espeak", "syllables"):
        raise ValueError(f"speech must be 'auto', 'espeak' or 'syllables', got {speech!r}")
    found = shutil.which("espeak-ng") is not None
    if speech == "espeak" and not found:
        raise ValueError("speech='espeak' but espeak-ng is not on PATH (apt-get install espeak-ng)")
    if speech == "auto" and not found:
        if not _NOTICE_SHOWN:
            print("notice: espeak-ng not found; the synthetic data set uses syllable audio "
                  "(install espeak-ng for real speech)")
            _NOTICE_SHOWN = True
        return "syllables"
    return "espeak" if speech != "syllables" else "syllables"


def speech_track(rng: np.random.Generator, num_samples: int, backend: str) -> tuple[np.ndarray, str]:
    """Utterances separated by silent pauses -> (float32 [num_samples], voice description)."""
    voice = VOICES[int(rng.integers(len(VOICES)))] + VARIANTS[int(rng.integers(len(VARIANTS)))]
    pitch, base_f0 = int(rng.integers(25, 75)), float(rng.uniform(95, 230))
    out = np.zeros(num_samples, np.float32)
    pos = int(rng.uniform(0.2, 0.6) * SAMPLE_RATE)
    while pos < num_samples:
        if backend == "espeak":
            text = SENTENCES[int(rng.integers(len(SENTENCES)))]
            utt = _espeak(text, voice, int(rng.integers(140, 195)), int(np.clip(pitch + rng.integers(-8, 9), 0, 99)))
        else:
            utt = _syllables(rng, base_f0)
        utt = utt[: num_samples - pos] * rng.uniform(0.35, 0.8)
        out[pos:pos + utt.size] = utt
        pos += utt.size + int(rng.uniform(0.4, 1.2) * SAMPLE_RATE)
    fade = min(160, num_samples)  # no click at a cut-off utterance
    out[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    out += rng.standard_normal(num_samples).astype(np.float32) * 2e-4  # a faint room-noise floor
    return out, (voice if backend == "espeak" else f"syllables@{base_f0:.0f}Hz")


def mouth_openness(wave: np.ndarray, num_frames: int) -> np.ndarray:
    """Mouth opening in [0, 1] per frame = smoothed, per-clip-normalised loudness envelope."""
    db = loudness_db(wave, num_frames)
    top = max(float(np.percentile(db, 95)), -40.0)
    env = np.clip((db + 50.0) / (top + 50.0), 0.0, 1.0)
    return np.clip(gaussian_filter1d(env, 0.8, mode="nearest"), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- motion


def smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, unit standard deviation in expectation -> [n].

    Normalised by the filter's theoretical gain, not the sample std, so short
    clips get proportionally small (not hurried) movements.
    """
    x = gaussian_filter1d(rng.standard_normal(n + int(8 * sigma)), sigma, mode="wrap")[int(4 * sigma):][:n]
    return (x * math.sqrt(2.0 * math.sqrt(math.pi) * sigma)).astype(np.float64)


def blink_closure(rng: np.random.Generator, n: int) -> np.ndarray:
    """Eyelid closure in [0, 1] per frame: blinks every 2-6 s lasting 150-250 ms."""
    closure = np.zeros(n, np.float32)
    times = (np.arange(n) + 0.5) / FPS
    # The first blink comes early enough that every clip of at least 1 s has one.
    start = rng.uniform(0.2, max(0.3, min(3.0, 0.7 * n / FPS - 0.25)))
    while start < n / FPS:
        dur = rng.uniform(0.15, 0.25)
        u = (times - start) / dur
        inside = (u > 0) & (u < 1)
        closure[inside] = np.maximum(closure[inside], np.minimum(1.0, 1.8 * np.sin(np.pi * u[inside])))
        start += dur + rng.uniform(2.0, 6.0)
    return closure


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """R = Rz(roll) Ry(yaw) Rx(pitch), angles in degrees (camera frame: x right, y down, z forward)."""
    a, b, c = np.radians([pitch, yaw, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def pose_homography(yaw: float, pitch: float, roll: float, scale: float, shift: tuple[float, float],
                    pivot: tuple[float, float], focal: float) -> np.ndarray:
    """3x3 homography of a plane rotated about ``pivot``, seen by a pinhole at distance ``focal``."""
    r = _rotation(yaw, pitch, roll)
    rot = np.diag([focal, focal, 1.0]) @ np.stack([r[:, 0], r[:, 1], [0.0, 0.0, focal]], axis=1)
    px, py = pivot
    to_pivot = np.array([[1, 0, -px], [0, 1, -py], [0, 0, 1.0]])
    back = np.array([[scale, 0, px + shift[0]], [0, scale, py + shift[1]], [0, 0, 1.0]])
    h = back @ rot @ to_pivot
    return h / h[2, 2]


# ---------------------------------------------------------------- drawing (soft, anti-aliased)


def _grid(layer: np.ndarray, x0: float, y0: float, x1: float, y1: float):
    """Clipped patch slices of ``layer`` and pixel-centre grids (xx, yy) for it; None when empty."""
    h, w = layer.shape[:2]
    ia, ib = max(int(math.floor(y0)) - 1, 0), min(int(math.ceil(y1)) + 2, h)
    ja, jb = max(int(math.floor(x0)) - 1, 0), min(int(math.ceil(x1)) + 2, w)
    if ia >= ib or ja >= jb:
        return None
    yy, xx = np.mgrid[ia:ib, ja:jb].astype(np.float32) + 0.5
    return (slice(ia, ib), slice(ja, jb)), xx, yy


def _ellipse_cov(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """Coverage in [0, 1] of an axis-aligned ellipse, ~1 px anti-aliased edge."""
    a, b = max(a, 1e-3), max(b, 1e-3)
    dx, dy = (xx - cx) / a, (yy - cy) / b
    r = np.sqrt(dx * dx + dy * dy) + 1e-6
    grad = np.sqrt((dx / a) ** 2 + (dy / b) ** 2) / r + 1e-6
    return np.clip(0.5 - (r - 1.0) / grad, 0.0, 1.0)


def _paint(layer: np.ndarray, sl: tuple[slice, slice], cov: np.ndarray, colour: np.ndarray) -> None:
    """Composite opaque ``colour`` (RGB or per-pixel [h, w, 3]) with coverage ``cov`` (premultiplied alpha)."""
    patch, c = layer[sl], cov[..., None]
    patch[..., :3] = patch[..., :3] * (1.0 - c) + np.asarray(colour, np.float32) * c
    if layer.shape[-1] == 4:
        patch[..., 3:] = patch[..., 3:] * (1.0 - c) + c


def _ellipse(layer: np.ndarray, cx: float, cy: float, a: float, b: float, colour) -> None:
    g = _grid(layer, cx - a, cy - b, cx + a, cy + b)
    if g is not None:
        _paint(layer, g[0], _ellipse_cov(g[1], g[2], cx, cy, a, b), colour)


def _stroke(layer: np.ndarray, p: tuple[float, float], q: tuple[float, float], width: float, colour) -> None:
    """A round-capped line segment of ``width`` pixels."""
    r = width / 2
    g = _grid(layer, min(p[0], q[0]) - r, min(p[1], q[1]) - r, max(p[0], q[0]) + r, max(p[1], q[1]) + r)
    if g is None:
        return
    sl, xx, yy = g
    d = np.array(q, np.float32) - np.array(p, np.float32)
    t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    dist = np.hypot(xx - p[0] - t * d[0], yy - p[1] - t * d[1])
    _paint(layer, sl, np.clip(r - dist + 0.5, 0, 1), colour)


@dataclass
class Portrait:
    """A still portrait ready for animation; coordinates are template pixels."""

    identity: str
    template: np.ndarray  # float32 [Ht, Wt, 3] opaque, or [Ht, Wt, 4] premultiplied RGBA
    background: np.ndarray | None  # float32 [S, S, 3] static backdrop behind an RGBA template
    origin: tuple[float, float]  # template position of the frame's top-left corner
    pivot: tuple[float, float]  # rotation centre (about the neck)
    face_centre: tuple[float, float]
    face_width: float
    eyes: list[tuple[float, float, float, float]]  # (cx, cy, w, h) per eye, image-left first
    mouth: tuple[float, float, float, float]  # (cx, cy, width, max opening)
    skin: np.ndarray
    lip: np.ndarray
    open_ear: float = OPEN_EAR


def draw_lid(layer: np.ndarray, eye: tuple[float, float, float, float], closure: float, skin: np.ndarray) -> None:
    """Cover the eye from the top with an eyelid; ``closure`` 0 open .. 1 shut (dark lash line at its edge)."""
    if closure <= 0.02:
        return
    cx, cy, w, h = eye
    a, b = w * 0.58, h * 0.75
    g = _grid(layer, cx - a, cy - b, cx + a, cy + b)
    if g is None:
        return
    sl, xx, yy = g
    inside = _ellipse_cov(xx, yy, cx, cy, a, b)
    edge = cy - b + closure * 2 * b
    _paint(layer, sl, inside * np.clip(edge - yy + 0.5, 0, 1), skin * 0.92)
    lash = max(1.0, h * 0.22)
    _paint(layer, sl, inside * np.clip(lash / 2 - np.abs(yy - edge) + 0.5, 0, 1) * min(1.0, 3 * closure),
           np.array([45, 30, 30], np.float32))


def draw_mouth(layer: np.ndarray, mouth: tuple[float, float, float, float], openness: float, lip: np.ndarray) -> None:
    """Lips with a dark cavity whose height follows ``openness`` (0..1), upper teeth when wide open."""
    cx, cy, w, hmax = mouth
    half = openness * hmax / 2
    lip_t = max(1.0, hmax * 0.2)
    _ellipse(layer, cx, cy, w / 2, half + lip_t, lip)
    if half < 0.35:  # closed: just the line between the lips
        _stroke(layer, (cx - w * 0.42, cy), (cx + w * 0.42, cy), 1.0, lip * 0.45)
        return
    ca = w / 2 * (0.82 - 0.15 * openness)
    g = _grid(layer, cx - ca, cy - half, cx + ca, cy + half)
    if g is None:
        return
    sl, xx, yy = g
    cavity = _ellipse_cov(xx, yy, cx, cy, ca, half)
    _paint(layer, sl, cavity, np.array([55, 18, 24], np.float32))
    if openness > 0.3:
        teeth = cavity * np.clip(cy - half * 0.45 - yy + 0.5, 0, 1)
        _paint(layer, sl, teeth, np.array([232, 226, 214], np.float32))


def drop_jaw(layer: np.ndarray, p: Portrait, openness: float) -> None:
    """Move the lower lip and chin down with ``openness``, in place: speech opens the jaw,
    so the mouth is a motion (that a flow field carries), not only a change of colour."""
    drop = JAW_DROP * p.face_width * openness
    cx, cy, _, _ = p.mouth
    fw = p.face_width
    x0, x1 = max(0, int(cx - 0.9 * fw)), min(layer.shape[1], int(cx + 0.9 * fw) + 1)
    y0, y1 = max(0, int(cy - 0.2 * fw)), min(layer.shape[0], int(cy + 0.8 * fw) + 1)
    if drop < 0.05 or x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    below_lips = 1.0 / (1.0 + np.exp(-(yy - cy) / (0.05 * fw)))  # the upper lip stays
    above_neck = np.clip((cy + 0.6 * fw - yy) / (0.3 * fw), 0.0, 1.0)  # the neck stretches
    across = np.exp(-(((xx - cx) / (0.4 * fw)) ** 2))
    # Backward map; the weight's slope (at most 5 / fw) times the drop (at most 0.1 fw) is below 1: no fold.
    src_y = yy - drop * below_lips * above_neck * across
    layer[y0:y1, x0:x1] = cv2.remap(layer, xx, src_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


# ---------------------------------------------------------------- portraits


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A static backdrop: a two-colour gradient with soft blobs -> float32 [S, S, 3]."""
    c0, c1 = rng.uniform(30, 230, 3), rng.uniform(30, 230, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0, 1)[..., None]
    bg = (c0 * (1 - t) + c1 * t).astype(np.float32)
    for _ in range(int(rng.integers(3, 9))):
        bx, by, br = rng.uniform(0, size, 2).tolist() + [rng.uniform(0.05, 0.2) * size]
        blob = np.exp(-((xx * size - bx) ** 2 + (yy * size - by) ** 2) / (2 * br * br))[..., None]
        bg = bg * (1 - 0.5 * blob) + rng.uniform(20, 240, 3).astype(np.float32) * 0.5 * blob
    return bg.astype(np.float32)


def _head(rng: np.random.Generator, size: int, lfw_face: np.ndarray | None, identity: str) -> Portrait:
    """A procedurally drawn head on an RGBA layer over a drawn backdrop (optionally an LFW face texture)."""
    s = float(size)
    skin = (SKIN[int(rng.integers(len(SKIN)))] * rng.uniform(0.92, 1.05, 3)).clip(0, 255).astype(np.float32)
    hair = (HAIR[int(rng.integers(len(HAIR)))] * rng.uniform(0.85, 1.15, 3)).clip(0, 255).astype(np.float32)
    fw = s * rng.uniform(0.32, 0.44)
    fh = fw * rng.uniform(1.2, 1.38)
    cx, cy = s * (0.5 + rng.uniform(-0.07, 0.07)), s * (0.46 + rng.uniform(-0.04, 0.05))
    bg = _background(rng, size)
    shirt = rng.uniform(20, 235, 3).astype(np.float32)
    _ellipse(bg, cx, cy + fh * 1.35, fw * 1.35, fh * 0.75, shirt)
    g = _grid(bg, cx - fw * 0.23, cy, cx + fw * 0.23, cy + fh * 1.0)
    if g is not None:  # the neck: static, hidden behind the chin
        sl, xx, yy = g
        _paint(bg, sl, np.clip(fw * 0.23 - np.abs(xx - cx) + 0.5, 0, 1) * (yy < cy + fh * 0.95), skin * 0.8)
    layer = np.zeros((size, size, 4), np.float32)
    style = str(rng.choice(["short", "long", "bald", "bun"]))
    if style == "long":  # behind the head and down to the shoulders, the neck left visible
        g = _grid(layer, cx - fw * 0.66, cy - fh * 0.56, cx + fw * 0.66, cy + fh * 0.8)
        sl, xx, yy = g
        neck = np.clip(np.abs(xx - cx) - fw * 0.26 + 0.5, 0, 1) + (yy < cy)
        _paint(layer, sl, _ellipse_cov(xx, yy, cx, cy + fh * 0.12, fw * 0.66, fh * 0.68) * np.clip(neck, 0, 1),
               hair * 0.9)
    if style == "bun":
        _ellipse(layer, cx, cy - fh * 0.55, fw * 0.22, fw * 0.2, hair)
    for side in (-1, 1):  # ears
        _ellipse(layer, cx + side * fw * 0.5, cy + fh * 0.02, fw * 0.09, fh * 0.12, skin * 0.9)
    if style != "bald":
        _ellipse(layer, cx, cy - fh * 0.12, fw * 0.55, fh * 0.44, hair)
    g = _grid(layer, cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2)
    sl, xx, yy = g
    face = _ellipse_cov(xx, yy, cx, cy, fw / 2, fh / 2)
    light = rng.uniform(-1, 1, 2)
    shade = 1.0 + 0.12 * ((xx - cx) / fw * light[0] + (yy - cy) / fh * light[1]) * 2
    _paint(layer, sl, face, skin * shade[..., None])
    eyes = [(cx + side * fw * 0.2, cy - fh * 0.06, fw * 0.2, fw * 0.085) for side in (-1, 1)]
    mouth = (cx, cy + fh * 0.29, fw * 0.4, fw * 0.3)
    if lfw_face is not None:  # paste the photo face, aligned by its mean landmark positions
        box_w = fw / 0.72
        x0, y0 = cx - 0.45 * box_w, cy + fh / 2 - 1.0 * box_w
        tex = cv2.resize(lfw_face.astype(np.float32), (int(round(box_w)), int(round(box_w))),
                         interpolation=cv2.INTER_CUBIC)
        gray, placed = np.zeros((size, size), np.float32), np.zeros((size, size), np.float32)
        xa, ya = int(round(x0)), int(round(y0))
        ys, xs = slice(max(ya, 0), min(ya + tex.shape[0], size)), slice(max(xa, 0), min(xa + tex.shape[1], size))
        gray[ys, xs] = tex[ys.start - ya:ys.stop - ya, xs.start - xa:xs.stop - xa]
        placed[ys, xs] = 1.0
        mask = np.zeros((size, size), np.float32)
        mask[sl] = _ellipse_cov(xx, yy, cx, cy + fh * 0.03, fw * 0.47, fh * 0.48)
        mask = cv2.GaussianBlur(mask, (0, 0), max(fw * 0.04, 0.6)) * placed
        colour = skin[None, None] * (gray / max(float(gray[mask > 0.5].mean()), 1e-3))[..., None]
        _paint(layer, (slice(0, size), slice(0, size)), mask, np.clip(colour, 0, 255))
        eyes = [(x0 + ex * box_w, y0 + ey * box_w, 0.14 * box_w, 0.06 * box_w)
                for ex, ey in ((0.254, 0.363), (0.594, 0.347))]
        mouth = (x0 + 0.437 * box_w, y0 + 0.735 * box_w, 0.32 * box_w, 0.2 * box_w)
    else:
        if style in ("short", "bun", "long"):  # a fringe with a wavy edge over the forehead
            phase, waves = rng.uniform(0, 2 * np.pi), rng.uniform(2, 5)
            edge = cy - fh * rng.uniform(0.22, 0.3) + fh * 0.04 * np.sin(phase + waves * np.pi * (xx - cx) / fw)
            _paint(layer, sl, face * np.clip(edge - yy + 0.5, 0, 1), hair)
        iris = IRIS[int(rng.integers(len(IRIS)))]
        for ex, ey, ew, eh in eyes:
            _ellipse(layer, ex, ey, ew / 2, eh / 2, np.array([240, 238, 232], np.float32))
            _ellipse(layer, ex, ey, eh * 0.5, eh * 0.5, iris)
            _ellipse(layer, ex, ey, eh * 0.22, eh * 0.22, np.array([15, 10, 10], np.float32))
            _stroke(layer, (ex - ew * 0.5, ey - eh * 0.15), (ex + ew * 0.5, ey - eh * 0.15), 1.0,
                    np.array([40, 28, 25], np.float32))
            _stroke(layer, (ex - ew * 0.45, ey - eh * 1.6), (ex + ew * 0.45, ey - eh * 1.8),
                    max(1.2, fw * 0.035), hair * 0.6)
        _stroke(layer, (cx, cy + fh * 0.02), (cx + fw * 0.03, cy + fh * 0.16), max(1.0, fw * 0.02), skin * 0.75)
        for side in (-1, 1):
            _ellipse(layer, cx + side * fw * 0.05, cy + fh * 0.17, fw * 0.025, fw * 0.015, skin * 0.5)
    lip = (skin * 0.55 + np.array([170, 60, 70], np.float32) * 0.45).astype(np.float32)
    return Portrait(identity, layer, bg, (0.0, 0.0), (cx, cy + fh * 0.3), (cx, cy), fw, eyes, mouth, skin, lip)


def _astronaut(rng: np.random.Generator, size: int) -> Portrait:
    """The astronaut photo, face-cropped with a random framing; the template keeps the whole photo."""
    from skimage.data import astronaut

    photo = astronaut().astype(np.float32)
    face_w = 95.0  # haar face box (177, 66, 95, 95) in the 512 x 512 photo
    crop = face_w / rng.uniform(0.36, 0.46)
    cx0, cy0 = 222.0 + rng.uniform(-0.06, 0.06) * crop, 130.0 + rng.uniform(0.0, 0.06) * crop
    x0 = float(np.clip(cx0 - crop / 2, 0, 512 - crop))
    y0 = float(np.clip(cy0 - crop / 2, 0, 512 - crop))
    k = size / crop
    template = cv2.resize(photo, (int(round(512 * k)), int(round(512 * k))), interpolation=cv2.INTER_AREA)
    skin = photo[118:128, 195:210].reshape(-1, 3).mean(0)
    lip = photo[150:156, 215:232].reshape(-1, 3).mean(0)
    eyes = [(203.5 * k, 101.5 * k, 20 * k, 8 * k), (246.5 * k, 104.0 * k, 20 * k, 8 * k)]
    # The lips ellipse must cover the toothy smile of the photo (corners at x 201 and 246).
    mouth = (223.5 * k, 147.5 * k, 52 * k, 26 * k)
    return Portrait("astronaut", template, None, (x0 * k, y0 * k), (222 * k, 175 * k), (224 * k, 118 * k),
                    face_w * k, eyes, mouth, skin.astype(np.float32), lip.astype(np.float32))


def make_portrait(kind: str, index: int, rng: np.random.Generator, size: int) -> Portrait:
    """Portrait of ``kind`` ("astronaut" | "lfw" | "procedural") for identity number ``index``."""
    if kind == "astronaut":
        return _astronaut(rng, size)
    if kind == "lfw":
        from skimage.data import lfw_subset

        faces = lfw_subset()[:100]  # the first 100 images are faces, the rest are not
        pick = int(rng.integers(len(faces)))
        return _head(rng, size, faces[pick] * 255.0, f"lfw{pick:03d}")
    return _head(rng, size, None, f"procedural{index:02d}")


def render_frame(p: Portrait, matrix: np.ndarray, size: int, openness: float, closure: float) -> np.ndarray:
    """One frame: draw lids and mouth on the template, warp by ``matrix`` -> uint8 [S, S, 3]."""
    layer = p.template.copy()
    for eye in p.eyes:
        draw_lid(layer, eye, closure, p.skin)
    draw_mouth(layer, p.mouth, openness, p.lip)
    drop_jaw(layer, p, openness)
    if p.background is None:
        out = cv2.warpPerspective(layer, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REFLECT)
    else:
        warped = cv2.warpPerspective(layer, matrix, (size, size), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
        out = warped[..., :3] + p.background * (1.0 - warped[..., 3:4])
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _box_through(matrix: np.ndarray, cx: float, cy: float, hw: float, hh: float) -> np.ndarray:
    """Frame-space bounds [x0, y0, x1, y1] of the template box (cx +- hw, cy +- hh) under ``matrix``."""
    pts = np.array([[cx - hw, cy - hh, 1], [cx + hw, cy - hh, 1], [cx - hw, cy + hh, 1], [cx + hw, cy + hh, 1]])
    q = pts @ matrix.T
    q = q[:, :2] / q[:, 2:]
    return np.concatenate([q.min(0), q.max(0)])


# ---------------------------------------------------------------- one video


def _identity_kinds(count: int) -> list[str]:
    """Identity 0 is the astronaut (always in train); the rest alternate procedural and LFW."""
    return ["astronaut"] + ["procedural" if i % 2 else "lfw" for i in range(1, count)]


def _write_video(folder: Path, portrait: Portrait, rng: np.random.Generator, size: int, frames: int,
                 backend: str, extractor: AudioFeatureExtractor) -> dict:
    """Animate ``portrait`` and write every per-video file of the layout into ``folder``."""
    wave, voice = speech_track(rng, frames * SAMPLE_RATE // FPS, backend)
    wave = write_wav(folder / "audio.wav", wave)  # features from exactly the stored samples
    openness = mouth_openness(wave, frames)
    closure = blink_closure(rng, frames)
    ear = portrait.open_ear * rng.uniform(0.9, 1.1)
    blink = np.stack([ear * (1 - closure) + CLOSED_EAR * closure] * 2, axis=1).astype(np.float32)
    speak = gaussian_filter1d(openness, 4.0)  # heads nod a little while speaking
    # Head motion of a seated speaker (HDTF-like): a few degrees, small drift.
    yaw = 6.0 * smooth_noise(rng, frames, 14.0)
    pitch = 3.5 * smooth_noise(rng, frames, 12.0) + 3.0 * (speak - speak.mean())
    roll = 2.5 * smooth_noise(rng, frames, 16.0)
    scale = 1.0 + 0.025 * smooth_noise(rng, frames, 20.0)
    shift = 0.015 * size * np.stack([smooth_noise(rng, frames, 18.0), smooth_noise(rng, frames, 18.0)], 1)
    ox, oy = portrait.origin
    to_frame = np.array([[1, 0, -ox], [0, 1, -oy], [0, 0, 1.0]])
    pivot = (portrait.pivot[0] - ox, portrait.pivot[1] - oy)
    pose = np.zeros((frames, 6), np.float32)
    mcx, mcy, mw, mh = portrait.mouth
    mouth_box = np.array([np.inf, np.inf, -np.inf, -np.inf])
    jaw = JAW_DROP * portrait.face_width  # the lower lip's travel
    eye_boxes = [np.array([np.inf, np.inf, -np.inf, -np.inf]) for _ in portrait.eyes]
    chunk: list[np.ndarray] = []
    with VideoWriter(folder / "video.mp4", FPS, size, audio=wave) as writer:
        for t in range(frames):
            h = pose_homography(yaw[t], pitch[t], roll[t], scale[t], tuple(shift[t]), pivot, 3.0 * size)
            m = h @ to_frame
            c = m @ np.array([*portrait.face_centre, 1.0])
            pose[t] = [yaw[t], pitch[t], roll[t], portrait.face_width * scale[t] / size,
                       c[0] / c[2] / size - 0.5, c[1] / c[2] / size - 0.5]
            box = _box_through(m, mcx, mcy, mw / 2 + 1, mh / 2 + max(1.0, mh * 0.2) + jaw + 1)
            mouth_box = np.concatenate([np.minimum(mouth_box[:2], box[:2]), np.maximum(mouth_box[2:], box[2:])])
            for i, (ex, ey, ew, eh) in enumerate(portrait.eyes):
                box = _box_through(m, ex, ey, ew * 0.6, eh * 0.8)
                eye_boxes[i] = np.concatenate([np.minimum(eye_boxes[i][:2], box[:2]),
                                               np.maximum(eye_boxes[i][2:], box[2:])])
            chunk.append(render_frame(portrait, m, size, float(openness[t]), float(closure[t])))
            if len(chunk) == FPS:
                writer.write(np.stack(chunk))
                chunk = []
        if chunk:
            writer.write(np.stack(chunk))

    def clip_box(b: np.ndarray) -> list[int]:
        return [int(np.clip(np.floor(b[0]), 0, size)), int(np.clip(np.floor(b[1]), 0, size)),
                int(np.clip(np.ceil(b[2]), 0, size)), int(np.clip(np.ceil(b[3]), 0, size))]

    np.save(folder / "audio_feats.npy", extractor(wave, frames).astype(np.float32))
    np.save(folder / "pose.npy", pose)
    np.save(folder / "blink.npy", blink)
    meta = {"frames": frames, "fps": FPS, "size": size, "identity": portrait.identity,
            "mouth_box": clip_box(mouth_box), "mouth_open": [round(float(v), 5) for v in openness],
            "eye_boxes": [clip_box(b) for b in eye_boxes], "voice": voice}
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------- data set


def synthesize(out: str | Path, videos: int = 8, size: int = 128, seconds: float = 4.0, seed: int = 0,
               test_fraction: float = 0.1, videos_per_identity: int = 1, speech: str = "auto",
               audio_features: str = "logmel", verbose: bool = True) -> Path:
    """Write the synthetic data set to ``out`` (layout of docs/interfaces.md) and return ``out``.

    ``videos`` clips of ``seconds`` s at ``size`` x ``size``; ``videos_per_identity``
    clips share one portrait; the last ``max(1, round(test_fraction * identities))``
    identities form the test split, so test faces never appear in train.
    ``speech``: "auto" (espeak-ng if installed, else syllables), "espeak" or
    "syllables". Identical npy files for the same arguments.
    """
    if videos < 2:
        raise ValueError(f"videos must be at least 2 (one train, one test), got {videos}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be an even number >= 32, got {size}")
    if seconds < 1.0:
        raise ValueError(f"seconds must be at least 1.0, got {seconds}")
    if videos_per_identity < 1 or math.ceil(videos / videos_per_identity) < 2:
        raise ValueError(f"videos={videos} with videos_per_identity={videos_per_identity} gives fewer "
                         "than 2 identities; need one for train and one for test")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    out = Path(out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    backend = _speech_backend(speech)
    extractor = AudioFeatureExtractor(audio_features)
    frames = int(round(seconds * FPS))
    n_ids = math.ceil(videos / videos_per_identity)
    n_test = min(max(1, int(round(test_fraction * n_ids))), n_ids - 1)
    kinds = _identity_kinds(n_ids)
    portraits: dict[int, Portrait] = {}
    train, test = [], []
    for v in range(videos):
        ident = v // videos_per_identity
        if ident not in portraits:
            portraits[ident] = make_portrait(kinds[ident], ident, np.random.default_rng([seed, 1000 + ident]), size)
        portrait = portraits[ident]
        name = f"{v:03d}_{portrait.identity}"
        tmp, final = out / "videos" / f".{name}.tmp", out / "videos" / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            meta = _write_video(tmp, portrait, np.random.default_rng([seed, v]), size, frames, backend, extractor)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (test if ident >= n_ids - n_test else train).append(name)
        if verbose:
            print(f"synth {v + 1}/{videos}: {name} ({frames} frames, {meta['voice']})")
    manifest = {"format": "microscope-pl/1", "source": "synthetic", "fps": FPS, "sample_rate": SAMPLE_RATE,
                "size": size, "audio_features": audio_features, "audio_dim": extractor.dim,
                "train": train, "test": test, "seed": seed, "seconds": seconds,
                "speech": "espeak-ng" if backend == "espeak" else "syllables",
                "pose_source": "true", "blink_source": "true",
                "framing": dict(SYNTH_FRAMING)}  # how the astronaut photo is cropped (_astronaut)
    tmp_manifest = out / ".manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp_manifest, out / "manifest.json")
    return out
