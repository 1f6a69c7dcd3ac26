"""`microscope export`: one generation bundle to hand to someone.

A bundle is a folder:

```
<bundle>/model.safetensors   EMA pipeline (FDE + LMAE codec, image condition, denoiser) + PBNet
                             header metadata: format, the diffusion settings, PBNet's settings,
                             provenance (files, sha256, steps, recorded figures), all JSON
<bundle>/README.md           the model card, written from that metadata
```

Only what sampling needs travels (no optimizer state, no training copy of the
weights). Reading a bundle parses a safetensors header and JSON: nothing is
unpickled, so no code can run. `generate` and the app take the folder or the
`.safetensors` file wherever they take a diffusion checkpoint.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

CARD = "README.md"
PARTS = {"pipeline.codec.fde.": "FDE (codec, phase 1)", "pipeline.codec.lmae.": "LMAE (codec, phase 2)",
         "pipeline.image_cond.": "image condition E(x_src) -> latent", "pipeline.denoiser.": "3D U-Net denoiser (EMA)",
         "pbnet.": "PBNet (pose and blink)"}


# ---------------------------------------------------------------- export


def _monitored(ckpt: dict[str, Any]) -> dict[str, float]:
    """The best monitored score(s) a checkpoint's ModelCheckpoint callbacks recorded."""
    found = {}
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") and state.get("best_model_score") is not None:
            found[f"{state['monitor']} (best)"] = float(state["best_model_score"])
    return found


def _provenance(path: Path, ckpt: dict[str, Any]) -> dict[str, Any]:
    """File, sha256, epoch, step and recorded figures of one checkpoint."""
    from microscope_pl.checkpointing import file_sha256

    return {"file": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size,
            "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"), "figures": _monitored(ckpt)}


def _eval_figures(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """The `metrics` table of a `microscope eval` metrics.json, with the video count."""
    if path is None:
        return None
    file = Path(path)
    try:
        report = json.loads(file.read_text())
        return {"file": str(file), "videos": report.get("videos"),
                "metrics": {k: float(v) for k, v in report["metrics"].items()}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"--metrics {file} is not a readable metrics.json of `microscope eval` ({err})") from None


def _collect(checkpoint: Path, pbnet_checkpoint: str | None, with_pbnet: bool
             ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """Tensors, diffusion settings, PBNet record and provenance of the files being exported."""
    from microscope_pl.inference.loading import find_pbnet, read_with_record
    from microscope_pl.phases import sub_state_dict

    ckpt, record = read_with_record(checkpoint, "diffusion")
    tensors = {f"pipeline.{k}": v for k, v in sub_state_dict(ckpt, "ema").items()}
    provenance = {"diffusion": _provenance(checkpoint, ckpt), "upstream": record.get("upstream")}
    pbnet_record = None
    if with_pbnet:
        path = find_pbnet(checkpoint, pbnet_checkpoint)
        pb_ckpt, pbnet_record = read_with_record(path, "pbnet")
        tensors.update({f"pbnet.{k}": v for k, v in sub_state_dict(pb_ckpt, "net").items()})
        provenance["pbnet"] = _provenance(path, pb_ckpt)
    return tensors, record, pbnet_record, provenance


def export_bundle(checkpoint: str | os.PathLike, out: str | os.PathLike, *, pbnet_checkpoint: str | None = None,
                  with_pbnet: bool = True, metrics: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write the bundle folder `out` from a diffusion checkpoint (+ PBNet); returns `out`.

    Written into a temporary folder beside `out` and renamed when complete, so a
    failure never leaves a half-written bundle. `metrics`: a `microscope eval`
    metrics.json whose figures go into the model card. `force` replaces an existing `out`.
    """
    from safetensors.torch import save_file

    from microscope_pl.inference.loading import BUNDLE_FORMAT, WEIGHTS, is_bundle, read_bundle, resolve_model_path

    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} already exists; pass --force to replace it")
    checkpoint = resolve_model_path(checkpoint)
    if is_bundle(checkpoint):
        raise ValueError(f"{checkpoint} is a bundle already; export takes a diffusion checkpoint")
    tensors, record, pbnet_record, provenance = _collect(checkpoint, pbnet_checkpoint, with_pbnet)
    provenance["eval"] = _eval_figures(metrics)
    provenance["exported"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = {"format": BUNDLE_FORMAT, "settings": json.dumps(record), "provenance": json.dumps(provenance)}
    if pbnet_record is not None:
        meta["pbnet"] = json.dumps(pbnet_record)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # safetensors refuses tensors that share memory: each gets its own contiguous copy.
        save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata=meta)
        os.chmod(tmp / WEIGHTS, 0o644)  # written owner-only; a bundle is meant to be shared
        (tmp / CARD).write_text(model_card(read_bundle(tmp)))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- model card


def _count(tensors: dict[str, Any], prefix: str) -> int:
    return sum(int(v.numel()) for k, v in tensors.items() if k.startswith(prefix))


def _figure_rows(provenance: dict[str, Any]) -> list[str]:
    rows = []
    for part in ("diffusion", "pbnet"):
        for name, value in ((provenance.get(part) or {}).get("figures") or {}).items():
            rows.append(f"| {part} {name} | {value:.4f} | its ModelCheckpoint's record (checkpoint saved at step "
                        f"{provenance[part].get('global_step')}) |")
    ev = provenance.get("eval")
    for name, value in ((ev or {}).get("metrics") or {}).items():
        rows.append(f"| {name} | {value:.4f} | `microscope eval` on {ev.get('videos')} videos ({ev['file']}) |")
    return rows


def model_card(bundle: Any) -> str:
    """The markdown model card of a bundle, from its recorded settings and provenance only."""
    s, p = bundle.settings, bundle.provenance
    data = s.get("data") or {}
    sampling = s.get("sampling") or {}
    lines = ["# microscope-pl generation bundle", "",
             "Audio-driven talking-head generation (MICROSCOPE: two-stage dynamics compression and latent video "
             "diffusion), exported by `microscope export`. Everything `microscope generate` and `microscope app` "
             "need is in `model.safetensors`; its header holds the settings below as JSON.", "",
             "## Use", "", "```bash",
             "microscope generate --checkpoint BUNDLE --image portrait.png --audio speech.wav --out talking.mp4",
             "microscope app --checkpoint BUNDLE", "```", "", "## Contents", "",
             "| part | parameters |", "| --- | --- |"]
    lines += [f"| {name} | {_count(bundle.tensors, prefix):,} |" for prefix, name in PARTS.items()
              if _count(bundle.tensors, prefix)]
    lines += ["", "## Settings", "", "| setting | value |", "| --- | --- |",
              f"| image size | {s.get('image_size')} px |", f"| audio features | {s.get('audio_features')} |",
              f"| latent | {s.get('latent')} ({s.get('latent_source')}) |",
              f"| sampler | {sampling.get('sampler')}, {sampling.get('steps')} steps, audio guidance "
              f"{sampling.get('audio_scale')}, motion guidance {sampling.get('motion_scale')} |",
              f"| training data | {data.get('source', 'synthetic (embedded set)')} |",
              f"| framing | {json.dumps(data.get('framing')) if data.get('framing') else 'synthetic set recipe'} |",
              f"| speech level | {data.get('loudness_dbfs', 'as recorded')} dBFS |", "",
              "## Provenance", "", "| file | sha256 | epoch | step |", "| --- | --- | --- | --- |"]
    for part in ("diffusion", "pbnet"):
        if p.get(part):
            q = p[part]
            lines.append(f"| {part}: `{Path(q['file']).name}` | `{q['sha256']}` | {q.get('epoch')} | "
                         f"{q.get('global_step')} |")
    up = p.get("upstream") or {}
    if up:
        lines.append(f"| upstream {up.get('phase')}: `{up.get('path')}` (recorded in training) | "
                     f"`{up.get('sha256')}` | | |")
    rows = _figure_rows(p)
    lines += ["", "## Recorded figures", ""]
    lines += (["| figure | value | source |", "| --- | --- | --- |"] + rows) if rows else \
        ["No figures were recorded with these checkpoints (pass `--metrics metrics.json` from `microscope eval`)."]
    lines += ["", "## Responsible use", "",
              "This model makes a real person appear to say things they never said. Animate a portrait only with "
              "the consent of the person pictured, disclose that the video is synthetic wherever you share it, and "
              "never use it to impersonate anyone.", "", "## Settings as recorded", "", "```json",
              json.dumps(s, indent=1), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `microscope export`."""
    p = subparsers.add_parser(
        "export", help="diffusion checkpoint (+ PBNet) -> one generation bundle (safetensors + model card)",
        description="Write a generation bundle: the EMA pipeline (codec and denoiser) and PBNet in one "
                    "safetensors file with their settings, plus a markdown model card.")
    p.add_argument("--ckpt-path", "--checkpoint", "--ckpt", dest="ckpt_path", default=None,
                   help="diffusion checkpoint (default: checkpoints/synth/diffusion/best.ckpt, else last.ckpt)")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--pbnet-ckpt-path", "--pbnet-checkpoint", dest="pbnet_ckpt_path", default=None,
                   help="PBNet checkpoint (default: pbnet/{best,last}.ckpt beside the diffusion checkpoint's folder)")
    p.add_argument("--no-pbnet", action="store_true", help="export without PBNet (pose still, file or video only)")
    p.add_argument("--metrics", default=None, help="a `microscope eval` metrics.json to put in the model card")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from microscope_pl.inference.loading import WEIGHTS

    out = export_bundle(args.ckpt_path, args.out, pbnet_checkpoint=args.pbnet_ckpt_path,
                        with_pbnet=not args.no_pbnet, metrics=args.metrics, force=args.force)
    size = (out / WEIGHTS).stat().st_size
    print(f"bundle {out}: {WEIGHTS} {size / 1e6:.1f} MB, model card {out / CARD}", flush=True)
    return 0
