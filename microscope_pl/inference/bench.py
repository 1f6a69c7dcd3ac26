"""`microscope bench generate`: memory and time of generation, MDCF vs the DAWN-style latent.

The claim under test (paper section 3.2): diffusing the 4 x H/32 MDCF latent
instead of FDE's 3 x H/4 dynamics makes non-autoregressive generation of long
clips affordable. Cost does not depend on the weights, so networks are built
with random weights at the widths of configs/{diffusion,phase1_fde,phase2_lmae}.yaml
(what we train) and run exactly as `generate` runs them:

- denoising: the full clip through `--steps` steps of the configured sampler
  and guidance (`--guidance off`: one forward per step); full-guidance and
  reuse steps are timed apart and projected to the configured sampling steps
  (configs/diffusion.yaml: 12), and the report says so;
- decoding: the first `--decode-sample-chunks` chunks of `decode_chunk` frames
  (LMAE + FDE decode and uint8 conversion, no H.264 encoding), extrapolated
  to the clip length, also said in the report; the real-time factor is the
  projected generation time over the clip's length at 25 fps;
- training: forward + backward + Adam step of the denoiser on a 20-frame clip
  at batch 1 (clip encoded online by the frozen codec, as in training).

Each case runs in its own process, forked from a server that imported torch
once, under a memory cap (RLIMIT_AS on the CPU plus an RSS watchdog that kills
the case): a case over the cap is reported as "over N GB" and never takes the
machine down. Peaks are per phase (VmHWM reset between phases), and include the
Python + torch runtime, reported separately.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shlex
import time
from pathlib import Path
from typing import Any

GB = 1024**3
LATENTS = ("mdcf", "fde")
TRAIN_FRAMES = 20
WORKER_MODULES = ["torch", "microscope_pl.diffusion.pipeline", "microscope_pl.models.fde", "microscope_pl.models.lmae"]
# --smoke: a few seconds of work per case, same code path. Keys as in the configs' init_args.
SMOKE_WIDTHS: dict[str, dict[str, Any]] = {
    "denoiser": {"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_levels": [1], "num_heads": 2,
                 "cond_mode": "cross_attn", "cond_dim": 16, "image_cond_channels": 8, "audio_dim": 80},
    "fde": {"downsample": 4, "block_expansion": 8, "max_features": 16, "num_regions": 2, "motion_block_expansion": 8,
            "motion_max_features": 16, "motion_num_blocks": 2, "num_res_blocks": 1, "norm": "group"},
    "lmae": {"latent_channels": 4, "num_down": 3, "base_channels": 8, "channel_mult": [1, 1, 1, 1],
             "num_res_blocks": 1, "norm_groups": 4, "mid_attention": False},
    "schedule": {"num_train_steps": 1000, "schedule": "cosine", "prediction": "eps"},
    "sampling": {"sampler": "dpm", "steps": 12, "audio_scale": 4.0, "guidance_every": 4, "decode_chunk": 16},
}
CLIP_FPS = 25  # the real-time factor is generation seconds over the clip's seconds at the trained frame rate


# ================================================================ CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench generate` (its `func(args) -> int` runs the benchmark)."""
    bench = subparsers.add_parser("bench", help="benchmarks (bench generate: memory/time, MDCF vs DAWN-style latent)")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    p = sub.add_parser("generate", help="peak memory and time of generation and of a training step, per case",
                       description="\n\n".join(__doc__.split("\n\n")[1:4]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d = " (default: %(default)s)"
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="frame sizes" + d)
    p.add_argument("--frames", type=int, nargs="+", default=[200, 400, 800, 1600], help="clip lengths" + d)
    p.add_argument("--latents", nargs="+", choices=LATENTS, default=list(LATENTS),
                   help="mdcf: 4 x H/32 (paper); fde: 3 x H/4 dynamics (DAWN-style baseline)" + d)
    p.add_argument("--mem-cap-gb", type=float, default=20.0, help="memory cap per case (process RSS)" + d)
    p.add_argument("--steps", type=int, default=2,
                   help="denoising steps actually run (projected to the sampling steps; 2 times a full-guidance "
                        "and a reuse step)" + d)
    p.add_argument("--guidance", choices=("config", "off"), default="config",
                   help="config: the sampling section's guidance scales and reuse, as `generate` runs them; "
                        "off: one forward per step" + d)
    p.add_argument("--decode-sample-chunks", type=int, default=4,
                   help="decoder chunks timed, then extrapolated" + d)
    p.add_argument("--train-steps", type=int, default=2, help="training steps timed (the last one is reported)" + d)
    p.add_argument("--timeout-s", type=float, default=1800.0, help="wall-time limit per case" + d)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto" + d)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="autocast of generation and of the training step (bf16 = Lightning's bf16-mixed); "
                        "auto as in `generate` (on a CPU: bf16 decoding where it is native)" + d)
    p.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    p.add_argument("--config-dir", default=None, help="where diffusion.yaml etc. live (default: the repo's configs/)")
    p.add_argument("--overlays", nargs="+", default=[],
                   help="configs applied over the base ones, matched by name (e.g. configs/hdtf/*.yaml: paper widths)")
    p.add_argument("--out-dir", "--out", dest="out", default="reports/bench",
                   help="folder for report.md, report.json, report.png" + d)
    p.add_argument("--smoke", action="store_true", help="tiny widths, 64x64, frames 8 and 16, 1 step (seconds)")
    p.set_defaults(func=run_bench)
    bench.set_defaults(func=lambda args: _usage(bench))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def command_line(args: argparse.Namespace) -> str:
    """The canonical command reproducing this run (written into the report)."""
    parts = ["microscope", "bench", "generate"]
    if args.smoke:
        parts.append("--smoke")
    else:
        parts += ["--sizes", *map(str, args.sizes), "--frames", *map(str, args.frames), "--steps", str(args.steps)]
    if args.guidance != "config":
        parts += ["--guidance", args.guidance]
    parts += ["--latents", *args.latents, "--mem-cap-gb", f"{args.mem_cap_gb:g}",
              "--decode-sample-chunks", str(args.decode_sample_chunks), "--train-steps", str(args.train_steps),
              "--timeout-s", f"{args.timeout_s:g}", "--device", args.device]
    if args.precision != "auto":
        parts += ["--precision", args.precision]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.config_dir:
        parts += ["--config-dir", args.config_dir]
    if args.overlays:
        parts += ["--overlays", *args.overlays]
    return shlex.join(parts + ["--out-dir", str(args.out)])


# ================================================================ widths from the configs


def _init_args(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path} (pass --config-dir)")
    return dict((yaml.safe_load(path.read_text()) or {}).get("model", {}).get("init_args", {}) or {})


OVERLAY_PREFIXES = {"diffusion": "diffusion.yaml", "phase1_fde": "phase1_fde.yaml", "phase2_lmae": "phase2_lmae.yaml"}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on `base`, nested mappings merged key by key (as a second `--config` does)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def config_widths(config_dir: str | None, overlays: list[str] = ()) -> tuple[dict[str, dict[str, Any]], str]:
    """Network settings of the trained configs -> ({"fde", "lmae", "denoiser", "schedule", "sampling"}, folder).

    Each overlay (e.g. configs/hdtf/phase1_fde_512.yaml) updates the base config
    its file name starts with, as a second `--config` would in `microscope fit`.
    """
    folder = Path(config_dir) if config_dir else Path(__file__).resolve().parents[2] / "configs"
    if not config_dir and not folder.is_dir():
        folder = Path("configs")
    args = {name: _init_args(folder / name) for name in OVERLAY_PREFIXES.values()}
    for overlay in overlays:
        base = next((b for prefix, b in OVERLAY_PREFIXES.items() if Path(overlay).name.startswith(prefix)), None)
        if base is None:
            raise ValueError(f"overlay {overlay}: its name must start with one of {', '.join(OVERLAY_PREFIXES)}")
        args[base] = _merge(args[base], _init_args(Path(overlay)))
    diffusion = args["diffusion.yaml"]
    widths = {"fde": args["phase1_fde.yaml"].get("network") or {}, "lmae": args["phase2_lmae.yaml"].get("network") or {},
              **{key: diffusion.get(key) or {} for key in ("denoiser", "schedule", "sampling")}}
    return widths, str(folder)


# ================================================================ worker (one process per case)


def _status_kb(field: str, pid: int | str = "self") -> int:
    """A `VmXXX:` value of /proc/<pid>/status in kB (0 when unreadable)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+)", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


class PeakMemory:
    """Peak process RSS (and CUDA allocations) per phase.

    Linux resets the VmHWM high-water mark when "5" is written to
    /proc/self/clear_refs, so each phase gets its own exact peak; elsewhere the
    peak is ru_maxrss since the process started (`exact` False).
    """

    def __init__(self, device: "torch.device") -> None:  # noqa: F821
        self.device = device
        self.exact = True

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.exact = False

    def read(self) -> dict[str, float | None]:
        import torch

        hwm = _status_kb("VmHWM") * 1024
        if not hwm or not self.exact:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        gpu = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            gpu = torch.cuda.max_memory_allocated(self.device) / GB
        return {"peak_rss_gb": hwm / GB, "peak_gpu_gb": gpu}


def _build(case: dict[str, Any], device: "torch.device") -> Any:  # noqa: F821
    """The untrained generation pipeline at the case's settings (random weights: cost does not depend on them)."""
    from microscope_pl.diffusion.pipeline import TalkingHeadPipeline
    from microscope_pl.models.config import (DenoiserConfig, FDEConfig, LMAEConfig, SamplingConfig,
                                             ScheduleConfig, from_dict)
    from microscope_pl.models.mdcf import DynamicsCodec

    w = case["widths"]
    lmae = from_dict(LMAEConfig, w["lmae"]).build() if case["latent"] == "mdcf" else None
    codec = DynamicsCodec(from_dict(FDEConfig, w["fde"]).build(), lmae).eval()
    pipeline = TalkingHeadPipeline.build(codec, from_dict(DenoiserConfig, w["denoiser"]),
                                         from_dict(ScheduleConfig, w["schedule"]),
                                         from_dict(SamplingConfig, w["sampling"]), case["size"])
    return pipeline.to(device)


def _sync(device: "torch.device") -> None:  # noqa: F821
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guidance_projection(sampling: dict[str, Any], step_s: list[float], guidance: str) -> dict[str, Any]:
    """Measured step times -> the configured number of steps, with the sampler's guidance plan:
    full steps (every branch) and reuse steps (one forward + the kept correction) are timed
    apart and projected by how many of each the configured steps make."""
    from microscope_pl.diffusion.samplers import full_guidance_steps, guidance_plan
    from microscope_pl.models.config import SamplingConfig, from_dict

    cfg = from_dict(SamplingConfig, sampling)
    plan = guidance_plan(1.0, 1.0) if guidance == "off" else guidance_plan(cfg.audio_scale, cfg.motion_scale)
    every = 1 if guidance == "off" else cfg.guidance_every
    measured = full_guidance_steps(plan, len(step_s), every)
    full = [s for s, f in zip(step_s, measured) if f]
    reuse = [s for s, f in zip(step_s, measured) if not f]
    projected = full_guidance_steps(plan, cfg.steps, every)
    full_s = sum(full) / len(full)
    reuse_s = sum(reuse) / len(reuse) if reuse else full_s  # a run too short to reach a reuse step
    n_full = sum(projected)
    return {"branches": len(plan), "guidance_every": every, "projected_steps": cfg.steps,
            "forwards_per_step": (n_full * len(plan) + cfg.steps - n_full) / cfg.steps,
            "full_step_s": full_s, "reuse_step_s": reuse_s if reuse else None,
            "projected_s": n_full * full_s + (cfg.steps - n_full) * reuse_s}


def _generate_case(case: dict[str, Any], pipeline: Any, device: Any, mem: PeakMemory) -> dict[str, Any]:
    """Denoise the whole clip for `steps` steps, then decode a sample of chunks, as `generate` does."""
    import torch

    from microscope_pl.inference.generate import _to_uint8, decode_precision, precision_autocast

    n, size = case["frames"], case["size"]
    gen = torch.Generator().manual_seed(0)
    batch = {"reference": torch.rand(1, 3, size, size, generator=gen).to(device),
             "audio": torch.randn(1, n, pipeline.denoiser.audio_dim, generator=gen).to(device),
             "pose": torch.zeros(1, n, 6, device=device), "blink": torch.zeros(1, n, 2, device=device)}
    pipeline.eval()
    scales = {"audio_scale": 1.0, "motion_scale": 1.0} if case["guidance"] == "off" else {}
    ends: list[float] = []

    def stamp(i: int, total: int) -> None:
        _sync(device)
        ends.append(time.perf_counter())

    def denoise(steps: int) -> "torch.Tensor":
        with precision_autocast(case["precision"], device, stage="denoise"):
            return pipeline.sample_latents(batch, generator=gen, steps=steps, progress=stamp, **scales)

    def decode(z: "torch.Tensor", chunks: int) -> int:
        decoded = 0
        context, dtype = decode_precision(case["precision"], device)
        with torch.no_grad(), context:
            for i, frames in enumerate(pipeline.decode_chunks(batch["reference"], z, case["decode_chunk"], dtype)):
                _to_uint8(frames)  # as generate hands frames to the video writer
                decoded += frames.shape[0]
                if i + 1 >= chunks:
                    break
        return decoded

    if device.type == "cuda":  # the first call pays CUDA/cuDNN start-up and kernel selection: not timed
        denoise(1)
        decode(torch.zeros(pipeline.latent_shape(1, min(n, case["decode_chunk"])), device=device), 1)
    mem.reset()
    ends.clear()
    start = time.perf_counter()
    z = denoise(case["steps"])
    _sync(device)
    denoise_s = time.perf_counter() - start
    step_s = [b - a for a, b in zip([start, *ends[:-1]], ends)]  # the first also pays E(x_src)
    denoise = {"steps": case["steps"], "seconds": denoise_s, "step_s": step_s, "per_step_s": denoise_s / case["steps"],
               **guidance_projection(case["widths"]["sampling"], step_s, case["guidance"]), **mem.read()}
    denoise["per_frame_s"] = denoise["projected_s"] / n

    mem.reset()
    start = time.perf_counter()
    decoded = decode(z, case["decode_sample_chunks"])
    _sync(device)
    decode_s = time.perf_counter() - start
    decode_row = {"sample_frames": decoded, "chunk": case["decode_chunk"], "seconds": decode_s,
                  "per_frame_s": decode_s / decoded, "projected_s": decode_s / decoded * n, **mem.read()}
    return {"denoise": denoise, "decode": decode_row}


def _train_case(case: dict[str, Any], pipeline: Any, device: Any, mem: PeakMemory) -> dict[str, Any]:
    """Forward + backward + optimiser step of the denoiser on one clip, as LatentDiffusionModule trains it."""
    import torch

    from microscope_pl.inference.generate import precision_autocast
    from microscope_pl.modules.settings import OptimizerConfig

    n, size = case["frames"], case["size"]
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(1, n, 3, size, size, generator=gen).to(device)
    batch = {"reference": frames[:, 0], "frames": frames,
             "audio": torch.randn(1, n, pipeline.denoiser.audio_dim, generator=gen).to(device),
             "pose": torch.zeros(1, n, 6, device=device), "blink": torch.zeros(1, n, 2, device=device)}
    pipeline.denoiser.train()
    pipeline.image_cond.train()
    params = [p for m in (pipeline.denoiser, pipeline.image_cond) for p in m.parameters()]
    opt = OptimizerConfig(lr=1e-4).build(params)
    mem.reset()
    times = []
    for _ in range(case["train_steps"]):
        start = time.perf_counter()
        with precision_autocast(case["precision"], device):  # what Lightning's *-mixed precision does
            z0 = pipeline.codec.encode(batch["reference"], frames)  # frozen codec, no_grad inside
            loss = pipeline.denoising_error(z0, batch, drop_prob=0.0).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    step_s = times[-1]  # the first step also pays allocator and kernel warm-up
    return {"train": {"frames": n, "steps": len(times), "step_s": step_s, "frames_per_s": n / step_s,
                      "first_step_s": times[0], **mem.read()}}


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or "out of memory" in text or "can't allocate memory" in text \
        or "defaultcpuallocator" in text


def _worker(case: dict[str, Any], conn: Any, cap_bytes: int) -> None:
    """Run one case; send {"event": "built", ...} then the result through `conn`."""
    import torch

    try:
        device = torch.device(case["device"] if case["device"] != "auto"
                              else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cpu":  # hard backstop beside the parent's RSS watchdog
            limit = _status_kb("VmSize") * 1024 + cap_bytes
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        if case.get("threads"):
            torch.set_num_threads(case["threads"])
        torch.manual_seed(0)
        runtime = _status_kb("VmRSS") * 1024 / GB
        pipeline = _build(case, device)
        codec = pipeline.codec
        side = case["size"] // codec.latent_down
        from microscope_pl.inference.generate import resolve_precision

        conn.send({"event": "built", "torch": torch.__version__, "device": str(device),
                   "precisions": {stage: resolve_precision(case["precision"], device, stage)
                                  for stage in ("denoise", "decode")},
                   "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                   "threads": torch.get_num_threads(), "runtime_rss_gb": runtime,
                   "model_rss_gb": _status_kb("VmRSS") * 1024 / GB,
                   "latent_shape": [codec.latent_channels, case["frames"], side, side],
                   "compression": 3 * case["size"] ** 2 / (codec.latent_channels * side * side),
                   "denoiser_params": sum(p.numel() for p in pipeline.denoiser.parameters()),
                   "codec_params": sum(p.numel() for p in codec.parameters())})
        mem = PeakMemory(device)
        run = _train_case if case["kind"] == "train" else _generate_case
        conn.send({"event": "done", "status": "ok", "exact_peaks": mem.exact, **run(case, pipeline, device, mem)})
    except BaseException as err:  # noqa: BLE001 - report every failure as a row, never crash the parent
        status = "over" if _is_oom(err) else "error"
        conn.send({"event": "done", "status": status, "error": f"{type(err).__name__}: {str(err).strip()[:300]}"})
    finally:
        conn.close()


# ================================================================ parent: isolation and the cap


def run_isolated(ctx: Any, case: dict[str, Any], cap_bytes: int, timeout_s: float) -> dict[str, Any]:
    """Run `case` in a fresh process; kill it when its RSS passes `cap_bytes` or time runs out."""
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(case, send, cap_bytes), daemon=True)
    start = time.perf_counter()
    proc.start()
    send.close()
    result: dict[str, Any] = {}
    watched = 0
    while True:
        while recv.poll(0.02):
            try:
                message = recv.recv()
            except EOFError:
                break
            result.update({k: v for k, v in message.items() if k != "event"})
            if message.get("event") == "done":
                break
        if result.get("status") or not proc.is_alive():
            break
        rss = _status_kb("VmRSS", proc.pid) * 1024
        watched = max(watched, rss)
        if rss > cap_bytes:
            proc.kill()
            result.update(status="over", error=f"RSS {rss / GB:.1f} GB passed the cap: killed by the watchdog")
        elif time.perf_counter() - start > timeout_s:
            proc.kill()
            result.update(status="timeout", error=f"still running after {timeout_s:g} s: killed")
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if not result.get("status"):  # died without a word: the kernel's OOM killer, most likely
        killed = proc.exitcode is not None and proc.exitcode < 0
        result.update(status="over" if killed else "error",
                      error=f"process ended with {'signal ' + str(-proc.exitcode) if killed else proc.exitcode}")
    result["watchdog_peak_rss_gb"] = watched / GB
    result["wall_s"] = time.perf_counter() - start
    return result


def run_bench(args: argparse.Namespace) -> int:
    """`bench generate`: every case in its own process, then report.md/json/png."""
    if args.smoke:
        args.sizes, args.frames, args.steps = [64], [8, 16], 2
        args.decode_sample_chunks, args.train_steps = 1, 1
    for name in ("steps", "decode_sample_chunks", "train_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.sizes) < 32 or min(args.frames) < 1 or args.mem_cap_gb <= 0:
        raise ValueError(f"need sizes >= 32, frames >= 1 and a positive cap; got sizes {args.sizes}, "
                         f"frames {args.frames}, cap {args.mem_cap_gb}")
    widths, config_dir = config_widths(args.config_dir, args.overlays)
    if args.overlays:
        config_dir += " + " + " + ".join(args.overlays)
    if args.smoke:
        widths = {k: dict(v) for k, v in SMOKE_WIDTHS.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cap = int(args.mem_cap_gb * GB)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_MODULES)  # import torch once; each case is a fresh fork of that
    base = {"device": args.device, "precision": args.precision, "threads": args.threads, "widths": widths,
            "steps": args.steps, "guidance": args.guidance,
            "decode_chunk": int(widths["sampling"].get("decode_chunk", 16)),
            "decode_sample_chunks": args.decode_sample_chunks, "train_steps": args.train_steps}
    rows: list[dict[str, Any]] = []
    for latent in args.latents:
        for size in args.sizes:
            stopped: str | None = None
            for frames in sorted(args.frames):
                case = {**base, "kind": "generate", "latent": latent, "size": size, "frames": frames}
                if stopped:  # longer clips only cost more: do not grind through them
                    rows.append({**_key(case), "status": stopped, "skipped": True,
                                 "error": "skipped: a shorter clip already failed"})
                    continue
                rows.append({**_key(case), **run_isolated(ctx, case, cap, args.timeout_s)})
                _print_row(rows[-1], args.mem_cap_gb)
                if rows[-1]["status"] in ("over", "timeout"):
                    stopped = rows[-1]["status"]
            case = {**base, "kind": "train", "latent": latent, "size": size, "frames": TRAIN_FRAMES}
            rows.append({**_key(case), **run_isolated(ctx, case, cap, args.timeout_s)})
            _print_row(rows[-1], args.mem_cap_gb)
    report = {"command": command_line(args), "config_dir": config_dir, "widths": widths,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "settings": {"mem_cap_gb": args.mem_cap_gb, "steps_run": args.steps,
                           "steps_projected": int(widths["sampling"].get("steps", 12)),
                           "decode_chunk": base["decode_chunk"], "decode_sample_chunks": args.decode_sample_chunks,
                           "train_frames": TRAIN_FRAMES, "guidance": args.guidance, "device": args.device, "precision": args.precision,
                           "timeout_s": args.timeout_s},
              "cases": rows}
    write_report(out, report)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}", flush=True)
    return 0


def _key(case: dict[str, Any]) -> dict[str, Any]:
    return {"kind": case["kind"], "latent": case["latent"], "size": case["size"], "frames": case["frames"]}


def _print_row(row: dict[str, Any], cap_gb: float) -> None:
    what = f"{row['kind']:8s} {row['latent']:4s} {row['size']}px {row['frames']:5d} frames"
    if row["status"] != "ok":
        detail = f"over {cap_gb:g} GB" if row["status"] == "over" else row["status"]
        print(f"{what}: {detail} ({row.get('error', '')})", flush=True)
    elif row["kind"] == "train":
        t = row["train"]
        print(f"{what}: {t['step_s']:.2f} s/step, peak {t['peak_rss_gb']:.2f} GB", flush=True)
    else:
        d, c = row["denoise"], row["decode"]
        total = d["projected_s"] + c["projected_s"]
        print(f"{what}: denoise {d['per_frame_s'] * 1e3:.1f} ms/frame ({d['forwards_per_step']:g} forwards/step) "
              f"peak {d['peak_rss_gb']:.2f} GB, decode {c['per_frame_s'] * 1e3:.1f} ms/frame "
              f"peak {c['peak_rss_gb']:.2f} GB, real-time factor {total / (row['frames'] / CLIP_FPS):.2f}",
              flush=True)


# ================================================================ report


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def _failed(row: dict[str, Any], cap_gb: float) -> str:
    if row["status"] == "over":
        return f"over {cap_gb:g} GB"
    return "timeout" if row["status"] == "timeout" else "error"


def generation_totals(row: dict[str, Any]) -> dict[str, float]:
    """Projected generation seconds, per frame, real-time factor and peak GB of an ok generate row."""
    d, c = row["denoise"], row["decode"]
    total = d["projected_s"] + c["projected_s"]
    return {"projected_s": total, "per_frame_s": total / row["frames"],
            "real_time_factor": total / (row["frames"] / CLIP_FPS), "peak_rss_gb": max(d["peak_rss_gb"], c["peak_rss_gb"])}


def write_report(out: Path, report: dict[str, Any]) -> None:
    """report.json (everything), report.md (tables + method), report.png (memory and time vs frames)."""
    settings, cap = report["settings"], report["settings"]["mem_cap_gb"]
    steps = settings["steps_projected"]
    for row in report["cases"]:
        if row["kind"] == "generate" and row["status"] == "ok":
            row["generation"] = {**generation_totals(row),
                                 "peak_gpu_gb": max(filter(None, [row["denoise"]["peak_gpu_gb"],
                                                                  row["decode"]["peak_gpu_gb"]]), default=None)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    built = next((r for r in report["cases"] if "torch" in r), {})
    gpu = any(r.get("device", "").startswith("cuda") for r in report["cases"])
    lines = [
        "# Generation benchmark: MDCF latent (4 x H/32) vs DAWN-style FDE latent (3 x H/4)", "",
        f"Reproduce: `{report['command']}`", "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, Python "
        f"{report['machine']['python']}, torch {built.get('torch', '?')}, device {built.get('device', '?')} "
        f"({built.get('device_name', '')}, precision {settings.get('precision', 'fp32')}: "
        + ", ".join(f"{k} {v}" for k, v in built.get("precisions", {}).items()) + "), "
        f"{built.get('threads', '?')} torch threads. Widths: {report['config_dir']} "
        "(denoiser from diffusion.yaml, FDE from phase1_fde.yaml, LMAE from phase2_lmae.yaml; random weights).", "",
        "Method: every case runs in its own process under a memory cap of "
        f"{cap:g} GB (RLIMIT_AS on the CPU and an RSS watchdog); a case that passes it is reported as "
        f"\"over {cap:g} GB\" and longer clips of that setting are skipped. "
        f"**Denoising** runs the whole clip through {settings['steps_run']} step(s) of the configured sampler "
        + ("with one denoiser forward per step (guidance off)" if settings.get("guidance") == "off" else
           "with the configured guidance (all branches on every `guidance_every`-th step, one forward plus the "
           "kept correction between)")
        + f"; full and reuse steps are timed apart and **projected to {steps} steps** (\"fwd/step\": denoiser "
        f"forwards per step on average). **Decoding** times the first {settings['decode_sample_chunks']} chunk(s) of "
        f"{settings['decode_chunk']} frames (LMAE + FDE decode and uint8 conversion, no H.264 encoding) and "
        "**extrapolates** to the clip length. Generation = both; the **real-time factor** is generation seconds "
        f"over the clip's seconds at {CLIP_FPS} fps (below 1: faster than real time). Peaks are the process RSS high-water mark "
        "per phase (VmHWM reset between phases), so they include the Python + torch runtime "
        f"(~{_gb(built.get('runtime_rss_gb'))} GB) and the weights (one denoiser copy; a checkpoint adds its EMA "
        "twin, 4 bytes per denoiser parameter)."
        + (" On CUDA one untimed denoising step and decoder chunk run first (start-up and kernel selection), "
           "and \"peak GPU\" is torch's peak allocation." if gpu else ""), "",
        "| latent | size | frames | latent c x n x h x w | ratio | fwd/step | denoise x"
        f"{steps} s | denoise s/frame | decode s/frame | generation s | real-time factor | peak denoise GB | "
        "peak decode GB | peak generation GB |" + (" peak GPU GB |" if gpu else ""),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for row in (r for r in report["cases"] if r["kind"] == "generate"):
        shape = " x ".join(map(str, row["latent_shape"])) if "latent_shape" in row else "-"
        ratio = f"{row['compression']:.0f}x" if "compression" in row else "-"
        head = f"| {row['latent']} | {row['size']} | {row['frames']} | {shape} | {ratio} |"
        if row["status"] != "ok":
            lines.append(head + f" {_failed(row, cap)} |" + " - |" * (9 + gpu))
            continue
        d, c, g = row["denoise"], row["decode"], row["generation"]
        lines.append(head + f" {d['forwards_per_step']:.3g} | {_secs(d['projected_s'])} | {_secs(d['per_frame_s'])} | "
                     f"{_secs(c['per_frame_s'])} | {_secs(g['projected_s'])} | {g['real_time_factor']:.3g} | "
                     f"{_gb(d['peak_rss_gb'])} | "
                     f"{_gb(c['peak_rss_gb'])} | {_gb(g['peak_rss_gb'])} |"
                     + (f" {_gb(g['peak_gpu_gb'])} |" if gpu else ""))
    lines += ["", f"## Training step (batch 1, {settings['train_frames']}-frame clip: frozen codec encodes it, "
              "denoiser forward + backward + AdamW step; time of the last step)", "",
              "| latent | size | denoiser params | peak GB | s/step | frames/s |" + (" peak GPU GB |" if gpu else ""),
              "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for row in (r for r in report["cases"] if r["kind"] == "train"):
        params = f"{row['denoiser_params'] / 1e6:.1f} M" if "denoiser_params" in row else "-"
        head = f"| {row['latent']} | {row['size']} | {params} |"
        if row["status"] != "ok":
            lines.append(head + f" {_failed(row, cap)} | - | - |" + (" - |" if gpu else ""))
            continue
        t = row["train"]
        lines.append(head + f" {_gb(t['peak_rss_gb'])} | {_secs(t['step_s'])} | {t['frames_per_s']:.3g} |"
                     + (f" {_gb(t['peak_gpu_gb'])} |" if gpu else ""))
    errors = [r for r in report["cases"] if r["status"] == "error"]
    if errors:
        lines += ["", "Errors:", *[f"- {r['kind']} {r['latent']} {r['size']}px {r['frames']}: {r.get('error')}"
                                   for r in errors]]
    lines += ["", "![memory and time against frames](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out / "report.png", report)


def plot(path: Path, report: dict[str, Any]) -> None:
    """Peak memory and projected generation time against frames, one line per (latent, size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    cap = report["settings"]["mem_cap_gb"]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = [r for r in report["cases"] if r["kind"] == "generate"]
    sizes = sorted({r["size"] for r in rows})
    for latent, size in sorted({(r["latent"], r["size"]) for r in rows}, key=lambda k: (k[0] != "mdcf", k[1])):
        group = sorted((r for r in rows if r["latent"] == latent and r["size"] == size), key=lambda r: r["frames"])
        ok = [r for r in group if r["status"] == "ok"]
        # colour = latent, line style = size: the two latents stay easy to tell apart
        style = {"marker": "o", "color": "tab:blue" if latent == "mdcf" else "tab:red",
                 "linestyle": ["-", "--", ":", "-."][sizes.index(size) % 4], "label": f"{latent} {size}px"}
        ax_mem.plot([r["frames"] for r in ok], [r["generation"]["peak_rss_gb"] for r in ok], **style)
        ax_time.plot([r["frames"] for r in ok], [r["generation"]["projected_s"] for r in ok], **style)
        over = [r["frames"] for r in group if r["status"] == "over"]
        if over:
            ax_mem.scatter(over, [cap] * len(over), marker="x", s=60, color=style["color"])
    ax_mem.axhline(cap, color="grey", linewidth=0.8, linestyle=":", label=f"cap {cap:g} GB (x: over)")
    steps = report["settings"]["steps_projected"]
    ax_mem.set(xlabel="frames", ylabel="peak process memory (GB)", title="memory of generation", ylim=(0, None))
    ax_time.set(xlabel="frames", ylabel=f"seconds ({steps} steps projected, decode extrapolated)",
                title="time of generation", yscale="log")
    ax_time.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    for ax in (ax_mem, ax_time):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
