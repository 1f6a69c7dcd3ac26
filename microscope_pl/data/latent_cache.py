"""``microscope latents cache``: encode every clip frame through the frozen MDCF once.

Diffusion training otherwise runs FDE's motion network and the LMAE encoder
on every clip of every step. The latent of a frame depends on its reference
frame, so the cache keeps, per video, the latents of all frames against a
few reference frames (``references``, evenly spaced, frame 0 always among
them). Training from the cache draws the reference from those frames: the
"first" curriculum stage starts each clip at a cached reference, the
"random" stage pairs any clip with any cached reference.

File layout (one ``torch.save`` dict, loadable with ``weights_only=True``)::

    {"format": 1, "latent": "mdcf" | "fde", "image_size": int,
     "upstream": {"phase": str, "path": str, "sha256": str},
     "videos": {name: {"frames": int, "ref_indices": long [R],
                       "ref_frames": uint8 [R, 3, S, S] (S = image_size),
                       "mean": half [R, T, c, h, w],
                       "logvar": half [R, T, c, h, w] (MDCF only)}}}

The reference frames ride along so that training from the cache never
decodes video: decoding whole videos for one frame each was what bounded
the training steps on a GPU (``ref_frames`` is optional: older caches
decode the reference instead).

``mean``/``logvar`` are the raw LMAE statistics (before the diffusion
module's latent scale), so ``latent_source: sample`` still samples eq. 4.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = 1


def reference_indices(frames: int, references: int) -> list[int]:
    """``references`` evenly spaced frame indices of a ``frames``-long video, 0 first."""
    count = max(1, min(references, frames))
    return sorted({int(round(x)) for x in np.linspace(0, frames - 1, count)})


@torch.no_grad()
def build_cache(ckpt_path: str | None, data_root: str | Path, out: str | Path, latent: str = "mdcf",
                references: int = 8, splits: tuple[str, ...] = ("train",), chunk: int = 32,
                device: str = "cpu", verbose: bool = True) -> dict[str, Any]:
    """Encode the ``splits`` of ``data_root`` and write the cache to ``out`` atomically."""
    from microscope_pl.checkpointing import save_atomic
    from microscope_pl.data.datasets import VideoStore, frames_to_tensor, load_manifest, split_videos
    from microscope_pl.models.mdcf import DynamicsCodec
    from microscope_pl.phases import freeze_upstream

    if latent not in ("mdcf", "fde"):
        raise ValueError(f"latent must be 'mdcf' or 'fde', got {latent!r}")
    if references < 1 or chunk < 1:
        raise ValueError(f"references and chunk must be >= 1, got {references} and {chunk}")
    phase = "phase2" if latent == "mdcf" else "phase1"
    upstream = freeze_upstream(phase, ckpt_path)
    codec = DynamicsCodec(upstream.networks["fde"], upstream.networks.get("lmae")).to(device).eval()
    size = int(upstream.record["image_size"])
    manifest = load_manifest(data_root)
    names = [n for split in splits for n in split_videos(manifest, split)]
    if not names:
        raise ValueError(f"{data_root}: no videos in splits {list(splits)}")
    store = VideoStore(data_root, cache_mb=64.0, default_size=int(manifest["size"]))
    videos: dict[str, dict[str, torch.Tensor | int]] = {}
    start = time.perf_counter()
    for i, name in enumerate(names):
        count = int(json.loads((Path(data_root) / "videos" / name / "meta.json").read_text())["frames"])
        refs = reference_indices(count, references)
        ref_images = frames_to_tensor(store.frames(name, refs), size).to(device)
        means, logvars = [], []  # per chunk of frames: R k c h w
        for first in range(0, count, chunk):  # decoded a chunk at a time: long videos fit in memory
            frames = frames_to_tensor(store.frames(name, list(range(first, min(first + chunk, count)))), size).to(device)
            mu, logvar = codec.encode_stats(ref_images, frames[None].expand(len(refs), -1, -1, -1, -1), chunk)
            means.append(mu.transpose(1, 2).half().cpu())
            if logvar is not None:
                logvars.append(logvar.transpose(1, 2).half().cpu())
        entry: dict[str, torch.Tensor | int] = {
            "frames": count, "ref_indices": torch.tensor(refs), "mean": torch.cat(means, dim=1),
            "ref_frames": ref_images.mul(255).round().to(torch.uint8).cpu()}
        if logvars:
            entry["logvar"] = torch.cat(logvars, dim=1)
        videos[name] = entry
        if verbose:
            print(f"[{i + 1}/{len(names)}] {name}: {count} frames x {len(refs)} references "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    cache = {"format": FORMAT, "latent": latent, "image_size": size,
             "upstream": {k: upstream.record[k] for k in ("phase", "path", "sha256")}, "videos": videos}
    save_atomic(cache, out)
    return cache


def load_cache(path: str | Path) -> dict[str, Any]:
    """Read a cache written by ``build_cache``; a clear error for anything else."""
    from microscope_pl.checkpointing import CheckpointError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latent cache {path} not found; run `microscope latents cache --out {path}`")
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise CheckpointError(f"{path} is not a readable latent cache ({type(exc).__name__}); rebuild it") from exc
    if not isinstance(cache, dict) or cache.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a latent cache of format {FORMAT}; rebuild it")
    return cache


def check_cache(cache: dict[str, Any], latent: str, image_size: int, upstream_sha256: str | None,
                path: str | Path) -> None:
    """Refuse a cache made for another latent, image size or upstream checkpoint."""
    if cache["latent"] != latent:
        raise ValueError(f"latent cache {path} holds {cache['latent']!r} latents but model.latent is {latent!r}")
    if cache["image_size"] != image_size:
        raise ValueError(f"latent cache {path} is at {cache['image_size']} px but model.image_size is {image_size}")
    if upstream_sha256 is not None and cache["upstream"]["sha256"] != upstream_sha256:
        raise ValueError(f"latent cache {path} was made from {cache['upstream']['path']} "
                         f"(sha256 {cache['upstream']['sha256'][:12]}) but the model's upstream checkpoint "
                         f"has sha256 {upstream_sha256[:12]}; rebuild the cache")


# ---------------------------------------------------------------- command line


def run_cache(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cache = build_cache(args.ckpt_path, args.data, args.out, latent=args.latent, references=args.references,
                        splits=tuple(args.splits), chunk=args.chunk, device=args.device, verbose=not args.quiet)
    frames = sum(int(v["frames"]) for v in cache["videos"].values())
    size_mb = Path(args.out).stat().st_size / 2**20
    print(f"cached {cache['latent']} latents of {len(cache['videos'])} videos ({frames} frames, "
          f"{args.references} references each) to {args.out} ({size_mb:.1f} MiB) "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stdout)
    return 0


def register(sub: Any) -> None:
    """Add ``latents cache`` to the main parser."""
    latents = sub.add_parser("latents", help="cache diffusion latents (MDCF or FDE) of a data set")
    leaves = latents.add_subparsers(dest="latents_command", metavar="ACTION", required=True)
    cache = leaves.add_parser("cache", help="encode every frame through the frozen upstream once")
    cache.add_argument("--data", default="data/synth", help="data set folder (with manifest.json)")
    cache.add_argument("--out", required=True, help="cache file to write (e.g. data/synth/latents_mdcf.pt)")
    cache.add_argument("--ckpt-path", "--ckpt_path", "--ckpt", "--checkpoint", dest="ckpt_path", default=None,
                       help="upstream checkpoint (default: checkpoints/synth/phase2 "
                       "best, then last; phase1 with --latent fde)")
    cache.add_argument("--latent", default="mdcf", choices=("mdcf", "fde"))
    cache.add_argument("--references", type=int, default=8, help="reference frames per video (default %(default)s)")
    cache.add_argument("--splits", nargs="+", default=["train"], choices=("train", "test"))
    cache.add_argument("--chunk", type=int, default=32, help="frames decoded and encoded at once (default %(default)s)")
    cache.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cache.add_argument("--quiet", action="store_true")
    cache.set_defaults(func=run_cache)
