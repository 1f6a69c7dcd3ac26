"""Bad samples: skipped, replaced, counted and reported instead of crashing a run.

``SkipBadSamples`` wraps a data set of the prepared layout. An item that fails
to load (a corrupt video, per-frame arrays of the wrong length, any exception)
or holds a non-finite float is replaced by the same draw (same sample slot) from
the next clip that loads, so batch shapes stay fixed. Every item carries
``bad_samples``: a string of ``split<TAB>clip<TAB>reason`` lines, one per clip it
had to skip ("" for a clean item). Strings survive DataLoader worker processes
and the default collate, so the counts reach the main process, where
``BadSampleLog`` (kept by the data module, which pops the key before the batch
reaches a model) tallies them by clip and writes the end-of-run report.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch
from torch.utils.data import Dataset

KEY = "bad_samples"
SHOWN = 20  # clips listed in the printed report (the JSON has all)


def nonfinite_keys(item: dict[str, Any]) -> list[str]:
    """Keys of ``item`` whose float tensors hold NaN or inf."""
    return [k for k, v in item.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def describe(exc: BaseException, folder: str = "") -> str:
    """One short line for ``exc``, without the clip's folder the message may start with."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if folder and text.startswith(folder):
        text = text[len(folder):].lstrip("/: ")
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text)  # decord's "[time] source.cc:line: "
    return f"{type(exc).__name__}: {text[:160]}"


class SkipBadSamples(Dataset):
    """``dataset`` (a ``_VideoDataset``: ``names``, ``samples_per_video``, ``split``) with bad items replaced.

    Item ``i`` of clip ``c`` (slot ``s``) falls back to slot ``s`` of clips ``c+1, c+2, ...``
    (wrapping), so val/test items stay a fixed function of the index. When no clip
    loads, ValueError.
    """

    def __init__(self, dataset: Dataset, split: str | None = None) -> None:
        self.dataset = dataset
        self.split = split or getattr(dataset, "split", "train")
        self.names: list[str] = list(getattr(dataset, "names", None) or range(len(dataset)))  # type: ignore[arg-type]
        self.per_clip = int(getattr(dataset, "samples_per_video", 1)) if hasattr(dataset, "names") else 1
        root = getattr(dataset, "root", None)
        self.videos = str(Path(root) / "videos") if root is not None else ""

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        clip, slot = divmod(index, self.per_clip)
        records = []
        for step in range(len(self.names)):
            candidate = ((clip + step) % len(self.names)) * self.per_clip + slot
            name = str(self.names[candidate // self.per_clip])
            try:
                item = self.dataset[candidate]
            except Exception as exc:  # noqa: BLE001 - decoders, numpy and our own checks raise many types
                reason = describe(exc, f"{self.videos}/{name}" if self.videos else "")
            else:
                bad = nonfinite_keys(item)
                if not bad:
                    item[KEY] = "\n".join(records)
                    return item
                reason = f"non-finite values in {', '.join(bad)}"
            records.append(f"{self.split}\t{name}\t{reason}")
        first = records[0].split("\t", 2)
        raise ValueError(f"every {self.split} clip failed to load (e.g. {first[1]}: {first[2]})")


class BadSampleLog:
    """Tally of skipped items by split and clip: how often, and why."""

    def __init__(self) -> None:
        self.splits: dict[str, dict[str, Counter]] = {}  # split -> clip -> Counter(reason): failed loads
        self.items: Counter = Counter()  # split -> items that came from another clip

    def add(self, records: Iterable[str]) -> list[tuple[str, str, str]]:
        """Count a batch's ``bad_samples`` strings; returns the (split, clip, reason) seen for the first time."""
        new = []
        for text in records:
            if text:
                self.items[str(text).split("\t", 1)[0]] += 1
            for line in str(text).splitlines():
                split, name, reason = (line.split("\t", 2) + ["", ""])[:3]
                clips = self.splits.setdefault(split, {})
                if name not in clips:
                    new.append((split, name, reason))
                clips.setdefault(name, Counter())[reason] += 1
        return new

    def failed(self, split: str) -> int:
        """Failed loads of ``split`` clips so far (an item may skip several clips)."""
        return sum(sum(c.values()) for c in self.splits.get(split, {}).values())

    def worst(self, split: str) -> list[tuple[str, int, str]]:
        """(clip, times skipped, commonest reason) of ``split``, most often skipped first."""
        rows = [(name, sum(c.values()), c.most_common(1)[0][0]) for name, c in self.splits.get(split, {}).items()]
        return sorted(rows, key=lambda r: (-r[1], r[0]))

    def too_many(self, split: str, clips: int, max_fraction: float) -> bool:
        return clips > 0 and len(self.splits.get(split, {})) > max_fraction * clips

    def too_many_message(self, split: str, clips: int, max_fraction: float, root: str) -> str:
        """One line: how many clips are bad and which are the worst."""
        rows = self.worst(split)
        if not rows:
            return (f"another rank found more than max_bad_fraction={max_fraction:g} of the {clips} {split} "
                    f"clips of {root} bad; see its log")
        named = ", ".join(f"{n} ({k}x, {r})" for n, k, r in rows[:3]) + (" ..." if len(rows) > 3 else "")
        return (f"{len(rows)} of {clips} {split} clips of {root} are bad ({len(rows) / clips:.0%} > "
                f"max_bad_fraction={max_fraction:g}); worst: {named}; repair or remove them (microscope data "
                "prepare) or raise data.max_bad_fraction")

    def merge(self, other: dict[str, Any]) -> None:
        """Add another log's ``counts()`` (another rank's)."""
        for split, clips in other["clips"].items():
            for name, reasons in clips.items():
                self.splits.setdefault(split, {}).setdefault(name, Counter()).update(reasons)
        self.items.update(other["items"])

    def counts(self) -> dict[str, Any]:
        """Plain picklable tallies, for ``merge``."""
        return {"clips": {s: {n: dict(c) for n, c in clips.items()} for s, clips in self.splits.items()},
                "items": dict(self.items)}

    def to_json(self, totals: dict[str, int], root: str, max_fraction: float) -> dict[str, Any]:
        return {"data_root": root, "max_bad_fraction": max_fraction, "splits": {
            split: {"clips": totals.get(split), "bad_clips": len(clips), "replaced_items": self.items[split],
                    "failed_loads": self.failed(split),
                    "bad": [{"name": n, "count": k, "reasons": dict(clips[n])} for n, k, _ in self.worst(split)]}
            for split, clips in self.splits.items()}}

    def report(self, totals: dict[str, int], path: Path | None = None) -> str:
        """The end-of-run report: one line per split and per clip (at most SHOWN clips)."""
        lines = []
        for split in self.splits:
            rows = self.worst(split)
            total = totals.get(split)
            lines.append(f"bad samples: {len(rows)} of {total if total is not None else '?'} {split} clips skipped "
                         f"({self.items[split]} items taken from other clips, {self.failed(split)} failed loads)")
            width = max(len(n) for n, _, _ in rows)
            lines += [f"  {n:<{width}}  {k:>5}x  {r}" for n, k, r in rows[:SHOWN]]
            if len(rows) > SHOWN:
                lines.append(f"  ... and {len(rows) - SHOWN} more")
        if path is not None:
            lines.append(f"bad samples: full list in {path}")
        return "\n".join(lines)

    def write(self, path: Path, totals: dict[str, int], root: str, max_fraction: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(totals, root, max_fraction), indent=2) + "\n")
