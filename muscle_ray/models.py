"""A model version = an HF causal-LM (a local directory, hub id or GGUF file) plus an optional
PEFT adapter directory."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from muscle_ray.errors import MuscleError
from muscle_ray.model_sources import resolve_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    """What a user names when they say "the old model" or "the new model"."""

    base: str
    adapter: str | None = None
    name: str = "model"
    trust_remote_code: bool = False

    def __post_init__(self):
        """`base` becomes the local directory it names (see muscle_ray.model_sources)."""
        base = resolve_model(self.base)
        where = self.base if str(base) == self.base else f"{self.base} ({base})"
        object.__setattr__(self, "base", str(base))
        if not (base / "config.json").is_file():
            raise MuscleError(f"{where}: not a Hugging Face model directory (no config.json)")
        if not any(base.glob("*.safetensors")):
            raise MuscleError(f"{where}: no *.safetensors weights (only safetensors checkpoints are loaded)")
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise MuscleError(f"{self.adapter}: not a PEFT adapter directory (no adapter_config.json)")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (exact, and fast enough for small models), bf16 on GPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(version: ModelVersion):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(version.base, trust_remote_code=version.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    version: ModelVersion,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trainable_adapter: bool = False,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
):
    """Load base (+ adapter) for inference, in eval mode; adapters stay unmerged.

    `dtype` may be a name ("bfloat16", or "auto": the checkpoint's); with a `device_map`
    accelerate places the model and it is never moved as a whole."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str) and dtype != "auto":
        dtype = DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(
        version.base,
        dtype=dtype or default_dtype(device),
        device_map=device_map,
        attn_implementation=attn_implementation,
        use_safetensors=True,
        trust_remote_code=version.trust_remote_code,
    )
    if version.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, version.adapter, is_trainable=trainable_adapter)  # type: ignore[assignment]
    return (model if device_map is not None else model.to(device)).eval()  # type: ignore[arg-type]


SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def check_same_tokenizer(versions: list[ModelVersion]) -> None:
    """Token-level comparison (KL, per-token log-probs) needs the same id for the same token.

    Versions may differ in tokens only one of them has (an added or renamed special token):
    that is a warning with a count. Shared tokens mapped to different ids are refused.
    """
    first, *rest = list({v.base: v for v in versions}.values())
    ref = load_tokenizer(first)
    ref_vocab = ref.get_vocab()
    for v in rest:
        tok = load_tokenizer(v)
        vocab = tok.get_vocab()
        shared = ref_vocab.keys() & vocab.keys()
        moved = sorted((t for t in shared if ref_vocab[t] != vocab[t]), key=ref_vocab.__getitem__)
        if moved:
            t = moved[0]
            raise MuscleError(
                f"model versions do not share a tokenizer: {first.name} ({first.base}) and {v.name} ({v.base}) "
                f"map {len(moved)} of {len(shared)} shared tokens to different ids, e.g. {t!r}: "
                f"{ref_vocab[t]} vs {vocab[t]}; token-by-token comparison needs the same ids "
                "(MUSCLE does not cover vocabulary changes)"
            )
        only = sorted(ref_vocab.keys() ^ vocab.keys())
        renamed = [
            f"{role} {getattr(ref, role)!r} -> {getattr(tok, role)!r}"
            for role in SPECIAL_ROLES
            if getattr(ref, role) != getattr(tok, role)
        ]
        if only or renamed:
            example = f"e.g. {only[0]!r}; " if only else ""
            logger.warning(
                "%s and %s: %d token(s) in one vocabulary only (%s%d special token(s) renamed%s); "
                "shared tokens keep their ids",
                first.name,
                v.name,
                len(only),
                example,
                len(renamed),
                f": {', '.join(renamed)}" if renamed else "",
            )
