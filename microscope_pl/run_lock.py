"""One training run per checkpoint folder.

`fit` holds `<checkpoint folder>/.run.lock` for its whole run. It is a POSIX
record lock (fcntl), so the operating system drops it when the run ends in any
way, `kill -9` included: a killed run never leaves the folder stuck. Record locks
are not inherited by forked data-loader workers, and the lock file holds the
owner (pid, host, start, command) only to name it in the refusal.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

LOCK_NAME = ".run.lock"
_HELD: dict[str, int] = {}  # folder -> fd of the locks this process holds (record locks do not stop the owner)


class RunLockedError(ValueError):
    """Another run is writing into the same checkpoint folder (a ValueError: the CLI prints one line)."""


def _owner_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        owner = json.loads(os.read(fd, 4096).decode() or "{}")
    except ValueError:
        return "another run"
    if not owner:
        return "another run"
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("started", 0)))
    return f"run pid {owner.get('pid')} on {owner.get('host')} (started {started}: {owner.get('command', '?')})"


def acquire(folder: str | os.PathLike) -> int:
    """Lock `folder` (created if missing) for this process; RunLockedError if another run holds it."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _HELD:
        raise RunLockedError(f"{folder} is already in use by this process; one run per checkpoint folder")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _owner_text(fd)
        os.close(fd)
        raise RunLockedError(f"{folder} is in use by {holder}; wait for it or stop it, or train into "
                             "another folder with --run NAME") from None
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
             "command": " ".join(["microscope", *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    _HELD[key] = fd
    return fd


def release(folder: str | os.PathLike) -> None:
    """Drop this process's lock on `folder` (nothing if it holds none)."""
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the record lock


@contextlib.contextmanager
def holding(folders: Iterable[str | os.PathLike]) -> Iterator[None]:
    """Hold every folder's lock for the block; all or none (a refused one releases the others)."""
    taken: list[str | os.PathLike] = []
    try:
        for folder in dict.fromkeys(str(f) for f in folders):
            acquire(folder)
            taken.append(folder)
        yield
    finally:
        for folder in taken:
            release(folder)
