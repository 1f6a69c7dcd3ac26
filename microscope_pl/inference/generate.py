"""Portrait + speech -> talking-head video (paper section 3.2, inference).

The pipeline:

```
speech ─features─► audio_1:N ─PBNet─► pose_1:N, blink_1:N      (or still / a file)
portrait ─crop─► x_src ─┐
audio, pose, blink ─────┴─► 3D U-Net, all N frames denoised together ─► z_1:N
z_1:N ─(chunks of k frames) LMAE decode ─► [f; m] ─ FDE decode(E(x_src)) ─► frames ─► H.264 + AAC
```

Non-autoregressive: one `sample_latents` call covers the whole clip, so
there are no seams between windows; only decoding is chunked, and chunks are
streamed into ffmpeg so memory does not grow with the clip length outside the
(tiny) latents. The video appears under its final name only once complete.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from microscope_pl.inference.inputs import (
    DEFAULT_MAX_SECONDS,
    PRECISIONS,
    SAMPLE_RATE,
    _one_line,
    crop_portrait,
    load_speech,
    read_image,
)

POSE_SOURCES = ("pbnet", "still")
REFERENCE_POSES = ("first", "zero")
MOTION_SUFFIXES = (".npy", ".csv")
CONTAINERS = (".mp4", ".mkv", ".mov")  # VideoWriter encodes H.264; these containers carry it
TRAINED_FPS = 25

LogFn = Callable[[str], None]


def log_stderr(message: str) -> None:
    """Default log: notes go to stderr, so stdout carries only the output path."""
    print(message, file=sys.stderr, flush=True)


@dataclass
class GenerationReport:
    """What one `run_generation` call produced and how long each part took."""

    path: Path
    frames: int
    fps: float
    audio_seconds: float
    image_size: int
    steps: int
    audio_features: str
    pose_source: str
    device: str
    prepare_s: float  # loading checkpoints, portrait, audio features, pose
    denoise_s: float
    decode_s: float  # LMAE + FDE decoding and H.264/AAC encoding, streamed together
    total_s: float

    def summary(self) -> str:
        """One line with the timings (printed after generation)."""
        return (f"{self.frames} frames ({self.audio_seconds:.2f} s at {self.fps:g} fps, {self.image_size}px) on "
                f"{self.device}: denoise {self.denoise_s:.2f} s ({self.steps} steps, all frames at once), "
                f"decode+encode {self.decode_s:.2f} s, setup {self.prepare_s:.2f} s, total {self.total_s:.2f} s")

    def to_json(self) -> str:
        data = asdict(self)
        data["path"] = str(self.path)
        return json.dumps(data)


# ---------------------------------------------------------------- helpers


def frame_count(num_samples: int, fps: float, sample_rate: int = SAMPLE_RATE) -> int:
    """N = round(duration * fps), rounding halves up (Python's round() would round them to even)."""
    return int(math.floor(num_samples / sample_rate * fps + 0.5))


def resolve_device(device: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything torch.device accepts otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} ({_one_line(str(err))})") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def precision_autocast(precision: str, device: torch.device) -> Any:
    """Autocast context for a precision name: "auto" is bf16 on a GPU that has it, else fp32.

    Only matmuls and convolutions run in the lower precision; the sampler's
    updates stay fp32 (x_t is fp32, so each update promotes back).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":  # Ampere (8.x) and newer have bf16 units; V100 would only emulate it
        precision = "bf16" if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def resolve_audio_features(record: dict[str, Any], override: str | None = None) -> str:
    """The audio feature kind the checkpoint was trained with: `override`, else the
    kind its record names; 80-d features can only be the log-mel fallback."""
    if override:
        return override
    if record.get("audio_features"):
        return str(record["audio_features"])
    audio_dim = int(record["networks"]["denoiser"]["audio_dim"])
    if audio_dim == 80:
        return "logmel"
    raise ValueError(f"the checkpoint was trained on {audio_dim}-d audio features of an unrecorded kind; "
                     "pass --audio-features (e.g. hubert:facebook/hubert-large-ls960-ft or hubert:/path/to/hubert)")


def audio_features(wave: np.ndarray, num_frames: int, kind: str, audio_dim: int, fps: float,
                   device: torch.device) -> torch.Tensor:
    """Per-frame features `1 n d` of `wave`, checked against the model's width `audio_dim`."""
    from microscope_pl.data.audio import AudioFeatureExtractor

    try:
        extractor = AudioFeatureExtractor(kind, device=device)
    except (RuntimeError, OSError, ImportError) as err:  # HuBERT weights missing or unreadable
        raise ValueError(f"audio features {kind!r}: {_one_line(str(err))}") from err
    if extractor.dim != audio_dim:
        raise ValueError(f"--audio-features {kind} gives {extractor.dim}-d features, "
                         f"the checkpoint expects audio_dim {audio_dim}")
    feats = np.asarray(extractor(wave, num_frames, fps), dtype=np.float32)
    return torch.from_numpy(feats)[None]


def load_motion_file(path: str | Path, num_frames: int) -> np.ndarray:
    """Per-frame pose (6) + blink (2) values from `.npy` `[T, 8]` or a `.csv`
    with 8 columns (an optional header row) -> float32 `[num_frames, 8]`.

    Longer tracks are cut to the clip; shorter ones are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pose file not found: {path}")
    try:
        if path.suffix.lower() == ".npy":
            track = np.load(path, allow_pickle=False)
        else:
            try:
                track = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
            except ValueError:  # a header row
                track = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64, skiprows=1)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read pose file {path} ({_one_line(str(err))})") from err
    track = np.asarray(track, dtype=np.float32)
    if track.ndim != 2 or track.shape[1] != 8:
        raise ValueError(f"pose file {path} must hold [frames, 8] values (yaw, pitch, roll, scale, tx, ty, "
                         f"blink left, blink right), got shape {list(track.shape)}")
    if not np.isfinite(track).all():
        raise ValueError(f"pose file {path} contains NaN or infinite values")
    if track.shape[0] < num_frames:
        raise ValueError(f"pose file {path} has {track.shape[0]} frames, the audio needs {num_frames}")
    return track[:num_frames]


def motion_conditions(pose: str, reference_pose: str, audio: torch.Tensor, audio_dim: int,
                      checkpoint: str | Path, pbnet_checkpoint: str | None, generator: torch.Generator,
                      log: LogFn) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Pose `1 n 6` and blink `1 n 2` for the denoiser, as deltas from the portrait.

    `pose`: "pbnet" samples them from the audio (`audio` `1 n d` on the CPU) with the
    PBNet beside the diffusion `checkpoint` (or `pbnet_checkpoint`),
    "still" keeps the portrait's pose and eyes (zeros), a path reads a track.
    `reference_pose`: how the values relate to the portrait. "first": the
    portrait shows the pose of the track's first frame, so the first row is
    subtracted (the video starts exactly at the portrait); "zero": the values
    already are deltas relative to the portrait and are used as they are.
    PBNet and "still" produce deltas from their first frame, so for them both
    settings give the same result.
    """
    n = audio.shape[1]
    if pose == "still":
        return torch.zeros(1, n, 6), torch.zeros(1, n, 2), "still (portrait pose, no blinks)"
    if pose == "pbnet":
        from microscope_pl.inference.loading import find_pbnet, load_pbnet

        path = find_pbnet(checkpoint, pbnet_checkpoint)
        pbnet, _ = load_pbnet(path)
        if int(pbnet.audio_dim) != audio_dim:
            raise ValueError(f"PBNet {path} takes audio_dim {pbnet.audio_dim}, "
                             f"the diffusion checkpoint audio_dim {audio_dim}")
        # PBNet is small: sample it on the CPU so a seed gives the same motion on any device.
        with torch.no_grad():
            motion = pbnet.sample(audio.float(), generator=generator).float()
        log(f"pose and blink: sampled by PBNet from {path}")
        source = f"pbnet ({path})"
    else:
        motion = torch.from_numpy(load_motion_file(pose, n))[None]
        source = f"file ({pose})"
    if reference_pose == "first":
        motion = motion - motion[:, :1]
    return motion[..., :6].contiguous(), motion[..., 6:].contiguous(), source


def _check_options(out: Path, fps: float, decode_chunk: int, pose: str, reference_pose: str,
                   steps: int | None, max_seconds: float) -> None:
    """Cheap argument checks, before anything is loaded."""
    if out.suffix.lower() not in CONTAINERS:
        raise ValueError(f"--out {out} must end in {', '.join(CONTAINERS)} (H.264 video with AAC audio)")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory")
    if not fps > 0:
        raise ValueError(f"--fps must be positive, got {fps}")
    if decode_chunk < 1:
        raise ValueError(f"--decode-chunk must be at least 1, got {decode_chunk}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be at least 1, got {steps}")
    if not max_seconds > 0:
        raise ValueError(f"--max-seconds must be positive, got {max_seconds}")
    if reference_pose not in REFERENCE_POSES:
        raise ValueError(f"--reference-pose must be one of {', '.join(REFERENCE_POSES)}, got {reference_pose!r}")
    if pose not in POSE_SOURCES and Path(pose).suffix.lower() not in MOTION_SUFFIXES:
        raise ValueError(f"--pose must be pbnet, still or a .npy/.csv file, got {pose!r}")


def _progress(enabled: bool) -> Any:
    """Rich progress bars on stderr (a no-op context when disabled)."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are asynchronous: time what ran, not what was queued
        torch.cuda.synchronize(device)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """`k 3 H W` in [0, 1] -> uint8 `[k, H, W, 3]` on the CPU."""
    return frames.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------- generation


def run_generation(
    checkpoint: str | Path,
    image: str | Path,
    audio: str | Path,
    out: str | Path,
    *,
    pbnet_checkpoint: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    audio_scale: float | None = None,
    motion_scale: float | None = None,
    resolution: int | None = None,
    fps: float = TRAINED_FPS,
    pose: str = "pbnet",
    reference_pose: str = "first",
    decode_chunk: int = 16,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    audio_features_kind: str | None = None,
    face_crop: bool = True,
    log: LogFn | None = None,
) -> GenerationReport:
    """Generate a talking-head video.

    Args:
        checkpoint: a diffusion checkpoint (`checkpoints/synth/diffusion/last.ckpt`); it
            carries the frozen FDE + LMAE, so nothing else is needed but PBNet.
        image: portrait file (PNG/JPEG/WebP/BMP) or "astronaut".
        audio: speech, any file ffmpeg reads (also the audio of a video).
        out: output video (.mp4, .mkv or .mov); written to a temporary name and
            renamed when complete, so a failure never leaves a partial file.
        pbnet_checkpoint: PBNet checkpoint; default pbnet/{best,last}.ckpt in the
            diffusion checkpoint's run folder (checkpoints/synth/pbnet/ for checkpoints/synth/diffusion/).
        seed: seed of the diffusion noise (PBNet uses seed + 1).
        steps: sampling steps; default the checkpoint's sampling.steps (20).
        audio_scale: classifier-free guidance scale of audio; default the checkpoint's.
        motion_scale: guidance scale of pose/blink; default the checkpoint's.
        resolution: must equal the checkpoint's image_size when given.
        fps: output frame rate; N = round(duration * fps) frames.
        pose: "pbnet" (sampled from the audio), "still" (the portrait's pose,
            no blinks), or a .npy/.csv file of per-frame 6 pose + 2 blink values.
        reference_pose: "first" (the portrait has the pose of the track's first
            frame: subtract it) or "zero" (the track already holds deltas
            relative to the portrait). Same result for pbnet and still.
        decode_chunk: frames decoded at once by LMAE + FDE (bounds decoder memory).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        precision: "auto" (bf16 autocast on a GPU that supports it, else fp32),
            "fp32", "bf16" or "fp16" (autocast of the denoiser and decoders).
        progress: show rich progress bars for denoising and decoding.
        max_seconds: refuse longer audio (the clip is denoised in one piece).
        audio_features_kind: override the audio features ("logmel", "hubert:<id or dir>").
        face_crop: crop around a detected face (else a centre crop).
        log: receives progress notes and the timing line (None: silent).

    Returns a :class:`GenerationReport` with the path and the timings.
    """
    from microscope_pl.data.video_io import VideoWriter
    from microscope_pl.inference.loading import load_pipeline

    start = time.perf_counter()
    say: LogFn = log or (lambda msg: None)
    out = Path(out)
    pose = str(pose)
    _check_options(out, fps, decode_chunk, pose, reference_pose, steps, max_seconds)

    # Inputs first: a bad file fails in a second, before any network is built.
    wave = load_speech(audio, max_seconds)
    rgb = read_image(image)
    num_frames = frame_count(wave.size, fps)
    if num_frames < 1:
        raise ValueError(f"audio {audio} is {wave.size / SAMPLE_RATE * 1000:.0f} ms long, "
                         f"shorter than one frame at {fps:g} fps")

    pipeline, record = load_pipeline(checkpoint)  # CheckpointError for another phase or a corrupt file
    size = pipeline.image_size
    audio_dim = int(record["networks"]["denoiser"]["audio_dim"])
    if resolution is not None and int(resolution) != size:
        raise ValueError(f"--resolution {resolution} does not match the checkpoint's image_size {size}; "
                         f"generate at {size} (each checkpoint works at the size it was trained at)")
    if fps != TRAINED_FPS:
        say(f"note: the model was trained at {TRAINED_FPS} fps; motion at {fps:g} fps is extrapolated")
    dev = resolve_device(device)
    autocast = precision_autocast(precision, dev)  # a bad precision fails before any work
    data = record.get("data") or {}
    square, how = crop_portrait(rgb, size, face_crop, data.get("framing"))
    say(f"portrait {image}: {how}")
    heard = wave  # what the model hears; the video keeps the recording as it is
    if data.get("loudness_dbfs") is not None:  # the level the training speech was normalised to
        from microscope_pl.data.audio import normalize_loudness, speech_level_dbfs

        heard = normalize_loudness(wave, float(data["loudness_dbfs"]))
        say(f"audio {audio}: speech at {speech_level_dbfs(wave):.1f} dBFS, heard at "
            f"{data['loudness_dbfs']:g} dBFS like the training data")
    kind = resolve_audio_features(record, audio_features_kind)
    feats = audio_features(heard, num_frames, kind, audio_dim, fps, dev).cpu()
    say(f"audio {audio}: {wave.size / SAMPLE_RATE:.2f} s -> {num_frames} frames of {kind} features")
    pose_t, blink_t, pose_source = motion_conditions(
        pose, reference_pose, feats, audio_dim, checkpoint, pbnet_checkpoint,
        torch.Generator().manual_seed(seed + 1), say)

    pipeline = pipeline.to(dev)
    reference = torch.from_numpy(square).permute(2, 0, 1).float().div(255.0)[None]
    batch = {"reference": reference.to(dev), "audio": feats.to(dev),
             "pose": pose_t.to(dev), "blink": blink_t.to(dev)}
    total_steps = int(steps or pipeline.sampling.steps)
    _sync(dev)
    prepared = time.perf_counter()

    with _progress(progress) as bars, autocast:
        # ---- denoise all N frames together (non-autoregressive, eq. 10)
        steps_task = bars.add_task("denoise", total=total_steps) if bars is not None else None
        callback = (lambda i, n: bars.update(steps_task, completed=i + 1, total=n)) if bars is not None else None
        z = pipeline.sample_latents(batch, generator=torch.Generator().manual_seed(seed), steps=total_steps,
                                  audio_scale=audio_scale, motion_scale=motion_scale, progress=callback)
        _sync(dev)
        denoised = time.perf_counter()

        # ---- decode in chunks, streamed to ffmpeg (temp file, renamed on success)
        frames_task = bars.add_task("decode", total=num_frames) if bars is not None else None
        with torch.no_grad(), VideoWriter(out, fps, size, audio=wave, sample_rate=SAMPLE_RATE) as writer:
            for frames in pipeline.decode_chunks(batch["reference"], z, decode_chunk):
                writer.write(_to_uint8(frames))
                if bars is not None:
                    bars.advance(frames_task, frames.shape[0])
            if writer.frames_written != num_frames:  # raised inside: the writer discards the file
                raise RuntimeError(f"decoded {writer.frames_written} frames, expected {num_frames}")
        decoded = time.perf_counter()

    return GenerationReport(
        path=out, frames=num_frames, fps=float(fps), audio_seconds=wave.size / SAMPLE_RATE, image_size=size,
        steps=total_steps, audio_features=kind, pose_source=pose_source, device=str(dev),
        prepare_s=prepared - start, denoise_s=denoised - prepared, decode_s=decoded - denoised,
        total_s=decoded - start)


def generate(checkpoint: str | Path, image: str | Path, audio: str | Path, out: str | Path, *,
             log: LogFn | None = log_stderr, **options: Any) -> Path:
    """Portrait + speech -> talking-head video file; returns its path.

    The options are those of :func:`run_generation`; this wrapper also logs
    the timing summary.
    """
    report = run_generation(checkpoint, image, audio, out, log=log, **options)
    if log is not None:
        log(report.summary())
    return report.path
