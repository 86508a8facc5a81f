"""A model version = a local HF causal-LM directory plus an optional PEFT adapter directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from muscle_ray.errors import MuscleError


@dataclass(frozen=True)
class ModelVersion:
    """What a user names when they say "the old model" or "the new model"."""

    base: str
    adapter: str | None = None
    name: str = "model"
    trust_remote_code: bool = False

    def __post_init__(self):
        base = Path(self.base)
        if not (base / "config.json").is_file():
            raise MuscleError(f"{self.base}: not a Hugging Face model directory (no config.json)")
        if not any(base.glob("*.safetensors")):
            raise MuscleError(f"{self.base}: no *.safetensors weights (only safetensors checkpoints are loaded)")
        if self.adapter is not None and not (Path(self.adapter) / "adapter_config.json").is_file():
            raise MuscleError(f"{self.adapter}: not a PEFT adapter directory (no adapter_config.json)")


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


def load_model(version: ModelVersion, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None, trainable_adapter: bool = False):
    """Load base (+ adapter) for inference, in eval mode; adapters stay unmerged."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(
        version.base, dtype=dtype, use_safetensors=True, trust_remote_code=version.trust_remote_code
    )
    if version.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, version.adapter, is_trainable=trainable_adapter)  # type: ignore[assignment]
    return model.to(device).eval()  # type: ignore[arg-type]


def vocab_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary, so versions compared token by token can be checked."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def check_same_tokenizer(versions: list[ModelVersion]) -> None:
    """Token-level comparison (KL, per-token logprobs) needs one shared vocabulary."""
    seen: dict[str, str] = {}
    for v in versions:
        seen.setdefault(vocab_fingerprint(load_tokenizer(v)), v.name)
    if len(seen) > 1:
        names = ", ".join(f"{n} ({fp})" for fp, n in seen.items())
        raise MuscleError(
            f"model versions do not share a tokenizer: {names} have different vocabularies; "
            "token-by-token comparison needs the same vocabulary (MUSCLE does not cover vocabulary changes)"
        )
