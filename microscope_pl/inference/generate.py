"""Portrait + speech -> talking-head video (paper section 3.2, inference).

The pipeline:

```
speech ─features─► audio_1:N ─PBNet─► pose_1:N, blink_1:N   (or still, a file, a reference video)
portrait ─crop─► x_src ─┐
audio, pose, blink ─────┴─► 3D U-Net, all N frames denoised together ─► z_1:N
z_1:N ─(chunks of k frames) LMAE decode ─► [f; m] ─ FDE decode(E(x_src)) ─► frames ─► H.264 + AAC
```

Non-autoregressive: one `sample_latents` call covers the whole clip, so
there are no seams between windows; only decoding is chunked, and chunks are
streamed into ffmpeg so memory does not grow with the clip length outside the
(tiny) latents. The video appears under its final name only once complete.
`--paste-back` blends each frame into the whole photo (paste.py) on its way
to the encoder. Batch runs (batch.py) and the app load the model once
(`loading.load_model`) and pass it in place of the checkpoint path.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from microscope_pl.inference.driving import check_reference_videos
from microscope_pl.inference.inputs import (
    DEFAULT_MAX_SECONDS,
    PRECISIONS,
    SAMPLE_RATE,
    _one_line,
    crop_to_box,
    load_speech,
    portrait_box,
    read_image,
)
from microscope_pl.inference.motion import (  # noqa: F401 (load_motion_file: part of this module's API)
    check_motion_options,
    load_motion_file,
    motion_conditions,
    resolve_pose,
)

SAMPLER_NAMES = ("ddim", "dpm")  # diffusion.pipeline.SAMPLERS: DDIM and DPM-Solver++(2M)
CONTAINERS = (".mp4", ".mkv", ".mov")  # VideoWriter encodes H.264; these containers carry it
TRAINED_FPS = 25
ProgressFn = Callable[[str, int, int], None]  # (stage "denoise" | "decode", done, total)

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
    sampler: str
    width: int  # output frame size: image_size, or the photo's with paste-back
    height: int
    prepare_s: float  # loading checkpoints, portrait, audio features, pose
    denoise_s: float
    decode_s: float  # LMAE + FDE decoding and H.264/AAC encoding, streamed together
    total_s: float

    def summary(self) -> str:
        """One line with the timings (printed after generation)."""
        frame = f"{self.image_size}px" if self.width == self.height == self.image_size else \
            f"{self.image_size}px pasted into {self.width}x{self.height}"
        return (f"{self.frames} frames ({self.audio_seconds:.2f} s at {self.fps:g} fps, {frame}) on "
                f"{self.device}: denoise {self.denoise_s:.2f} s ({self.steps} {self.sampler} steps, all frames at "
                f"once), "
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


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (AVX512-BF16 or AMX), where oneDNN's
    bf16 kernels are about twice as fast as fp32; elsewhere bf16 would only be emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def precision_autocast(precision: str, device: torch.device, stage: str = "denoise") -> Any:
    """Autocast context of `resolve_precision`: none for fp32."""
    precision = resolve_precision(precision, device, stage)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def decode_precision(precision: str, device: torch.device) -> tuple[Any, torch.dtype | None]:
    """How decoding runs at `resolve_precision(precision, device, "decode")`: the context to
    decode in and the `dtype` for `decode_chunks`. bf16 decodes with a bf16 copy of the
    decoders (no autocast: 6-16% faster on a CPU, where autocast's casts of every layer's
    input and output are not free); fp16 keeps autocast, whose float32 residual stream
    does not overflow fp16's range."""
    precision = resolve_precision(precision, device, "decode")
    if precision == "bf16":
        return nullcontext(), torch.bfloat16
    return precision_autocast(precision, device, "decode"), None


def resolve_precision(precision: str, device: torch.device, stage: str = "denoise") -> str:
    """"fp32", "bf16" or "fp16" for a precision name and a stage of generation ("denoise", "decode").

    "auto" is bf16 on a GPU that has it (Ampere, 8.x, and newer; a V100 would only
    emulate it) for both stages; on the CPU it is fp32 for denoising (the denoiser over
    the tiny MDCF latent is bound by overheads, not arithmetic) and bf16 for decoding
    where the CPU has native bf16: the decoder's convolutions are most of generation
    there, and its frames stay within 0.1 dB PSNR of fp32 (docs/results.md). Only
    matmuls and convolutions run in the lower precision; the sampler's updates and
    the warps' sample positions stay fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if stage not in ("denoise", "decode"):
        raise ValueError(f"stage must be 'denoise' or 'decode', got {stage!r}")
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
        else:
            precision = "bf16" if stage == "decode" and device.type == "cpu" and cpu_has_bf16() else "fp32"
    return precision


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


def _check_options(out: Path, fps: float, decode_chunk: int, steps: int | None, max_seconds: float,
                   sampler: str | None, guidance_every: int | None = None) -> None:
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
    if sampler is not None and sampler not in SAMPLER_NAMES:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLER_NAMES)}, got {sampler!r}")
    if guidance_every is not None and guidance_every < 1:
        raise ValueError(f"--guidance-every must be at least 1, got {guidance_every}")


class _Stages:
    """Progress of the two long stages (denoise, decode) to rich bars and/or a callback."""

    def __init__(self, bars: Any, callback: ProgressFn | None) -> None:
        self.bars, self.callback, self.tasks = bars, callback, {}

    def start(self, stage: str, total: int) -> None:
        if self.bars is not None:
            self.tasks[stage] = self.bars.add_task(stage, total=total)
        if self.callback is not None:
            self.callback(stage, 0, total)

    def update(self, stage: str, done: int, total: int) -> None:
        if self.bars is not None:
            self.bars.update(self.tasks[stage], completed=done, total=total)
        if self.callback is not None:
            self.callback(stage, done, total)


def _speech_features(wave: np.ndarray, record: dict[str, Any], num_frames: int, fps: float, dev: torch.device,
                     override: str | None, source: Any, say: LogFn) -> tuple[torch.Tensor, str]:
    """Per-frame audio features `1 n d` (CPU) of the speech at the training data's level, and their kind."""
    heard = wave  # what the model hears; the video keeps the recording as it is
    data = record.get("data") or {}
    if data.get("loudness_dbfs") is not None:  # the level the training speech was normalised to
        from microscope_pl.data.audio import normalize_loudness, speech_level_dbfs

        heard = normalize_loudness(wave, float(data["loudness_dbfs"]))
        say(f"audio {source}: speech at {speech_level_dbfs(wave):.1f} dBFS, heard at "
            f"{data['loudness_dbfs']:g} dBFS like the training data")
    kind = resolve_audio_features(record, override)
    audio_dim = int(record["networks"]["denoiser"]["audio_dim"])
    feats = audio_features(heard, num_frames, kind, audio_dim, fps, dev).cpu()
    say(f"audio {source}: {wave.size / SAMPLE_RATE:.2f} s -> {num_frames} frames of {kind} features")
    return feats, kind


def _save_motion(path: str | Path, pose: torch.Tensor, blink: torch.Tensor) -> Path:
    """The conditions used, `[n, 8]` float32 deltas (pose 6, blink 2), written atomically to a .npy file;
    `--pose FILE --reference-pose zero` plays them again."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    try:
        np.save(tmp, torch.cat([pose, blink], dim=-1)[0].numpy().astype(np.float32))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _load_model(checkpoint: Any) -> Any:
    """A loaded `GenerationModel` as it is, else the checkpoint or bundle at that path."""
    from microscope_pl.inference.loading import GenerationModel, load_model

    return checkpoint if isinstance(checkpoint, GenerationModel) else load_model(checkpoint)


# ---------------------------------------------------------------- generation


def run_generation(
    checkpoint: Any,
    image: str | Path,
    audio: str | Path,
    out: str | Path,
    *,
    pbnet_checkpoint: str | None = None,
    seed: int = 0,
    steps: int | None = None,
    sampler: str | None = None,
    audio_scale: float | None = None,
    motion_scale: float | None = None,
    guidance_every: int | None = None,
    resolution: int | None = None,
    fps: float = TRAINED_FPS,
    pose: str | None = None,
    reference_pose: str = "first",
    blink: str = "auto",
    pose_scale: float = 1.0,
    pose_video: str | Path | None = None,
    blink_video: str | Path | None = None,
    paste_back: bool = False,
    save_motion: str | Path | None = None,
    decode_chunk: int = 16,
    device: str = "auto",
    precision: str = "auto",
    progress: bool = True,
    on_progress: ProgressFn | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    audio_features_kind: str | None = None,
    face_crop: bool = True,
    log: LogFn | None = None,
) -> GenerationReport:
    """Generate a talking-head video.

    Args:
        checkpoint: a diffusion checkpoint (`checkpoints/synth/diffusion/last.ckpt`, it
            carries the frozen FDE + LMAE), a generation bundle (`microscope export`),
            or a `loading.GenerationModel` already loaded (batch runs, the app).
        image: portrait file (PNG/JPEG/WebP/BMP) or "astronaut".
        audio: speech, any file ffmpeg reads (also the audio of a video).
        out: output video (.mp4, .mkv or .mov); written to a temporary name and
            renamed when complete, so a failure never leaves a partial file.
        pbnet_checkpoint: PBNet checkpoint; default the bundle's, else pbnet/{best,last}.ckpt in
            the diffusion checkpoint's run folder (checkpoints/synth/pbnet/ for checkpoints/synth/diffusion/).
        seed: seed of the diffusion noise (PBNet uses seed + 1).
        steps: sampling steps; default the checkpoint's sampling.steps (20).
        sampler: "ddim" or "dpm" (DPM-Solver++ 2M); default the checkpoint's.
        audio_scale: classifier-free guidance scale of audio; default the checkpoint's.
        motion_scale: guidance scale of pose/blink; default the checkpoint's.
        guidance_every: guidance branches every k-th step, their correction reused between
            (samplers.guided_model_fn); default the checkpoint's (4).
        resolution: must equal the checkpoint's image_size when given.
        fps: output frame rate; N = round(duration * fps) frames.
        pose: "pbnet" (sampled from the audio), "still" (the portrait's pose), "video"
            (tracked in `pose_video`), or a .npy/.csv file of per-frame 6 pose + 2 blink
            values; default "video" when `pose_video` is given, else "pbnet".
        reference_pose: for pose files: "first" (the portrait has the pose of the track's
            first frame: subtract it) or "zero" (the track already holds deltas).
        blink: "auto" (the pose source's blinks; none for still), "none", "pbnet", or
            "video" (`blink_video`, else `pose_video`).
        pose_scale: multiplies the pose deltas (0: the portrait's pose throughout; blinks kept).
        pose_video, blink_video: reference videos whose head pose / blinks drive the
            portrait (landmarks as in `data prepare`; looped or trimmed to the speech,
            relative to the video's first frame).
        paste_back: put the animated crop back into the whole photo (feathered edge).
        save_motion: also write the pose/blink conditions used to this `.npy` (`[n, 8]`).
        decode_chunk: frames decoded at once by LMAE + FDE (bounds decoder memory).
        device: "auto", "cpu", "cuda", "cuda:1", ...
        precision: "auto" (bf16 autocast on a GPU that supports it; on a CPU, fp32
            denoising and bf16 decoding where it has native bf16), "fp32", "bf16" or
            "fp16" (autocast of the denoiser and decoders; see `precision_autocast`).
        progress: show rich progress bars for denoising and decoding.
        on_progress: also called as `(stage, done, total)` for "denoise" and "decode".
        max_seconds: refuse longer audio (the clip is denoised in one piece).
        audio_features_kind: override the audio features ("logmel", "hubert:<id or dir>").
        face_crop: crop around a detected face (else a centre crop).
        log: receives progress notes and the timing line (None: silent).

    Returns a :class:`GenerationReport` with the path and the timings.
    """
    from microscope_pl.data.video_io import VideoWriter
    from microscope_pl.inference.paste import PasteBack

    start = time.perf_counter()
    say: LogFn = log or (lambda msg: None)
    out = Path(out)
    pose = resolve_pose(None if pose is None else str(pose), None if pose_video is None else str(pose_video))
    _check_options(out, fps, decode_chunk, steps, max_seconds, sampler, guidance_every)
    check_motion_options(pose, blink, pose_scale, pose_video, blink_video, reference_pose)
    if save_motion is not None and Path(save_motion).suffix.lower() != ".npy":
        raise ValueError(f"--save-motion {save_motion} must end in .npy")

    # Inputs first: a bad file fails in a second, before any network is built.
    wave = load_speech(audio, max_seconds)
    rgb = read_image(image)
    check_reference_videos(pose_video, blink_video)
    num_frames = frame_count(wave.size, fps)
    if num_frames < 1:
        raise ValueError(f"audio {audio} is {wave.size / SAMPLE_RATE * 1000:.0f} ms long, "
                         f"shorter than one frame at {fps:g} fps")

    model = _load_model(checkpoint)  # CheckpointError for another phase or a corrupt file
    pipeline, record = model.pipeline, model.record
    size = pipeline.image_size
    if resolution is not None and int(resolution) != size:
        raise ValueError(f"--resolution {resolution} does not match the checkpoint's image_size {size}; "
                         f"generate at {size} (each checkpoint works at the size it was trained at)")
    if fps != TRAINED_FPS:
        say(f"note: the model was trained at {TRAINED_FPS} fps; motion at {fps:g} fps is extrapolated")
    dev = resolve_device(device)
    autocast = precision_autocast(precision, dev)  # a bad precision fails before any work
    decode_context, decode_dtype = decode_precision(precision, dev)
    framing = (record.get("data") or {}).get("framing")
    box, how = portrait_box(rgb, framing, face_crop)
    square, how = crop_to_box(rgb, box, size, how)
    say(f"portrait {image}: {how}")
    feats, kind = _speech_features(wave, record, num_frames, fps, dev, audio_features_kind, audio, say)
    pose_t, blink_t, pose_source = motion_conditions(
        pose, reference_pose, feats, int(record["networks"]["denoiser"]["audio_dim"]), model, pbnet_checkpoint,
        torch.Generator().manual_seed(seed + 1), say, blink=blink, pose_scale=pose_scale,
        pose_video=None if pose_video is None else str(pose_video),
        blink_video=None if blink_video is None else str(blink_video), fps=fps, framing=framing)
    composer = PasteBack(rgb, box) if paste_back else None
    frame_size = composer.size if composer is not None else (size, size)

    pipeline = pipeline.to(dev)
    reference = torch.from_numpy(square).permute(2, 0, 1).float().div(255.0)[None]
    batch = {"reference": reference.to(dev), "audio": feats.to(dev),
             "pose": pose_t.to(dev), "blink": blink_t.to(dev)}
    total_steps = int(steps or pipeline.sampling.steps)
    sampler_name = sampler or pipeline.sampling.sampler
    _sync(dev)
    prepared = time.perf_counter()

    with _progress(progress) as bars:
        stages = _Stages(bars, on_progress)
        # ---- denoise all N frames together (non-autoregressive, eq. 10)
        stages.start("denoise", total_steps)
        with autocast:
            z = pipeline.sample_latents(batch, generator=torch.Generator().manual_seed(seed), steps=total_steps,
                                        audio_scale=audio_scale, motion_scale=motion_scale, sampler=sampler_name,
                                        guidance_every=guidance_every,
                                        progress=lambda i, n: stages.update("denoise", i + 1, n))
        _sync(dev)
        denoised = time.perf_counter()

        # ---- decode in chunks, streamed to ffmpeg (temp file, renamed on success)
        stages.start("decode", num_frames)
        with torch.no_grad(), decode_context, \
                VideoWriter(out, fps, frame_size, audio=wave, sample_rate=SAMPLE_RATE) as writer:
            for frames in pipeline.decode_chunks(batch["reference"], z, decode_chunk, decode_dtype):
                pixels = _to_uint8(frames)
                writer.write(composer(pixels) if composer is not None else pixels)
                stages.update("decode", writer.frames_written, num_frames)
            if writer.frames_written != num_frames:  # raised inside: the writer discards the file
                raise RuntimeError(f"decoded {writer.frames_written} frames, expected {num_frames}")
        decoded = time.perf_counter()
    if save_motion is not None:
        say(f"pose and blink conditions saved to {_save_motion(save_motion, pose_t, blink_t)}")

    return GenerationReport(
        path=out, frames=num_frames, fps=float(fps), audio_seconds=wave.size / SAMPLE_RATE, image_size=size,
        steps=total_steps, audio_features=kind, pose_source=pose_source, device=str(dev), sampler=sampler_name,
        width=frame_size[0], height=frame_size[1], prepare_s=prepared - start, denoise_s=denoised - prepared,
        decode_s=decoded - denoised, total_s=decoded - start)


def generate(checkpoint: Any, image: str | Path, audio: str | Path, out: str | Path, *,
             log: LogFn | None = log_stderr, **options: Any) -> Path:
    """Portrait + speech -> talking-head video file; returns its path.

    The options are those of :func:`run_generation`; this wrapper also logs
    the timing summary.
    """
    report = run_generation(checkpoint, image, audio, out, log=log, **options)
    if log is not None:
        log(report.summary())
    return report.path
