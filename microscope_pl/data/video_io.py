"""Video reading (decord) and streaming video writing (ffmpeg subprocess).

``VideoWriter`` never holds more than the frames of one ``write`` call, so
inference can stream thousands of frames; the file appears under its final
name only after a successful ``close()``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from microscope_pl.data.audio import SAMPLE_RATE, write_wav

# Containers ffmpeg should be told explicitly: the temporary name keeps the suffix anyway.
_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`video_info` reports about a file."""

    fps: float
    frames: int
    width: int
    height: int


def _open_reader(path: str | Path) -> Any:
    """decord VideoReader for ``path``; ValueError when decord cannot open it."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError/RuntimeError variants
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: cannot read video ({first[:200]})") from exc


def _read_with_ffmpeg(path: Path, width: int, height: int) -> np.ndarray:
    """All frames via an ffmpeg rawvideo pipe -> uint8 ``[T, H, W, 3]``."""
    cmd = [_ffmpeg(), "-nostdin", "-v", "error", "-i", str(path), "-an", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        message = proc.stderr.decode("utf-8", "replace").strip()[-200:]
        raise ValueError(f"{path}: cannot decode video frames ({message})")
    frame_bytes = width * height * 3
    count = len(proc.stdout) // frame_bytes
    return np.frombuffer(proc.stdout[: count * frame_bytes], np.uint8).reshape(count, height, width, 3).copy()


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame -> uint8 ``[T, H, W, 3]`` RGB. ValueError for unreadable files.

    decord first; ffmpeg when decord's frame copy fails (it does for some
    widths, e.g. 48 px).
    """
    reader = _open_reader(path)
    if len(reader) == 0:
        raise ValueError(f"{path}: video has no frames")
    try:
        frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError variants
        width, height = _probe_size(Path(path))
        frames = _read_with_ffmpeg(Path(path), width, height)
        if frames.shape[0] == 0:
            raise ValueError(f"{path}: cannot decode video frames ({str(exc).strip()[:200]})") from exc
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _probe_size(path: Path) -> tuple[int, int]:
    """(width, height) of the first video stream, by ffprobe."""
    proc = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                           "stream=width,height", "-of", "csv=p=0", str(path)], capture_output=True, check=False)
    try:
        width, height = (int(v) for v in proc.stdout.decode().strip().split(",")[:2])
    except ValueError as exc:
        raise ValueError(f"{path}: cannot read video size") from exc
    return width, height


def read_frames(path: str | Path, indices: list[int] | np.ndarray) -> np.ndarray:
    """Decode selected frames -> uint8 ``[len(indices), H, W, 3]``."""
    reader = _open_reader(path)
    try:
        return np.ascontiguousarray(reader.get_batch([int(i) for i in indices]).asnumpy(), dtype=np.uint8)
    except Exception:  # noqa: BLE001 - decord copy bug: decode everything with ffmpeg instead
        return read_video(path)[np.asarray(indices, dtype=np.int64)]


def video_info(path: str | Path) -> VideoInfo:
    """Frame rate, frame count and size of a video (decord)."""
    reader = _open_reader(path)
    height, width = reader[0].shape[:2] if len(reader) else (0, 0)
    return VideoInfo(fps=float(reader.get_avg_fps()), frames=len(reader), width=int(width), height=int(height))


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError("ffmpeg was not found on PATH; install it (e.g. apt-get install ffmpeg)")
    return exe


def _temp_name(path: Path) -> Path:
    """A hidden name beside ``path`` that keeps its suffix (ffmpeg picks the muxer by it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.{id(path) & 0xFFFF:x}.tmp{path.suffix}")


class VideoWriter:
    """Stream RGB frames into an H.264 (yuv420p) file, optionally muxing 16 kHz AAC audio.

    ``size`` is ``S`` or ``(width, height)`` (both even). The audio, if given,
    is kept whole (no ``-shortest``). Use as a context manager, or call
    ``close()``; on an exception inside the ``with`` block the temporary file
    is removed and nothing appears at ``path``.
    """

    def __init__(self, path: str | Path, fps: float, size: int | tuple[int, int], audio: np.ndarray | None = None,
                 sample_rate: int = SAMPLE_RATE, crf: int = 18, preset: str = "medium") -> None:
        self.path = Path(path)
        self.fps = float(fps)
        self.width, self.height = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if self.width <= 0 or self.height <= 0 or self.width % 2 or self.height % 2:
            raise ValueError(f"yuv420p needs a positive even frame size, got {self.width}x{self.height}")
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.frames_written = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _temp_name(self.path)
        self._wav: Path | None = None
        self._log = tempfile.TemporaryFile()  # stderr to a file: a pipe could fill up and deadlock
        cmd = [_ffmpeg(), "-nostdin", "-y", "-v", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
               "-r", f"{self.fps:g}", "-i", "pipe:0"]
        if audio is not None:
            wave = np.asarray(audio, dtype=np.float32).reshape(-1)
            if wave.size == 0:
                raise ValueError("audio is empty")
            self._wav = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.wav")
            write_wav(self._wav, wave, sample_rate)
            cmd += ["-i", str(self._wav), "-map", "0:v:0", "-map", "1:a:0",
                    "-c:a", "aac", "-b:a", "96k", "-ar", str(sample_rate), "-ac", "1"]
        cmd += ["-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p"]
        muxer = _MUXERS.get(self.path.suffix.lower())
        if muxer == "mp4":
            cmd += ["-movflags", "+faststart"]
        if muxer is not None:
            cmd += ["-f", muxer]
        cmd.append(str(self._tmp))
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)

    def _stderr(self) -> str:
        self._log.seek(0)
        text = self._log.read().decode("utf-8", "replace").strip()
        return text.splitlines()[-1] if text else "no message"

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames ``[k, H, W, 3]`` (or one ``[H, W, 3]``)."""
        if self._proc is None:
            raise RuntimeError(f"{self.path}: writer is closed")
        array = np.asarray(frames)
        if array.ndim == 3:
            array = array[None]
        if array.dtype != np.uint8:
            raise ValueError(f"frames must be uint8, got {array.dtype}")
        if array.ndim != 4 or array.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"frames must be [k, {self.height}, {self.width}, 3], got {list(array.shape)}")
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(np.ascontiguousarray(array).tobytes())
        except BrokenPipeError as exc:
            self._proc.wait()
            message = self._stderr()
            self.abort()
            raise RuntimeError(f"{self.path}: ffmpeg stopped ({message})") from exc
        self.frames_written += array.shape[0]

    def close(self) -> Path:
        """Finish encoding and move the file to ``path``; returns ``path``."""
        if self._proc is None:
            return self.path
        proc = self._proc
        try:
            assert proc.stdin is not None
            proc.stdin.close()
        except BrokenPipeError:
            pass
        code = proc.wait()
        if code != 0 or self.frames_written == 0:
            message = self._stderr() if code != 0 else "no frames were written"
            self.abort()
            raise RuntimeError(f"{self.path}: encoding failed ({message})")
        self._proc = None
        os.replace(self._tmp, self.path)
        self._cleanup()
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and remove the temporary files; ``path`` is left untouched."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            if self._proc.stdin is not None:
                try:
                    self._proc.stdin.close()
                except BrokenPipeError:
                    pass
            self._proc = None
        self._tmp.unlink(missing_ok=True)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._wav is not None:
            self._wav.unlink(missing_ok=True)
            self._wav = None
        if not self._log.closed:
            self._log.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:  # a forgotten writer must not leave ffmpeg running
        if getattr(self, "_proc", None) is not None:
            self.abort()


def mux_audio(video_path: str | Path, audio: np.ndarray, out_path: str | Path,
              sample_rate: int = SAMPLE_RATE) -> Path:
    """Copy the video stream of ``video_path`` and add ``audio`` as 16 kHz AAC -> ``out_path``.

    Written under a temporary name and renamed, like :class:`VideoWriter`.
    """
    out_path = Path(out_path)
    tmp = _temp_name(out_path)
    wav = out_path.with_name(f".{out_path.stem}.{os.getpid()}.mux.wav")
    write_wav(wav, audio, sample_rate)
    cmd = [_ffmpeg(), "-nostdin", "-y", "-v", "error", "-i", str(video_path), "-i", str(wav),
           "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", "96k",
           "-ar", str(sample_rate), "-ac", "1"]
    if _MUXERS.get(out_path.suffix.lower()) == "mp4":
        cmd += ["-movflags", "+faststart", "-f", "mp4"]
    cmd.append(str(tmp))
    try:
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{out_path}: muxing failed ({proc.stderr.decode('utf-8', 'replace').strip()[-300:]})")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        wav.unlink(missing_ok=True)
    return out_path
