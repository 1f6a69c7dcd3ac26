"""``microscope data synth`` and ``microscope data prepare``.

``register(subparsers)`` adds a ``data`` command to the main argparse parser;
each leaf sets ``func(args) -> int`` (0 ok, 2 bad input).
"""

from __future__ import annotations

import argparse
import sys

# data.audio's SILENCE_DBFS and LOUDNESS_TARGET_DBFS, written out so `microscope --help` does not import torch.
SILENCE_DBFS, LOUDNESS_TARGET_DBFS = -50.0, -23.0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_synth(args: argparse.Namespace) -> int:
    """Synthesise the embedded data set and print a summary."""
    import json
    import time

    from microscope_pl.data.synth import synthesize

    start = time.perf_counter()
    try:
        out = synthesize(args.out_dir, videos=args.videos, size=args.size, seconds=args.seconds, seed=args.seed,
                         test_fraction=args.test_fraction, speech=args.speech,
                         audio_features=args.audio_features, verbose=not args.quiet)
    except (ValueError, RuntimeError, OSError) as exc:
        return _fail(_first_line(exc))
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"wrote {len(manifest['train'])} train + {len(manifest['test'])} test videos "
          f"({args.size}x{args.size}, {args.seconds:g} s, speech: {manifest['speech']}, "
          f"audio: {manifest['audio_features']} {manifest['audio_dim']}-d) to {out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with 1 <= K <= N (None stays None); ValueError otherwise."""
    if text is None:
        return None
    k, sep, n = text.partition("/")
    if sep and k.strip().isdigit() and n.strip().isdigit() and 1 <= int(k) <= int(n):
        return int(k), int(n)
    raise ValueError(f"--shard must be K/N with 1 <= K <= N, got {text!r}")


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare a folder of real videos and print a summary."""
    import time

    try:
        shard = parse_shard(args.shard)
    except ValueError as exc:
        return _fail(str(exc))
    if args.workers < 1:
        return _fail(f"--workers must be >= 1, got {args.workers}")
    from microscope_pl.data.prepare import prepare

    start = time.perf_counter()
    try:
        report = prepare(args.src, args.out_dir, size=args.size, audio_features=args.audio_features,
                         face_crop=args.face_crop, landmarks=args.landmarks, test_fraction=args.test_fraction,
                         min_seconds=args.min_seconds, crop_scale=args.crop_scale,
                         silence_dbfs=args.silence_dbfs, loudness_target=args.loudness_target,
                         max_seconds=args.max_seconds, workers=args.workers, device=args.device, shard=shard,
                         verbose=not args.quiet)
    except (ValueError, RuntimeError, OSError) as exc:
        return _fail(_first_line(exc))
    counts = (f"prepared {len(report['processed'])} new, kept {len(report['existing'])}, "
              f"skipped {len(report['skipped'])}")
    if shard is not None:
        print(f"shard {shard[0]}/{shard[1]}: {counts} (reasons in {args.out_dir}/report.shard-{shard[0]}-of-"
              f"{shard[1]}.json); no manifest: run once without --shard when every shard is done; "
              f"{time.perf_counter() - start:.1f} s")
        return 0
    print(f"{counts} (reasons in {args.out_dir}/report.json); "
          f"split {report['train']} train / {report['test']} test; pose: {report['pose_source']}, "
          f"blink: {report['blink_source']}; {time.perf_counter() - start:.1f} s")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data {synth,prepare}`` to the main parser's ``subparsers``; returns the ``data`` parser."""
    data = subparsers.add_parser("data", help="build data sets: synthetic or from real videos",
                                 description="Build data sets in the layout of docs/interfaces.md.")
    sub = data.add_subparsers(dest="data_command", metavar="{synth,prepare}")
    sub.required = True

    synth = sub.add_parser("synth", help="synthesise the embedded talking-head data set",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    synth.add_argument("--out-dir", "--out", dest="out_dir", metavar="DIR", default="data/synth", help="output folder")
    synth.add_argument("--videos", type=int, default=8, help="number of videos (>= 2)")
    synth.add_argument("--size", type=int, default=128, help="frame size S (even, >= 32)")
    synth.add_argument("--seconds", type=float, default=4.0, help="length of each video")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    synth.add_argument("--test-fraction", type=float, default=0.1, help="share of identities held out")
    synth.add_argument("--speech", choices=["auto", "espeak", "syllables"], default="auto",
                       help="espeak-ng speech, synthetic syllables, or auto")
    synth.add_argument("--audio-features", default="logmel", help="'logmel' or 'hubert:<model id or dir>'")
    synth.add_argument("--quiet", action="store_true", help="print only the summary")
    synth.set_defaults(func=run_synth)

    prep = sub.add_parser("prepare", help="prepare a folder of real talking-head videos",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          epilog="Cluster: run --shard 1/N ... N/N into one shared --out-dir, then once without "
                                 "--shard over the same --src/--out-dir: it prepares nothing new and writes "
                                 "manifest.json and report.json. Skips are remembered in videos/.skipped/.")
    prep.add_argument("--src", required=True, help="folder of raw videos (searched recursively)")
    prep.add_argument("--out-dir", "--out", dest="out_dir", metavar="DIR", required=True,
                      help="output folder (resumable)")
    prep.add_argument("--size", type=int, default=256, help="output frame size S")
    prep.add_argument("--audio-features", default="logmel", help="'logmel' or 'hubert:<model id or dir>'")
    prep.add_argument("--face-crop", choices=["auto", "detect", "center"], default="auto",
                      help="auto: face crop, else centre crop with a note; detect: skip faceless videos")
    prep.add_argument("--landmarks", choices=["auto", "dlib", "none"], default="auto",
                      help="pose/blink from dlib 68 landmarks when installed (extra 'prepare')")
    prep.add_argument("--test-fraction", type=float, default=0.1, help="share of videos held out")
    prep.add_argument("--min-seconds", type=float, default=1.0, help="skip shorter videos")
    prep.add_argument("--max-seconds", type=float, default=None, help="keep only the first seconds of each video")
    prep.add_argument("--crop-scale", type=float, default=2.2, help="crop side over the detected face box side")
    prep.add_argument("--silence-dbfs", type=float, default=SILENCE_DBFS,
                      help="skip videos whose audio RMS (16 kHz mono) is below this level")
    prep.add_argument("--loudness-target", type=float, default=LOUDNESS_TARGET_DBFS,
                      help="gated speech level (dBFS) every stored track is normalised to")
    prep.add_argument("--workers", type=int, default=1, help="videos prepared at once (a process pool)")
    prep.add_argument("--device", default="cpu", help="HuBERT features' device (cpu, cuda, cuda:1; logmel ignores it)")
    prep.add_argument("--shard", metavar="K/N", default=None,
                      help="prepare only share K of N (crc32 of the name): report.shard-K-of-N.json, no manifest")
    prep.add_argument("--quiet", action="store_true", help="print only the summary")
    prep.set_defaults(func=run_prepare)
    return data


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry for ``python -m microscope_pl.data.cli``."""
    parser = argparse.ArgumentParser(prog="microscope")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
