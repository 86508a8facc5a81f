"""One run at a time per output directory: OUT/.lock, held while a run writes there.

Two runs scoring into the same directory would interleave their shards; the second is refused
in one line that names the lock file and the run holding it. The lock itself is the kernel's
(`fcntl.flock`), so it is released when its process ends, however it ends; the file a killed
run leaves behind only says who held it, and the next run takes it over with a warning.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from muscle_ray.errors import MuscleError

LOCK_FILE = ".lock"


@contextmanager
def out_lock(out: str | Path, log: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold OUT/.lock for the `with` block; MuscleError if another live run holds it."""
    path = Path(out) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, log)
    try:
        yield path
    finally:
        if fd is not None:
            path.unlink(missing_ok=True)  # before closing: a waiting run then finds the file gone
            os.close(fd)


def _acquire(path: Path, log: Callable[[str], None]) -> int | None:
    """The locked file's descriptor, with this run written into it (None: no locking here)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by Ray's processes
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise MuscleError(
                f"{path}: another run is writing to this directory ({holder}); wait for it "
                "to finish or use another --out"
            ) from None
        except OSError as e:  # a filesystem without locks (some network mounts)
            os.close(fd)
            log(f"warning: {path}: cannot lock ({e.strerror}); nothing stops a second run from writing here")
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # its holder removed it between our open and our lock: lock the new one
    stale = _holder(fd)
    if stale:
        log(f"warning: {path}: taking over the lock of {stale}, which ended without releasing it")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    return fd


def _holder(fd: int) -> str:
    """Who the lock file says holds it, as a person reads it ('' when it says nothing)."""
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if not text:
        return ""
    try:
        h = json.loads(text)
        return f"host {h['host']}, pid {h['pid']}, since {h['since']}"
    except (ValueError, KeyError, TypeError):
        return " ".join(text.split())[:200]
