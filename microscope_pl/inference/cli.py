"""`microscope generate`: portrait + speech -> talking-head video.

Registered by `microscope_pl.cli`; heavy imports (torch, the networks) happen
inside the command so `microscope --help` stays fast.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

DEFAULT_SENTENCE = "Hello! This portrait was animated by a latent video diffusion model, from speech alone."


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` subcommand (its `func(args) -> int` runs it)."""
    from microscope_pl.inference.inputs import DEFAULT_MAX_SECONDS, PRECISIONS

    p = subparsers.add_parser(
        "generate", help="portrait + speech -> talking-head video (mp4 with the speech muxed)",
        description="Generate a talking-head video: every frame is denoised at once by the latent diffusion "
                    "model, then decoded in chunks by the frozen MDCF and streamed to the output file.")
    d = " (default: %(default)s)"
    p.add_argument("--ckpt-path", "--ckpt_path", "--checkpoint", "--ckpt", dest="ckpt_path", default=None,
                   help="diffusion checkpoint (default: checkpoints/synth/diffusion/best.ckpt, else last.ckpt)")
    p.add_argument("--image", required=True,
                   help="portrait: PNG/JPEG/WebP/BMP file, or 'astronaut' (scikit-image's photo)")
    p.add_argument("--audio", default=None,
                   help="speech: any file ffmpeg reads, incl. a video's audio (default: an espeak-ng sentence)")
    p.add_argument("--out", required=True, help="output video (.mp4, .mkv or .mov)")
    p.add_argument("--pbnet-ckpt-path", "--pbnet-checkpoint", dest="pbnet_ckpt_path", default=None,
                   help="PBNet checkpoint for --pose pbnet (default: pbnet/{best,last}.ckpt beside the diffusion "
                        "checkpoint's folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the diffusion noise (PBNet: seed + 1)" + d)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's, 20)")
    p.add_argument("--audio-scale", type=float, default=None,
                   help="guidance scale of the audio condition (default: the checkpoint's)")
    p.add_argument("--motion-scale", type=float, default=None,
                   help="guidance scale of pose/blink (default: the checkpoint's)")
    p.add_argument("--resolution", type=int, default=None,
                   help="frame size; must equal the checkpoint's image_size (default: that size)")
    p.add_argument("--fps", type=float, default=25.0, help="frame rate (the models are trained at 25)" + d)
    p.add_argument("--pose", default="pbnet",
                   help="pbnet (sampled from the audio), still (portrait pose, no blinks), or a .npy/.csv file of "
                        "per-frame yaw, pitch, roll, scale, tx, ty, blink left, blink right" + d)
    p.add_argument("--reference-pose", choices=("first", "zero"), default="first",
                   help="first: the portrait has the pose of the track's first frame (subtracted); "
                        "zero: the track already holds deltas relative to the portrait" + d)
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help="refuse longer audio (the whole clip is denoised at once)" + d)
    p.add_argument("--decode-chunk", type=int, default=16, help="frames decoded at once (bounds decoder memory)" + d)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N" + d)
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on a GPU that has it, else fp32" + d)
    p.add_argument("--audio-features", default=None,
                   help="audio features if the checkpoint does not say: logmel or hubert:<model id or dir>")
    p.add_argument("--no-face-crop", action="store_true", help="centre-crop the portrait instead of finding the face")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run `generate` from parsed arguments; prints the output path on stdout."""
    from microscope_pl.inference.generate import generate, log_stderr
    from microscope_pl.inference.inputs import speak
    from microscope_pl.phases import find_checkpoint

    checkpoint = find_checkpoint("diffusion", args.ckpt_path)
    with tempfile.TemporaryDirectory() as tmp:
        audio = args.audio
        if audio is None:  # `make generate` without AUDIO=: say a sentence
            audio = str(speak(DEFAULT_SENTENCE, Path(tmp) / "speech.wav"))
            log_stderr(f"no --audio: speaking {DEFAULT_SENTENCE!r} with espeak-ng")
        path = generate(
            checkpoint, args.image, audio, args.out, pbnet_checkpoint=args.pbnet_ckpt_path, seed=args.seed,
            steps=args.steps, audio_scale=args.audio_scale, motion_scale=args.motion_scale,
            resolution=args.resolution, fps=args.fps, pose=args.pose, reference_pose=args.reference_pose,
            decode_chunk=args.decode_chunk, device=args.device, precision=args.precision,
            progress=not args.no_progress,
            max_seconds=args.max_seconds, audio_features_kind=args.audio_features,
            face_crop=not args.no_face_crop)
    print(path, flush=True)
    return 0
