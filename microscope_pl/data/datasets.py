"""Datasets over the prepared layout (docs/interfaces.md): frame pairs and aligned clips.

Videos are opened lazily in each worker process (decord handles must not be
shared across fork); small videos are decoded once and kept in a per-worker
LRU cache, larger ones are read frame-selectively. Training items are random
(torch's global RNG, which DataLoader seeds per worker); ``val``/``test``
items are a fixed function of the index.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from microscope_pl.data.audio import loudness_envelope, read_wav
from microscope_pl.data.video_io import read_video

SPLITS = ("train", "val", "test", "tail")


def load_manifest(root: str | Path) -> dict:
    """Read ``ROOT/manifest.json``; ValueError when it is missing or of another format."""
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: synthesize (microscope data synth) or prepare a data set there")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != "microscope-pl/1":
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected 'microscope-pl/1'")
    return manifest


def data_record(manifest: dict) -> dict:
    """What a checkpoint keeps of its training data (record "data"): generation frames a
    portrait with ``framing`` and brings speech to ``loudness_dbfs`` as the data were."""
    from microscope_pl.data.framing import SYNTH_FRAMING

    synthetic = manifest.get("source") == "synthetic"
    return {"source": manifest.get("source"), "size": manifest.get("size"),
            "audio_features": manifest.get("audio_features"), "audio_dim": manifest.get("audio_dim"),
            "framing": manifest.get("framing") or (dict(SYNTH_FRAMING) if synthetic else None),
            "loudness_dbfs": (manifest.get("loudness") or {}).get("target_dbfs")}


def split_videos(manifest: dict, split: str) -> list[str]:
    """Video names of ``split``: "train" and "tail" (the held-out last seconds of the
    training videos) -> manifest train; "val" and "test" -> manifest test."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(manifest["train"] if split in ("train", "tail") else manifest["test"])


class VideoStore:
    """Per-process access to one data set's videos and per-frame arrays.

    ``cache_mb`` bounds the decoded frames kept in memory; a video larger than
    a quarter of it is never cached whole and is read with decord seeks.
    """

    def __init__(self, root: str | Path, cache_mb: float = 256.0, max_readers: int = 8,
                 default_size: int = 256) -> None:
        self.root = Path(root)
        self.default_size = default_size
        self.cache_bytes = int(cache_mb * 2**20)
        self.max_readers = max_readers
        self._frames: OrderedDict[str, np.ndarray] = OrderedDict()
        self._readers: OrderedDict[str, Any] = OrderedDict()
        self._arrays: dict[str, dict[str, np.ndarray]] = {}
        self._sizes: dict[str, int] = {}

    def _reader(self, name: str) -> Any:
        import decord

        if name in self._readers:
            self._readers.move_to_end(name)
            return self._readers[name]
        path = self.root / "videos" / name / "video.mp4"
        try:
            reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        except Exception as exc:  # noqa: BLE001 - decord error types vary
            raise ValueError(f"{path}: cannot read video ({str(exc).strip()[:200]})") from exc
        self._readers[name] = reader
        while len(self._readers) > self.max_readers:
            self._readers.popitem(last=False)
        return reader

    def frames(self, name: str, indices: list[int]) -> np.ndarray:
        """uint8 frames ``[len(indices), H, W, 3]`` of video ``name``."""
        if name in self._frames:
            self._frames.move_to_end(name)
            return self._frames[name][indices]
        reader = self._reader(name)
        if name not in self._sizes:
            meta = json.loads((self.root / "videos" / name / "meta.json").read_text())
            self._sizes[name] = int(meta.get("size", self.default_size))
        side = self._sizes[name]
        if len(reader) * side * side * 3 * 4 <= self.cache_bytes:  # small: decode all once, index from memory
            whole = read_video(self.root / "videos" / name / "video.mp4")
            self._frames[name] = whole
            self._readers.pop(name, None)
            while sum(v.nbytes for v in self._frames.values()) > self.cache_bytes and len(self._frames) > 1:
                self._frames.popitem(last=False)
            return whole[indices]
        try:
            return reader.get_batch(list(indices)).asnumpy()
        except Exception as exc:  # noqa: BLE001 - decord errors vary
            raise ValueError(f"{self.root / 'videos' / name}: cannot decode frames {list(indices)[:4]}...: "
                             f"{str(exc).strip()[:200]}") from exc

    def arrays(self, name: str, frames: int) -> dict[str, np.ndarray]:
        """Per-frame arrays of ``name``: audio_feats [T, D], pose [T, 6], blink [T, 2], loudness [T]."""
        if name not in self._arrays:
            folder = self.root / "videos" / name
            wave, _ = read_wav(folder / "audio.wav")
            self._arrays[name] = {
                "audio": np.load(folder / "audio_feats.npy").astype(np.float32),
                "pose": np.load(folder / "pose.npy").astype(np.float32),
                "blink": np.load(folder / "blink.npy").astype(np.float32),
                "loudness": loudness_envelope(wave, frames),
            }
        return self._arrays[name]


def frames_to_tensor(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 ``[k, H, W, 3]`` -> float32 ``[k, 3, size, size]`` in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1]).clamp_(0.0, 1.0)
    return x.contiguous()


class _VideoDataset(Dataset):
    """Shared index, lazy per-process store and image conversion.

    ``tail_frames`` > 0 holds the last frames of every training video out of
    training: split "train" draws from the frames before them, split "tail"
    only from them (lip sync on seen identities, unseen moments).
    """

    def __init__(self, root: str | Path, split: str, image_size: int | None, samples_per_video: int,
                 min_frames: int = 1, cache_mb: float = 256.0, tail_frames: int = 0) -> None:
        self.root = Path(root)
        self.split = split
        self.manifest = load_manifest(root)
        names = split_videos(self.manifest, split)
        if not names:
            raise ValueError(f"{self.root}: split {split!r} has no videos")
        if samples_per_video < 1:
            raise ValueError(f"samples_per_video must be >= 1, got {samples_per_video}")
        metas = {n: json.loads((self.root / "videos" / n / "meta.json").read_text()) for n in names}
        self.frame_counts = {n: int(meta["frames"]) for n, meta in metas.items()}
        if tail_frames < 0 or (split == "tail" and tail_frames == 0):
            raise ValueError(f"split 'tail' needs tail_frames > 0 (data.holdout_seconds), got {tail_frames}")
        # [lo, hi) of the frames each item may use
        self.spans = {n: ((0, max(0, c - tail_frames)) if split == "train" else
                          (max(0, c - tail_frames), c) if split == "tail" else (0, c))
                      for n, c in self.frame_counts.items()}
        # Clip mouth boxes in stored pixels (synthetic, or prepared with landmarks), for the lip-sync proxy.
        self.mouth_boxes = {n: (meta.get("mouth_box"), int(meta.get("size", self.manifest["size"])))
                            for n, meta in metas.items()}
        self.names = [n for n in names if self.spans[n][1] - self.spans[n][0] >= max(1, min_frames)]
        if not self.names:
            longest = max(hi - lo for lo, hi in self.spans.values())
            raise ValueError(f"num_frames={min_frames} exceeds every {split} video of {self.root} "
                             f"(longest has {longest} usable frames)")
        self.stored_size = int(self.manifest["size"])
        self.image_size = self.stored_size if image_size is None else int(image_size)
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.samples_per_video = samples_per_video
        self.deterministic = split != "train"
        self.cache_mb = cache_mb
        self._store: VideoStore | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.names) * self.samples_per_video

    @property
    def store(self) -> VideoStore:
        """The calling process's store (rebuilt after fork so no decord handle is shared)."""
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = VideoStore(self.root, self.cache_mb, default_size=self.stored_size), os.getpid()
        return self._store

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"], state["_pid"] = None, -1  # spawn-based workers get a fresh store too
        return state

    def _generator(self, index: int) -> torch.Generator | None:
        """None (global RNG) for train; a generator seeded by the index for val/test."""
        if not self.deterministic:
            return None
        return torch.Generator().manual_seed(1_000_003 * index + 12_345)

    @staticmethod
    def _randint(high: int, generator: torch.Generator | None) -> int:
        return int(torch.randint(high, (1,), generator=generator).item())

    def _images(self, frames: np.ndarray) -> torch.Tensor:
        return frames_to_tensor(frames, self.image_size)

    def _mouth_box(self, name: str) -> torch.Tensor:
        """``4`` (x0, y0, x1, y1) in model pixels, or -1s when the data set has none."""
        box, size = self.mouth_boxes[name]
        if box is None:
            return torch.full((4,), -1.0)
        return torch.tensor(box, dtype=torch.float32) * (self.image_size / size)


def augment_pair(images: torch.Tensor, generator: torch.Generator | None = None,
                 strength: float = 0.1) -> tuple[torch.Tensor, bool]:
    """Same random horizontal flip and colour jitter for every image of ``[k, 3, h, w]``;
    returns the images and whether they were flipped."""
    rand = torch.rand(4, generator=generator)
    flipped = bool(rand[0] < 0.5)
    if flipped:
        images = images.flip(-1)
    brightness, contrast, saturation = (1.0 + strength * (2 * rand[1:] - 1)).tolist()
    images = images * brightness
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * contrast + mean
    gray = (0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3])
    images = gray + (images - gray) * saturation
    return images.clamp(0.0, 1.0), flipped


class FramePairDataset(_VideoDataset):
    """Two frames of one video: ``{"source": 3 h w, "driving": 3 h w, "name": str, "mouth_box": 4}``,
    frames in [0, 1], the box in model pixels (-1s when the data set has none).

    ``augment`` applies one flip + colour jitter to both frames (train only).
    """

    def __init__(self, root: str | Path, split: str, image_size: int | None = None, augment: bool = False,
                 samples_per_video: int = 50, cache_mb: float = 256.0, tail_frames: int = 0) -> None:
        super().__init__(root, split, image_size, samples_per_video, min_frames=1, cache_mb=cache_mb,
                         tail_frames=tail_frames)
        self.augment = augment

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        name = self.names[index // self.samples_per_video]
        lo, hi = self.spans[name]
        count = hi - lo
        gen = self._generator(index)
        i = self._randint(count, gen)
        j = (i + 1 + self._randint(count - 1, gen)) % count if count > 1 else i  # j != i when possible
        i, j = lo + i, lo + j
        images = self._images(self.store.frames(name, [i, j]))
        box = self._mouth_box(name)
        if self.augment:
            images, flipped = augment_pair(images, gen)
            if flipped and bool((box >= 0).all()):  # the box follows the flip
                box = torch.stack([self.image_size - box[2], box[1], self.image_size - box[0], box[3]])
        return {"source": images[0], "driving": images[1], "name": name, "mouth_box": box}


class ClipDataset(_VideoDataset):
    """``num_frames`` consecutive frames with aligned conditions.

    Returns ``{"frames": n 3 h w, "reference": 3 h w, "audio": n d, "pose": n 6,
    "blink": n 2, "loudness": n, "ref_index": int, "start": int, "name": str,
    "mouth_box": 4}`` (the box is -1s when the data set has none).
    ``ref_index`` and ``start`` are frame indices in the video; pose and blink
    are deltas from the reference frame's values. ``reference="first"`` uses the
    clip's first frame, ``"random"`` any frame of the video.

    With ``latents`` (the "videos" of a ``latent_cache`` file) the clip's frames
    are not decoded: items carry ``latent_mean`` (and ``latent_logvar``) ``n c h w``
    instead of ``frames``, and the reference is one of the cached reference
    frames ("first": the clip starts at it; "random": any clip, any of them).
    """

    def __init__(self, root: str | Path, split: str, num_frames: int = 20, reference: str = "first",
                 image_size: int | None = None, samples_per_video: int = 10, cache_mb: float = 256.0,
                 latents: dict[str, dict[str, Any]] | None = None, tail_frames: int = 0) -> None:
        if reference not in ("first", "random"):
            raise ValueError(f"reference must be 'first' or 'random', got {reference!r}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        super().__init__(root, split, image_size, samples_per_video, min_frames=num_frames, cache_mb=cache_mb,
                         tail_frames=tail_frames)
        self.num_frames = num_frames
        self.reference = reference
        self.audio_dim = int(self.manifest["audio_dim"])
        self.latents = latents
        if latents is not None:
            missing = [n for n in self.names if n not in latents]
            if missing:
                raise ValueError(f"the latent cache lacks {len(missing)} {split} videos of {self.root} "
                                 f"(e.g. {missing[0]}); rebuild it for this data set")
            stale = [n for n in self.names if int(latents[n]["frames"]) != self.frame_counts[n]]
            if stale:
                raise ValueError(f"the latent cache has another frame count for {stale[0]}; rebuild it")

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        name = self.names[index // self.samples_per_video]
        count, n = self.frame_counts[name], self.num_frames
        lo, hi = self.spans[name]
        gen = self._generator(index)
        if self.latents is not None:  # the clip as cached latents: no video decoding, or the reference only
            start, ref, clip = self._cached_clip(name, gen)
            cached = clip.pop("reference", None)
            images = cached[None] if cached is not None else self._images(self.store.frames(name, [ref]))
        else:
            start = lo + self._randint(hi - lo - n + 1, gen)
            ref = start if self.reference == "first" else lo + self._randint(hi - lo, gen)
            images = self._images(self.store.frames(name, list(range(start, start + n)) + [ref]))
            clip = {"frames": images[:n]}
        arrays = self.store.arrays(name, count)
        span = slice(start, start + n)
        if arrays["audio"].shape[0] != count or arrays["pose"].shape[0] != count:
            raise ValueError(f"{self.root / 'videos' / name}: per-frame arrays have "
                             f"{arrays['audio'].shape[0]}/{arrays['pose'].shape[0]} rows but the video {count} frames")
        return {
            **clip,
            "reference": images[-1],
            "audio": torch.from_numpy(arrays["audio"][span].copy()),
            "pose": torch.from_numpy(arrays["pose"][span] - arrays["pose"][ref]),
            "blink": torch.from_numpy(arrays["blink"][span] - arrays["blink"][ref]),
            "loudness": torch.from_numpy(arrays["loudness"][span].copy()),
            "ref_index": ref,
            "start": start,
            "name": name,
            "mouth_box": self._mouth_box(name),
        }

    def _cached_clip(self, name: str, gen: torch.Generator | None) -> tuple[int, int, dict[str, torch.Tensor]]:
        """(start, reference index, cached latent statistics ``n c h w``) of one clip."""
        entry, n = self.latents[name], self.num_frames
        lo, hi = self.spans[name]
        refs = entry["ref_indices"].tolist()
        if self.reference == "first":  # frame 0 is always cached, so one fits
            choices = [i for i, r in enumerate(refs) if lo <= r <= hi - n]
            slot = choices[self._randint(len(choices), gen)]
            start = refs[slot]
        else:
            inside = [i for i, r in enumerate(refs) if lo <= r < hi] or list(range(len(refs)))
            slot, start = inside[self._randint(len(inside), gen)], lo + self._randint(hi - lo - n + 1, gen)
        out = {"latent_mean": entry["mean"][slot, start:start + n].float()}
        refs_rgb = entry.get("ref_frames")
        if refs_rgb is not None and refs_rgb.shape[-1] == self.image_size:
            out["reference"] = refs_rgb[slot].float().div(255.0)
        if "logvar" in entry:
            out["latent_logvar"] = entry["logvar"][slot, start:start + n].float()
        return start, refs[slot], out
