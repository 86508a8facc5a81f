"""Where files live: a local path, or a pyarrow filesystem URI (s3://, gs://, hdfs://, file://).

Jobs read and write locally; URIs are staged in and copied out, so every command treats a URI
location the same way whether it runs from a shell or under `ray job submit`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow as pa

from muscle_ray.errors import MuscleError


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` locations, which pyarrow.fs resolves; False for plain paths."""
    return "://" in str(location)


def in_workspace(path: str, workspace: str | None) -> str:
    """A relative config path taken under `workspace` (MUSCLE_WORKSPACE: a submitted job runs in
    Ray's unpacked copy of the code, not in the user's checkout); others as they are."""
    return str(Path(workspace) / path) if workspace and not Path(path).is_absolute() else path


def staging_dir(uri: str, staging: str | Path | None, job: str) -> Path:
    """The local directory a URI is staged in: stable per URI, so a rerun finds it again."""
    import hashlib

    if staging is None:
        raise MuscleError(f"{uri}: URIs need a staging directory (run through {job})")
    return Path(staging) / hashlib.sha256(uri.encode()).hexdigest()[:16]


def uri_exists(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def copy_location(src: str | Path, dst: str | Path) -> None:
    """Copy a file or a directory tree between local paths and URIs (pyarrow.fs.copy_files).

    Object stores have no directories or renames, so jobs write locally and copy the finished
    files out; a reader of the destination sees each file whole or not at all.
    """
    import pyarrow.fs as pafs

    def resolve(loc):
        return pafs.FileSystem.from_uri(str(loc)) if is_uri(loc) else (pafs.LocalFileSystem(), str(Path(loc).resolve()))

    (src_fs, src_path), (dst_fs, dst_path) = resolve(src), resolve(dst)
    info = src_fs.get_file_info(src_path)
    if info.type == pafs.FileType.NotFound:
        raise MuscleError(f"{src}: no such file or directory")
    if isinstance(dst_fs, pafs.LocalFileSystem):  # object stores have no directories to make
        dst_fs.create_dir(
            dst_path if info.type == pafs.FileType.Directory else str(Path(dst_path).parent), recursive=True
        )
    try:
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
    except (OSError, pa.ArrowException) as e:
        raise MuscleError(f"cannot copy {src} to {dst} ({e})") from None


# --- Running a config: stage its URIs in, copy its outputs out ------------------------------

STAGING = Path(tempfile.gettempdir()) / "muscle-ray-staging"


class Located(Protocol):
    """A config that knows its locations (ScoreConfig, TrainConfig): the same config with paths
    this process can open, and the (local_dir, uri) copies to make when the run ends."""

    def located(self, workspace: str | None, staging: str | Path | None) -> tuple[Any, list[tuple[str, str]]]: ...


@contextmanager
def staged(cfg: Located, staging: str | Path = STAGING, log: Callable[[str], None] | None = None):
    """`cfg` with locations this process can open, for the length of a run; then its outputs
    are copied to their URIs, also after a failure (finished files are whole, so a rerun into
    the same URI fetches them and resumes).

    Relative paths are taken under MUSCLE_WORKSPACE when it is set (a submitted job runs in
    Ray's unpacked copy of the code); `cfg.located` knows which of its fields are inputs to
    fetch and which are outputs to stage. A shell and `ray job submit` run the same code.
    """
    local, copies = cfg.located(os.environ.get("MUSCLE_WORKSPACE"), staging)
    try:
        yield local
    finally:
        for src, uri in copies:
            if Path(src).exists():
                copy_location(src, uri)
                (log or _stderr)(f"copied {src} -> {uri}")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
