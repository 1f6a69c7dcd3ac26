"""Pose `1 n 6` and blink `1 n 2` conditions for generation, from the source the user picks.

Pose: PBNet (sampled from the audio), still (the portrait's pose), a reference
video (driving.py) or a `.npy`/`.csv` track. Blinks: the pose source's own
(`auto`), none, PBNet's, or a reference video's. Every track reaches the
denoiser as deltas from the portrait; `pose_scale` multiplies the pose deltas
(0 holds the head at the portrait's pose, 1 keeps the source, 2 doubles it).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from microscope_pl.inference.inputs import _one_line

POSE_SOURCES = ("pbnet", "still", "video")  # or a track file
BLINK_SOURCES = ("auto", "none", "pbnet", "video")
REFERENCE_POSES = ("first", "zero")
MOTION_SUFFIXES = (".npy", ".csv")

LogFn = Callable[[str], None]


def check_motion_options(pose: str, blink: str, pose_scale: float, pose_video: str | None,
                         blink_video: str | None, reference_pose: str = "first") -> None:
    """Cheap checks of the motion options, before anything is loaded (one-line ValueError)."""
    if reference_pose not in REFERENCE_POSES:
        raise ValueError(f"--reference-pose must be one of {', '.join(REFERENCE_POSES)}, got {reference_pose!r}")
    if pose not in POSE_SOURCES and Path(pose).suffix.lower() not in MOTION_SUFFIXES:
        raise ValueError(f"--pose must be pbnet, still, video or a .npy/.csv file, got {pose!r}")
    if blink not in BLINK_SOURCES:
        raise ValueError(f"--blink must be one of {', '.join(BLINK_SOURCES)}, got {blink!r}")
    if not (isinstance(pose_scale, (int, float)) and math.isfinite(pose_scale) and pose_scale >= 0):
        raise ValueError(f"--pose-scale must be a finite number >= 0, got {pose_scale!r}")
    if pose == "video" and not pose_video:
        raise ValueError("--pose video needs --pose-video REF.mp4")
    if pose_video and pose != "video":
        raise ValueError(f"--pose-video is given but --pose is {pose!r}; leave --pose out or pass --pose video")
    if blink == "video" and not (blink_video or pose_video):
        raise ValueError("--blink video needs --blink-video REF.mp4 (or --pose-video)")
    if blink_video and blink not in ("video", "auto"):
        raise ValueError(f"--blink-video is given but --blink is {blink!r}")


def resolve_pose(pose: str | None, pose_video: str | None) -> str:
    """The pose source: as given, else "video" when a pose video is named, else "pbnet"."""
    if pose is None:
        return "video" if pose_video else "pbnet"
    return str(pose)


def resolve_blink(blink: str, pose: str, blink_video: str | None) -> str:
    """`auto` -> the pose source's blinks: "pose-video" (the pose video's, none when it has no
    landmarks), "file", "pbnet", "none" for still; "video" when a blink video is named."""
    if blink != "auto":
        return blink
    if blink_video:
        return "video"
    return {"pbnet": "pbnet", "still": "none", "video": "pose-video"}.get(pose, "file")


def load_motion_file(path: str | Path, num_frames: int) -> np.ndarray:
    """Per-frame pose (6) + blink (2) values from `.npy` `[T, 8]` or a `.csv`
    with 8 columns (an optional header row) -> float32 `[num_frames, 8]`.

    Longer tracks are cut to the clip; shorter ones are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pose file not found: {path}")
    try:
        if path.suffix.lower() == ".npy":
            track = np.load(path, allow_pickle=False)
        else:
            try:
                track = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
            except ValueError:  # a header row
                track = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64, skiprows=1)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read pose file {path} ({_one_line(str(err))})") from err
    track = np.asarray(track, dtype=np.float32)
    if track.ndim != 2 or track.shape[1] != 8:
        raise ValueError(f"pose file {path} must hold [frames, 8] values (yaw, pitch, roll, scale, tx, ty, "
                         f"blink left, blink right), got shape {list(track.shape)}")
    if not np.isfinite(track).all():
        raise ValueError(f"pose file {path} contains NaN or infinite values")
    if track.shape[0] < num_frames:
        raise ValueError(f"pose file {path} has {track.shape[0]} frames, the audio needs {num_frames}")
    return track[:num_frames]


class MotionSources:
    """Computes each source at most once: PBNet is sampled once (pose and blink of one
    sample, as it was trained), a video tracked once when it drives pose and blinks."""

    def __init__(self, audio: torch.Tensor, audio_dim: int, pbnet: Callable[[], tuple[Any, str]],
                 generator: torch.Generator, fps: float, framing: dict[str, Any] | None, log: LogFn) -> None:
        self.audio, self.audio_dim, self.n = audio, audio_dim, audio.shape[1]
        self._pbnet, self.generator, self.fps, self.framing, self.log = pbnet, generator, fps, framing, log
        self._cache: dict[Any, Any] = {}

    def pbnet(self) -> tuple[torch.Tensor, str]:
        """PBNet's motion `1 n 8` (deltas from its first frame) and where PBNet came from."""
        if "pbnet" not in self._cache:
            net, where = self._pbnet()
            if int(net.audio_dim) != self.audio_dim:
                raise ValueError(f"PBNet {where} takes audio_dim {net.audio_dim}, "
                                 f"the diffusion checkpoint audio_dim {self.audio_dim}")
            # PBNet is small: sample it on the CPU so a seed gives the same motion on any device.
            with torch.no_grad():
                motion = net.sample(self.audio.float(), generator=self.generator).float()
            self.log(f"pose and blink: sampled by PBNet from {where}")
            self._cache["pbnet"] = (motion, where)
        return self._cache["pbnet"]

    def file(self, path: str, reference_pose: str) -> torch.Tensor:
        """The track file's motion `1 n 8`, relative to its first row for "first", read once."""
        if "file" not in self._cache:
            track = torch.from_numpy(load_motion_file(path, self.n))[None]
            self._cache["file"] = track - track[:, :1] if reference_pose == "first" else track
        return self._cache["file"]

    def video(self, path: str, role: str, need_blink: bool) -> Any:
        """driving.VideoMotion of `path` (relative to its first frame), tracked once."""
        from microscope_pl.inference.driving import video_motion

        key = ("video", str(path))
        if key not in self._cache or (need_blink and self._cache[key].blink is None):
            found = video_motion(path, self.n, self.fps, self.framing, role=role, need_blink=need_blink)
            self.log(found.note)
            self._cache[key] = found
        return self._cache[key]


def _pose_track(src: MotionSources, pose: str, reference_pose: str, pose_video: str | None
                ) -> tuple[torch.Tensor, str]:
    """Pose deltas `1 n 6` and a description of their source."""
    n = src.n
    if pose == "still":
        return torch.zeros(1, n, 6), "still"
    if pose == "pbnet":
        motion, where = src.pbnet()
        return motion[..., :6].contiguous(), f"pbnet ({where})"
    if pose == "video":
        found = src.video(str(pose_video), "pose", need_blink=False)
        return torch.from_numpy(found.pose)[None], f"video ({pose_video})"
    return src.file(pose, reference_pose)[..., :6].contiguous(), f"file ({pose})"


def _blink_track(src: MotionSources, blink: str, reference_pose: str, video: str | None, pose_file: str
                 ) -> tuple[torch.Tensor, str]:
    """Blink deltas `1 n 2` and a description of their source."""
    n = src.n
    if blink == "none":
        return torch.zeros(1, n, 2), "no blinks"
    if blink == "pbnet":
        motion, where = src.pbnet()
        return motion[..., 6:].contiguous(), f"PBNet blinks ({where})"
    if blink in ("video", "pose-video"):
        found = src.video(str(video), "blink", need_blink=blink == "video")
        if found.blink is None:
            return torch.zeros(1, n, 2), f"no blinks (no landmarks in {video})"
        return torch.from_numpy(found.blink)[None], f"blinks of {video}"
    return src.file(pose_file, reference_pose)[..., 6:].contiguous(), "blinks of the pose file"


def motion_conditions(pose: str, reference_pose: str, audio: torch.Tensor, audio_dim: int,
                      checkpoint: Any, pbnet_checkpoint: str | None, generator: torch.Generator,
                      log: LogFn, *, blink: str = "auto", pose_scale: float = 1.0, pose_video: str | None = None,
                      blink_video: str | None = None, fps: float = 25.0, framing: dict[str, Any] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Pose `1 n 6` and blink `1 n 2` for the denoiser, as deltas from the portrait, and a description.

    `pose`: "pbnet" samples them from `audio` (`1 n d`, CPU) with the PBNet of the
    `checkpoint` (a bundle's own, else `pbnet_checkpoint`, else the one beside a
    diffusion checkpoint; `checkpoint` may be a loaded `loading.GenerationModel`),
    "still" keeps the portrait's pose, "video" tracks `pose_video`, a path reads
    a track file. `reference_pose` (track files only): "first" subtracts the first
    row (the portrait shows the track's first pose), "zero" uses the values as
    deltas already. `blink`: "auto" (the pose source's: PBNet's, the file's, the
    video's, none for still), "none", "pbnet", "video" (`blink_video`, else
    `pose_video`). `pose_scale` multiplies the pose deltas; blinks are kept.
    `framing`: how the checkpoint's data was cropped (reference videos are framed alike).
    """
    from microscope_pl.inference.loading import pbnet_of

    check_motion_options(pose, blink, pose_scale, pose_video, blink_video, reference_pose)
    blink = resolve_blink(blink, pose, blink_video)
    src = MotionSources(audio, audio_dim, lambda: pbnet_of(checkpoint, pbnet_checkpoint), generator, fps,
                        framing, log)
    pose_t, pose_from = _pose_track(src, pose, reference_pose, pose_video)
    blink_t, blink_from = _blink_track(src, blink, reference_pose, blink_video or pose_video, pose)
    if pose_scale != 1.0:
        pose_t = pose_t * float(pose_scale)
        pose_from += f" x {pose_scale:g}"
    return pose_t.contiguous().float(), blink_t.contiguous().float(), f"{pose_from}, {blink_from}"
