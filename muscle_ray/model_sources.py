"""Where a model comes from: a local HF directory, a hub id, or a GGUF file.

Users name models the way they have them: `runs/zoo/v2`, `HuggingFaceTB/SmolLM2-135M@main`,
`~/models/smollm2.Q4_1.gguf`. Every config field that names a model goes through
`resolve_model`, so the rest of muscle-ray only ever opens a local directory with
safetensors weights (what `ModelVersion` checks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from muscle_ray.errors import MuscleError
from muscle_ray.locations import in_workspace

# `org/name` or `org/name@revision` (a branch, tag or commit), as the hub spells repo ids
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
logger = logging.getLogger(__name__)
GGUF_FORMAT = "1"  # bump when the conversion's output changes, so old cache entries are not reused


def resolve_model(ref: str) -> Path:
    """The local directory for a model reference.

    A local path is returned as written (ModelVersion checks what is in it); `org/name[@rev]`
    that is not a local directory is a hub id, taken from the local hub cache when offline;
    a `.gguf` file is converted once into a safetensors directory under the muscle cache.
    Relative paths also count as local when they exist under MUSCLE_WORKSPACE (a submitted job).
    """
    local = Path(in_workspace(os.path.expanduser(ref), os.environ.get("MUSCLE_WORKSPACE")))
    if local.suffix == ".gguf":
        if not local.is_file():
            raise MuscleError(f"{ref}: no such GGUF file")
        return convert_gguf(local)
    hub = HUB_ID.fullmatch(ref)
    if hub and not Path(ref).exists() and not local.exists():
        return hub_snapshot(hub["repo"], hub["revision"])
    return Path(os.path.expanduser(ref))


def config_model(ref: str) -> str:
    """A config field naming a model, as the config keeps it.

    Hub ids in the cache and GGUF files become their local directory when the config is read,
    so every reader, on any node, opens a plain path. Local paths stay as written: a relative
    one is taken under the workspace or the app's root later, so `org/name` that is neither
    here nor in the cache stays too, and ModelVersion names what is missing where it is opened.
    """
    try:
        path = resolve_model(ref)
    except MuscleError as e:
        if HUB_ID.fullmatch(ref):
            return ref
        raise ValueError(str(e)) from None  # pydantic's error names the field
    return ref if path == Path(ref) else str(path)


# The type of a config field that names a model: `base: ModelName`
ModelName = Annotated[str, AfterValidator(config_model)]


def hub_snapshot(repo: str, revision: str | None = None) -> Path:
    """The snapshot directory of a hub repo; only the local cache is read when HF_HUB_OFFLINE
    is set (as on every machine without network to the hub)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    named = f"{repo}@{revision}" if revision else repo
    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=hub_cache(), local_files_only=_offline()))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        if _offline():
            raise MuscleError(
                f"{named}: no such local directory, and not in the local Hugging Face cache "
                f"({hub_cache()}, offline); download it where the hub is reachable "
                f"(`hf download {repo}`) or name a local directory"
            ) from None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MuscleError(f"{named}: not found on the Hugging Face hub: {reason}") from None


def hub_cache() -> str:
    """HF_HUB_CACHE, else HF_HOME/hub, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}


def cache_root() -> Path:
    """MUSCLE_CACHE, else ~/.cache/muscle-ray: converted models live here."""
    base = os.environ.get("MUSCLE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "muscle-ray"
    return Path(base).expanduser()


def gguf_key(path: Path, chunk: int = 1 << 20) -> str:
    """A content key for a GGUF file that does not read all of it: size, first and last MiB."""
    h = hashlib.sha256(f"{GGUF_FORMAT}:{path.stat().st_size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        f.seek(max(0, path.stat().st_size - chunk))
        h.update(f.read(chunk))
    return h.hexdigest()[:32]


def convert_gguf(path: Path) -> Path:
    """The GGUF file as a safetensors HF directory, converted on first use.

    The conversion is written to a temporary directory and renamed into place, so another
    process sees either nothing (and converts too; the first rename wins) or all of it.
    """
    dest = cache_root() / "gguf" / gguf_key(path)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("converting %s into %s (once; it is reused from there)", path, dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        write_hf_dir(path, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # not "another process got there first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_hf_dir(path: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint (transformers' GGUF loader) into float32 safetensors.

    A GGUF-loaded model refuses save_pretrained, so its weights go into a model built from
    the same config without the quantization entry; the tokenizer keeps its chat template.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, ImportError) as e:
        raise MuscleError(f"{path}: cannot read this GGUF file with transformers: {e}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
