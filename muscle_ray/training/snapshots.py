"""Adapter snapshots every K optimizer steps: the points of an NFR-against-accuracy curve.

The rank-0 worker writes each snapshot (a plain PEFT directory, `step-000050/`) and the index
`snapshots.json` = [{"step", "path", "val_loss"}] into the Ray Train run's directory, which
every node sees (a local path or a URI) and which a resumed run finds again; `run_training` then
copies them to `<out>/snapshots/`, beside the final export. The index is what counts: a step
directory is listed once it is whole.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from muscle_ray.errors import MuscleError
from muscle_ray.locations import copy_location, is_uri

SNAPSHOTS = "snapshots"  # the folder, in the run directory and in the exported adapter
INDEX = "snapshots.json"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _fs(location: str | Path):
    import pyarrow.fs as pafs

    if is_uri(location):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def read_index(location: str | Path) -> list[dict]:
    """The snapshots recorded under `location` (a snapshots folder), by step; [] when none."""
    fs, root = _fs(location)
    try:
        with fs.open_input_stream(f"{root}/{INDEX}") as f:
            text = f.read().decode()
    except FileNotFoundError:
        return []
    try:
        return sorted(json.loads(text), key=lambda e: e["step"])
    except (ValueError, TypeError, KeyError) as e:
        raise MuscleError(f"{location}/{INDEX}: not a snapshot index ({e})") from None


def write_index(location: str | Path, entries: list[dict]) -> None:
    """Replace the index whole (temp file + move: a reader never sees half of it)."""
    fs, root = _fs(location)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{INDEX}.tmp") as f:
        f.write(json.dumps(sorted(entries, key=lambda e: e["step"]), indent=2).encode())
    fs.move(f"{root}/{INDEX}.tmp", f"{root}/{INDEX}")


def record(location: str | Path, step: int, val_loss: float | None, write: Callable[[Path], object]) -> None:
    """Add (or redo) the snapshot of `step`: `write(dir)` fills a local directory, which is
    copied to `location/step-NNNNNN/` before the index names it."""
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        copy_location(tmp, f"{location}/{step_name(step)}")
    entry = {"step": step, "path": step_name(step), "val_loss": val_loss}
    write_index(location, [e for e in read_index(location) if e["step"] != step] + [entry])


def keep_until(location: str | Path, step: int) -> None:
    """Forget snapshots after `step`, the step a run starts (or resumes) from: a resumed run keeps
    the ones it wrote up to its checkpoint and writes the later ones again."""
    entries = read_index(location)
    if any(e["step"] > step for e in entries):
        write_index(location, [e for e in entries if e["step"] <= step])


def publish(location: str | Path | None, adapter_dir: str | Path) -> list[dict]:
    """Copy a run's snapshots to `adapter_dir/snapshots/`, replacing an earlier run's; their index."""
    import shutil

    dest = Path(adapter_dir) / SNAPSHOTS
    shutil.rmtree(dest, ignore_errors=True)
    if location is None or not read_index(location):
        return []
    copy_location(location, dest)
    return read_index(dest)


def list_snapshots(adapter_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, PEFT directory) of each snapshot exported beside the adapter in `adapter_dir`."""
    root = Path(adapter_dir) / SNAPSHOTS
    return [(e["step"], root / e["path"]) for e in read_index(root)]
