"""`microscope generate`: portrait + speech -> talking-head video (one, or a batch from a CSV).

Registered by `microscope_pl.cli`; heavy imports (torch, the networks) happen
inside the command so `microscope --help` stays fast.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_SENTENCE = "Hello! This portrait was animated by a latent video diffusion model, from speech alone."
BATCH_FAILED = 1  # exit status when some rows of a batch failed (2: the command itself was refused)


def _add_motion_options(p: argparse.ArgumentParser, d: str) -> None:
    """Pose and blink sources, strength and reference videos."""
    p.add_argument("--pose", default=None,
                   help="pbnet (sampled from the audio), still (portrait pose), video (--pose-video), or a .npy/.csv "
                        "file of per-frame yaw, pitch, roll, scale, tx, ty, blink left, blink right "
                        "(default: video with --pose-video, else pbnet)")
    p.add_argument("--pose-video", default=None, metavar="REF.mp4",
                   help="take head pose from this video (face landmarks as in `data prepare`; looped or trimmed to "
                        "the speech, relative to its first frame)")
    p.add_argument("--pose-scale", type=float, default=1.0,
                   help="pose strength: multiplies the head motion (0: the portrait's pose; blinks are kept)" + d)
    p.add_argument("--blink", choices=("auto", "none", "pbnet", "video"), default="auto",
                   help="blink source; auto: the pose source's (PBNet's, the file's, the video's; none for still)" + d)
    p.add_argument("--blink-video", default=None, metavar="REF.mp4",
                   help="take blinks from this video (default for --blink video: --pose-video)")
    p.add_argument("--reference-pose", choices=("first", "zero"), default="first",
                   help="pose files: first: the portrait has the pose of the track's first frame (subtracted); "
                        "zero: the track already holds deltas relative to the portrait" + d)
    p.add_argument("--save-motion", default=None, metavar="FILE.npy",
                   help="also save the pose/blink conditions used ([frames, 8] deltas; replay them with "
                        "--pose FILE.npy --reference-pose zero)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand (its `func(args) -> int` runs it)."""
    from microscope_pl.inference.inputs import DEFAULT_MAX_SECONDS, PRECISIONS

    p = subparsers.add_parser(
        "generate", help="portrait + speech -> talking-head video (mp4 with the speech muxed)",
        description="Generate a talking-head video: every frame is denoised at once by the latent diffusion "
                    "model, then decoded in chunks by the frozen MDCF and streamed to the output file. "
                    "--batch jobs.csv makes many videos with the model loaded once.")
    d = " (default: %(default)s)"
    p.add_argument("--ckpt-path", "--ckpt_path", "--checkpoint", "--ckpt", dest="ckpt_path", default=None,
                   help="diffusion checkpoint or generation bundle (`microscope export`) (default: "
                        "checkpoints/synth/diffusion/best.ckpt, else last.ckpt)")
    p.add_argument("--image", default=None,
                   help="portrait: PNG/JPEG/WebP/BMP file, or 'astronaut' (scikit-image's photo)")
    p.add_argument("--audio", default=None,
                   help="speech: any file ffmpeg reads, incl. a video's audio (default: an espeak-ng sentence)")
    p.add_argument("--out", default=None, help="output video (.mp4, .mkv or .mov); relative to --out-dir if given")
    p.add_argument("--out-dir", default=None,
                   help="folder for the outputs (batch rows' relative `out`; without --out: <portrait>.mp4)")
    p.add_argument("--batch", default=None, metavar="JOBS.csv",
                   help="CSV with columns portrait, audio, out and an optional seed: one video per row")
    p.add_argument("--pbnet-ckpt-path", "--pbnet-checkpoint", dest="pbnet_ckpt_path", default=None,
                   help="PBNet checkpoint (default: the bundle's, else pbnet/{best,last}.ckpt beside the diffusion "
                        "checkpoint's folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise (PBNet: seed + 1)" + d)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's, 20)")
    p.add_argument("--sampler", choices=("ddim", "dpm"), default=None,
                   help="ddim or dpm (DPM-Solver++ 2M) (default: the checkpoint's)")
    p.add_argument("--audio-scale", type=float, default=None,
                   help="guidance scale of the audio condition (default: the checkpoint's)")
    p.add_argument("--motion-scale", type=float, default=None,
                   help="guidance scale of pose/blink (default: the checkpoint's)")
    p.add_argument("--guidance-every", type=int, default=None, metavar="K",
                   help="evaluate the guidance branches every K-th step and reuse their correction between "
                        "(1: every step; default: the checkpoint's, 4)")
    p.add_argument("--resolution", type=int, default=None,
                   help="frame size; must equal the checkpoint's image_size (default: that size)")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate (the models are trained at 25)" + d)
    _add_motion_options(p, d)
    p.add_argument("--paste-back", action="store_true",
                   help="put the animated face back into the whole photo (still around it, feathered edge)")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help="refuse longer audio (the whole clip is denoised at once)" + d)
    p.add_argument("--decode-chunk", type=int, default=16, help="frames decoded at once (bounds decoder memory)" + d)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N" + d)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on a GPU that has it; on a CPU, fp32 denoising and bf16 decoding "
                        "where the CPU has native bf16 (AVX512-BF16, AMX), else fp32" + d)
    p.add_argument("--audio-features", default=None,
                   help="audio features if the checkpoint does not say: logmel or hubert:<model id or dir>")
    p.add_argument("--no-face-crop", action="store_true", help="centre-crop the portrait instead of finding the face")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `run_generation` keyword options shared by a single run and every batch row."""
    return dict(pbnet_checkpoint=args.pbnet_ckpt_path, seed=args.seed, steps=args.steps, sampler=args.sampler,
                audio_scale=args.audio_scale, motion_scale=args.motion_scale, guidance_every=args.guidance_every,
                resolution=args.resolution,
                fps=args.fps, pose=args.pose, reference_pose=args.reference_pose, blink=args.blink,
                pose_scale=args.pose_scale, pose_video=args.pose_video, blink_video=args.blink_video,
                paste_back=args.paste_back, decode_chunk=args.decode_chunk, device=args.device,
                precision=args.precision, progress=not args.no_progress, max_seconds=args.max_seconds,
                audio_features_kind=args.audio_features, face_crop=not args.no_face_crop)


def single_output(out: str | None, out_dir: str | None, image: str) -> Path:
    """--out (under --out-dir when relative), else --out-dir/<portrait name>.mp4."""
    if out is None and out_dir is None:
        raise ValueError("--out (or --out-dir) is required")
    if out is None:
        return Path(out_dir) / f"{Path(image).stem}.mp4"
    return Path(out_dir) / out if out_dir is not None and not Path(out).is_absolute() else Path(out)


def run(args: argparse.Namespace) -> int:
    """Run `generate` from parsed arguments; prints each output path on stdout."""
    if args.batch:
        return run_batch_command(args)
    from microscope_pl.inference.generate import generate, log_stderr
    from microscope_pl.inference.inputs import speak
    from microscope_pl.inference.loading import resolve_model_path

    if args.image is None:
        raise ValueError("--image is required (or --batch jobs.csv)")
    out = single_output(args.out, args.out_dir, args.image)
    if args.out_dir is not None:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    checkpoint = resolve_model_path(args.ckpt_path)
    with tempfile.TemporaryDirectory() as tmp:
        audio = args.audio
        if audio is None:  # `make generate` without AUDIO=: say a sentence
            audio = str(speak(DEFAULT_SENTENCE, Path(tmp) / "speech.wav"))
            log_stderr(f"no --audio: speaking {DEFAULT_SENTENCE!r} with espeak-ng")
        path = generate(checkpoint, args.image, audio, out, save_motion=args.save_motion, **generation_options(args))
    print(path, flush=True)
    return 0


def run_batch_command(args: argparse.Namespace) -> int:
    """`--batch`: load the model once, one video per CSV row; 1 if any row failed."""
    from microscope_pl.inference.batch import read_jobs, run_batch
    from microscope_pl.inference.generate import log_stderr
    from microscope_pl.inference.loading import load_model, resolve_model_path

    for flag in ("image", "audio", "out", "save_motion"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} does not go with --batch (the CSV names each row's files)")
    jobs, problems = read_jobs(args.batch, args.out_dir)
    for line in problems:
        log_stderr(f"failed {line}")
    model = load_model(resolve_model_path(args.ckpt_path))  # once for every row
    result = run_batch(model, jobs, generation_options(args), report=log_stderr)
    for path in result.written:
        print(path, flush=True)
    failed = len(problems) + len(result.failed)
    log_stderr(f"batch {args.batch}: {len(result.written)} written, {failed} failed")
    return BATCH_FAILED if failed else 0

