"""`microscope generate --batch jobs.csv`: many videos from one loaded model.

The CSV has a header with the columns `portrait`, `audio`, `out` and an
optional `seed` (other columns are ignored). Relative portrait and audio
paths are read from the CSV's folder; a relative `out` goes under `--out-dir`
(default: the CSV's folder), an empty one becomes `<portrait>_<audio>.mp4`.
Every row is generated with the same options; a failing row is reported in
one line and the rest go on. Each video is written atomically (VideoWriter).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from microscope_pl.inference.inputs import ASTRONAUT, _one_line

REQUIRED = ("portrait", "audio", "out")
ROW_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)  # a bad row; anything else stops the batch


@dataclass(frozen=True)
class Job:
    """One row: where it is in the CSV (1-based, the header is row 1) and what to make."""

    row: int
    portrait: str
    audio: str
    out: Path
    seed: int | None


@dataclass
class BatchResult:
    """Written videos and failed rows (`row N (...): reason`)."""

    written: list[Path]
    failed: list[str]


def _resolve(value: str, folder: Path) -> str:
    if value == ASTRONAUT or Path(value).is_absolute():
        return value
    return str(folder / value)


def read_jobs(path: str | Path, out_dir: str | Path | None = None) -> tuple[list[Job], list[str]]:
    """Parse the CSV into jobs and per-row problems (a bad seed, duplicate outputs).

    ValueError (the whole batch) for a missing file, no header or a missing column."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"batch file not found: {path}")
    folder = path.parent
    out_root = Path(out_dir) if out_dir is not None else folder
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED if c not in columns]
        if missing:
            raise ValueError(f"batch file {path} needs the columns {', '.join(REQUIRED)} (optional seed); "
                             f"missing {', '.join(missing)}")
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    jobs, problems, seen = [], [], set()
    for number, row in enumerate(rows, start=2):
        label = f"row {number} ({row.get('portrait') or '?'}, {row.get('audio') or '?'})"
        if not row.get("portrait") or not row.get("audio"):
            problems.append(f"{label}: portrait and audio are required")
            continue
        try:
            seed = int(row["seed"]) if row.get("seed") else None
        except ValueError:
            problems.append(f"{label}: seed {row['seed']!r} is not an integer")
            continue
        name = row.get("out") or f"{Path(row['portrait']).stem}_{Path(row['audio']).stem}.mp4"
        out = Path(name) if Path(name).is_absolute() else out_root / name
        if out.resolve() in seen:
            problems.append(f"{label}: output {out} is already written by an earlier row")
            continue
        seen.add(out.resolve())
        jobs.append(Job(number, _resolve(row["portrait"], folder), _resolve(row["audio"], folder), out, seed))
    return jobs, problems


def run_batch(model: Any, jobs: list[Job], options: dict[str, Any], report: Callable[[str], None],
              log: Callable[[str], None] | None = None) -> BatchResult:
    """Generate every job with `model` (a loaded `loading.GenerationModel`) and the shared
    `options` of `run_generation`; `report` gets one line per written video or failed row."""
    from microscope_pl.inference.generate import run_generation

    result = BatchResult([], [])
    for job in jobs:
        label = f"row {job.row} ({job.portrait}, {job.audio})"
        seed = job.seed if job.seed is not None else options.get("seed", 0)
        try:
            job.out.parent.mkdir(parents=True, exist_ok=True)
            done = run_generation(model, job.portrait, job.audio, job.out, **{**options, "seed": seed}, log=log)
        except ROW_ERRORS as err:
            line = f"{label}: {_one_line(str(err) or type(err).__name__)}"
            result.failed.append(line)
            report(f"failed {line}")
            continue
        result.written.append(done.path)
        report(f"ok     row {job.row} -> {done.path} ({done.frames} frames, {done.total_s:.1f} s)")
    return result
