"""What the web app (app.py) does on each click, without Gradio: find checkpoints, keep
loaded models, turn the page's fields into `run_generation` options, run one job.

Errors a user can fix come back as the CLI's one line (`error: ...`); anything
else as one line naming the exception, its traceback going to the server's log.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from microscope_pl.inference.inputs import ASTRONAUT, _one_line

POSE_CHOICES = {"PBNet (from the speech)": "pbnet", "still": "still", "reference video": "video",
                "pose file (.npy/.csv)": "file"}
BLINK_CHOICES = {"auto (the pose source's)": "auto", "PBNet": "pbnet", "none": "none", "reference video": "video"}
SAMPLER_CHOICES = {"the checkpoint's": None, "DDIM": "ddim", "DPM-Solver++": "dpm"}
ProgressFn = Callable[[float, str], None]  # (fraction done, what is running)


def find_checkpoints(root: str | Path = "checkpoints") -> list[str]:
    """Generation models under `root`: bundles (folders with model.safetensors) and
    diffusion checkpoints (`<run>/diffusion/{best,last}.ckpt`), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p.parent for p in root.rglob("model.safetensors")]
    found += [p for p in root.glob("*/diffusion/*.ckpt") if p.name in ("best.ckpt", "last.ckpt")]
    found += [p for p in root.glob("diffusion/*.ckpt") if p.name in ("best.ckpt", "last.ckpt")]
    return [str(p) for p in sorted(set(found), key=lambda p: -p.stat().st_mtime)]


class ModelCache:
    """Loaded `GenerationModel`s by checkpoint path (at most `size`, least recently used
    dropped): the model is loaded once per checkpoint, not per click."""

    def __init__(self, size: int = 2) -> None:
        self.size, self.models, self.loads = size, OrderedDict(), 0
        self.lock = threading.Lock()

    def get(self, path: str | Path) -> Any:
        from microscope_pl.inference.loading import load_model, resolve_model_path

        resolved = resolve_model_path(str(path))
        key = (str(resolved.resolve()), resolved.stat().st_mtime_ns)  # a retrained file is loaded again
        with self.lock:
            if key not in self.models:
                self.models[key] = load_model(resolved)
                self.loads += 1
                while len(self.models) > self.size:
                    self.models.popitem(last=False)
            self.models.move_to_end(key)
            return self.models[key]


@dataclass
class AppRequest:
    """The page's fields (Gradio passes None for empty ones)."""

    portrait: str | None = None  # a file, or None for the bundled astronaut
    audio: str | None = None  # an uploaded or recorded file
    text: str | None = None  # else this text, spoken by espeak-ng
    checkpoint: str | None = None
    seed: float | None = 0
    steps: float | None = None  # None or 0: the checkpoint's
    sampler: str | None = None  # a SAMPLER_CHOICES label or value
    audio_scale: float | str | None = None  # empty: the checkpoint's
    pose: str = "pbnet"  # a POSE_CHOICES label or value
    pose_video: str | None = None
    pose_file: str | None = None
    pose_scale: float = 1.0
    blink: str = "auto"
    blink_video: str | None = None
    paste_back: bool = False


def _choice(value: str | None, choices: dict[str, Any]) -> Any:
    """A dropdown/radio value: its label's value, or the value itself."""
    return choices.get(value, value) if value is not None else None


def _number(value: float | str | None, what: str) -> float | None:
    """A number typed in the page; empty: None (the checkpoint's)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not number == number or abs(number) == float("inf"):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return number


def request_options(req: AppRequest) -> dict[str, Any]:
    """`run_generation` keyword options for a request (ValueError for missing pieces)."""
    pose = _choice(req.pose, POSE_CHOICES) or "pbnet"
    if pose == "file":
        if not req.pose_file:
            raise ValueError("pose source 'pose file' needs a .npy or .csv file")
        pose = req.pose_file
    if pose == "video" and not req.pose_video:
        raise ValueError("pose source 'reference video' needs a reference video")
    blink = _choice(req.blink, BLINK_CHOICES) or "auto"
    blink_video = req.blink_video if blink in ("video", "auto") else None
    if blink == "video" and not (blink_video or req.pose_video):
        raise ValueError("blinks from a reference video need a blink or pose reference video")
    steps = int(req.steps) if req.steps else None
    return dict(seed=int(req.seed or 0), steps=steps, sampler=_choice(req.sampler, SAMPLER_CHOICES),
                audio_scale=_number(req.audio_scale, "audio guidance"), pose=pose,
                pose_video=req.pose_video if pose == "video" else None, blink=blink, blink_video=blink_video,
                pose_scale=float(req.pose_scale if req.pose_scale is not None else 1.0),
                paste_back=bool(req.paste_back))


def _uploads_by_name(line: str, req: AppRequest) -> str:
    """The error line with each upload's temporary path shortened to the file's own name."""
    for path in (req.portrait, req.audio, req.pose_video, req.pose_file, req.blink_video):
        if path:
            line = line.replace(str(path), Path(path).name)
    return line


def user_errors() -> tuple[type[BaseException], ...]:
    from microscope_pl.checkpointing import CheckpointError

    return (CheckpointError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


class AppRunner:
    """Runs one job at a time (the page queues them) against cached models."""

    def __init__(self, out_dir: str | Path, default_checkpoint: str | None = None, device: str = "auto",
                 max_seconds: float | None = None, cache: ModelCache | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.default_checkpoint, self.device, self.max_seconds = default_checkpoint, device, max_seconds
        self.cache = cache or ModelCache()

    def _speech(self, req: AppRequest, job: Path) -> str:
        from microscope_pl.inference.inputs import speak

        if req.audio:
            return req.audio
        if req.text and req.text.strip():
            return str(speak(req.text.strip(), job / "speech.wav"))
        raise ValueError("no speech: upload or record audio, or type a sentence to speak")

    def run(self, req: AppRequest, progress: ProgressFn | None = None) -> tuple[Path, str]:
        """Generate one video -> (its path, the timing line); raises the user's errors."""
        options = request_options(req)
        job = self.out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        job.mkdir(parents=True)
        try:
            return self._run(req, options, job, progress or (lambda fraction, what: None))
        except BaseException:
            shutil.rmtree(job, ignore_errors=True)  # a failed job leaves nothing behind
            raise

    def _run(self, req: AppRequest, options: dict[str, Any], job: Path, say: ProgressFn) -> tuple[Path, str]:
        from microscope_pl.inference.generate import run_generation

        audio = self._speech(req, job)
        checkpoint = req.checkpoint or self.default_checkpoint
        if not checkpoint:
            raise ValueError("no checkpoint: train one (`make all`), export a bundle, or type its path")
        say(0.0, "loading the model")
        model = self.cache.get(checkpoint)

        def stages(stage: str, done: int, total: int) -> None:
            start, span = (0.05, 0.75) if stage == "denoise" else (0.8, 0.2)
            say(start + span * done / max(total, 1), f"{stage} {done}/{total}")

        extra = {"max_seconds": self.max_seconds} if self.max_seconds else {}
        report = run_generation(model, req.portrait or ASTRONAUT, audio, job / "talking_head.mp4", device=self.device,
                                progress=False, on_progress=stages, **options, **extra)
        return report.path, report.summary()

    def run_for_page(self, req: AppRequest, progress: ProgressFn | None = None) -> tuple[str | None, str]:
        """`run`, with every failure as one line for the page: (video path or None, status line)."""
        try:
            path, summary = self.run(req, progress)
            return str(path), summary
        except user_errors() as err:
            return None, f"error: {_uploads_by_name(_one_line(str(err) or type(err).__name__), req)}"
        except Exception as err:  # noqa: BLE001 - the page shows one line; the log keeps the traceback
            traceback.print_exc()
            return None, f"error: {type(err).__name__}: {_one_line(str(err))} (details in the server log)"


def default_out_dir() -> Path:
    """Where the app keeps its videos: $MICROSCOPE_APP_OUT, else outputs/app/."""
    return Path(os.environ.get("MICROSCOPE_APP_OUT", "outputs/app"))
