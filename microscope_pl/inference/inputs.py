"""User inputs for generation: a portrait image and a speech track.

Both loaders fail with a one-line ValueError naming the file, so the CLI can
print `error: ...` and exit 2 instead of a traceback.

Portraits are framed the way the checkpoint's training data was: its data
set's framing recipe (data/framing.py; the synthetic set's when a checkpoint
records none) keeps inference inside the training distribution; without a
detector we fall back to a centre crop and say so.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ASTRONAUT = "astronaut"

DEFAULT_MAX_SECONDS = 120.0
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # generation autocast (generate.precision_autocast)
SILENCE_DBFS = -60.0  # whole-clip RMS below this is treated as silence
SAMPLE_RATE = 16000

LogFn = Callable[[str], None]


def _one_line(text: str, limit: int = 240) -> str:
    """First non-empty line of `text`, shortened: CLI errors stay one line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    first = lines[0] if lines else "unknown error"
    return first if len(first) <= limit else first[: limit - 3] + "..."


# ---------------------------------------------------------------- portraits


def read_image(path: str | Path) -> np.ndarray:
    """Read a portrait -> uint8 `[H, W, 3]` RGB.

    `path` is a PNG/JPEG/WebP/BMP file or "astronaut" (scikit-image's bundled
    photo). Transparency is composited on white, grayscale and 16-bit images
    become RGB, and EXIF rotation is applied (phone photos).
    """
    if str(path) == ASTRONAUT:
        from skimage.data import astronaut

        return np.ascontiguousarray(astronaut(), dtype=np.uint8)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"image {path} has an unsupported type {path.suffix!r}; use {', '.join(IMAGE_SUFFIXES)}")
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"cannot read image {path} ({_one_line(str(err) or type(err).__name__)})") from err


def _to_rgb(img: "Image.Image") -> np.ndarray:  # noqa: F821 (PIL imported lazily)
    """PIL image of any mode -> uint8 `[H, W, 3]`."""
    from PIL import Image

    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float grayscale
        arr = np.asarray(img, dtype=np.float32)
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))


def portrait_box(rgb: np.ndarray, framing: dict[str, Any] | None = None, face_crop: bool = True
                 ) -> tuple[tuple[int, int, int], str]:
    """Square crop ``(x0, y0, side)`` of a portrait by the recipe ``framing``
    (data/framing.py; None: the synthetic set's) and a note saying how it was found."""
    from microscope_pl.data.framing import SYNTH_FRAMING, FaceDetector, centre_box, check_recipe, crop_box

    recipe = check_recipe(SYNTH_FRAMING if framing is None else framing)
    h, w = rgb.shape[:2]
    box, how = None, "centre crop (face crop disabled)"
    if face_crop and recipe["detector"] == "center":
        how = "centre crop (the training data was centre-cropped)"
    elif face_crop:
        try:
            detector = FaceDetector(use_dlib=recipe["detector"] in ("dlib", "mixed"))
            box = detector.detect_downscaled(rgb) if detector.has_detector else None
            if not detector.has_detector:
                how = "centre crop (no face detector: OpenCV's Haar cascade not found)"
            elif box is None:
                how = "centre crop (no face detected)"
            else:
                found_by = detector.last_source
                how = f"face crop ({found_by} box {tuple(round(v) for v in box)}"
                if found_by != recipe["detector"] and recipe["detector"] != "mixed":
                    how += f"; the training data used {recipe['detector']} boxes ({detector.missing})"
                how += ")"
        except (ImportError, RuntimeError, AttributeError) as err:  # no OpenCV
            how = f"centre crop (face detector unavailable: {_one_line(str(err))})"
    if box is None:
        x0, y0, side = centre_box(w, h)
    else:
        x0, y0, side = crop_box(box, w, h, recipe["scale"], recipe["offset"])
    side_px = max(1, min(w, h, int(round(side))))
    x0_px = int(np.clip(round(x0), 0, w - side_px))
    y0_px = int(np.clip(round(y0), 0, h - side_px))
    return (x0_px, y0_px, side_px), how


def crop_portrait(rgb: np.ndarray, size: int, face_crop: bool = True, framing: dict[str, Any] | None = None
                  ) -> tuple[np.ndarray, str]:
    """Square-crop (``portrait_box``) and resize a portrait -> (uint8 `[size, size, 3]`, how it was cropped)."""
    box, how = portrait_box(rgb, framing, face_crop)
    return crop_to_box(rgb, box, size, how)


def crop_to_box(rgb: np.ndarray, box: tuple[int, int, int], size: int, how: str = "crop"
                ) -> tuple[np.ndarray, str]:
    """The square ``box`` ``(x0, y0, side)`` of ``rgb`` resized to ``size`` -> (uint8 `[size, size, 3]`, note)."""
    import cv2

    x0, y0, side = box
    square = rgb[y0:y0 + side, x0:x0 + side]
    # INTER_AREA averages when shrinking (no aliasing); cubic when enlarging.
    interp = cv2.INTER_AREA if side >= size else cv2.INTER_CUBIC
    out = cv2.resize(np.ascontiguousarray(square), (size, size), interpolation=interp)
    h, w = rgb.shape[:2]
    where = f"{side}x{side} at ({x0}, {y0}) of {w}x{h} -> {size}x{size}"
    return np.ascontiguousarray(out, dtype=np.uint8), f"{how}: {where}"


def load_portrait(path: str | Path, size: int, face_crop: bool = True, log: LogFn | None = print,
                  framing: dict[str, Any] | None = None) -> "torch.Tensor":  # noqa: F821
    """Portrait file (or "astronaut") -> float tensor `3 size size` in [0, 1].

    Framed by the recipe ``framing`` when a face is found, centre crop
    otherwise; `log` receives one line saying which.
    """
    import torch

    if size < 1:
        raise ValueError(f"portrait size must be positive, got {size}")
    square, how = crop_portrait(read_image(path), size, face_crop, framing)
    if log is not None:
        log(f"portrait {path}: {how}")
    return torch.from_numpy(square).permute(2, 0, 1).float().div_(255.0)


# ---------------------------------------------------------------- speech


def rms_dbfs(wave: np.ndarray) -> float:
    """Whole-clip RMS level in dBFS (-inf for digital silence)."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if wave.size else 0.0
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def load_speech(path: str | Path, max_seconds: float = DEFAULT_MAX_SECONDS,
                silence_dbfs: float = SILENCE_DBFS) -> np.ndarray:
    """Speech from any file ffmpeg reads (wav, mp3, the audio of a video...) ->
    float32 `[samples]` mono at 16 kHz.

    Raises a one-line ValueError for a missing or unreadable file, no audio,
    silence (RMS below `silence_dbfs`) or more than `max_seconds` seconds
    (the whole clip is denoised at once, so length bounds memory).
    """
    from microscope_pl.data.audio import load_audio

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio not found: {path}")
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    try:
        wave = np.asarray(load_audio(path, SAMPLE_RATE), dtype=np.float32).reshape(-1)
    except (ValueError, RuntimeError, OSError) as err:
        text = _one_line(str(err))
        raise ValueError(text if str(path) in text else f"cannot read audio {path} ({text})") from err
    if wave.size == 0:
        raise ValueError(f"audio {path} is empty")
    level = rms_dbfs(wave)
    if level < silence_dbfs:
        shown = "-inf" if math.isinf(level) else f"{level:.1f}"
        raise ValueError(f"audio {path} is silent (RMS {shown} dBFS, below {silence_dbfs:g} dBFS)")
    seconds = wave.size / SAMPLE_RATE
    if seconds > max_seconds:
        raise ValueError(f"audio {path} is {seconds:.1f} s long, more than --max-seconds {max_seconds:g}; "
                         "trim it or raise --max-seconds (memory grows with length)")
    return wave


def speak(text: str, out: str | Path, voice: str = "en-us", speed: int = 155) -> Path:
    """Say `text` with espeak-ng -> 16 kHz mono PCM16 wav at `out`.

    Raises ValueError when espeak-ng is not installed (apt-get install espeak-ng).
    """
    from microscope_pl.data.audio import load_audio, write_wav

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ValueError("espeak-ng is not installed (apt-get install espeak-ng); pass an audio file instead")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "speech.wav"  # espeak-ng writes 22.05 kHz; resample through ffmpeg
        proc = subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(raw), text],
                              capture_output=True, check=False)
        if proc.returncode != 0 or not raw.is_file():
            raise ValueError(f"espeak-ng failed ({_one_line(proc.stderr.decode('utf-8', 'replace') or 'no output')})")
        wave = load_audio(raw, SAMPLE_RATE)
    peak = float(np.abs(wave).max(initial=0.0))
    write_wav(out, wave * (0.7 / peak) if peak > 0 else wave, SAMPLE_RATE)
    return out
