"""The student (frozen base + one trainable LoRA), adapter switching, and adapter export.

Exported adapters are plain PEFT directories (adapter_config.json + adapter_model.safetensors
with PEFT's own key names), so `PeftModel.from_pretrained` and vLLM's LoRA loader take them
as they are; `muscle_manifest.json` beside them records what they were trained from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

from muscle_ray.training.config import LoraSettings

STUDENT = "default"  # PEFT's name for the first adapter: the one being trained
NEW_TEACHER = "teacher_new"  # the frozen v2 task adapter, loaded beside it for inline teachers


def build_student(base: str, lora: LoraSettings, init_adapter: str | None, dtype=torch.float32):
    """Base + trainable LoRA: a copy of `init_adapter` (compat default) or a fresh LoRA."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
    model.config.use_cache = False
    if init_adapter:
        return PeftModel.from_pretrained(model, init_adapter, adapter_name=STUDENT, is_trainable=True)
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT says int; scaling takes any number
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg, adapter_name=STUDENT)


@contextmanager
def active_adapter(peft_model, name: str):
    """Run the PEFT model with adapter `name` active, leaving every requires_grad flag alone.

    PEFT's `set_adapter` also (un)freezes parameters; switching the active name on each LoRA
    layer keeps the student's trainable flags (and FSDP/DDP's view of them) untouched."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [m._active_adapter for m in layers]
    was_training = peft_model.training
    try:
        for m in layers:
            m._active_adapter = [name]
        peft_model.eval()
        yield peft_model
    finally:
        for m, a in zip(layers, saved):
            m._active_adapter = a
        peft_model.train(was_training)


def save_adapter(peft_model, state_dict: dict, out: str | Path) -> Path:
    """Write the student adapter from a full (gathered) state dict, PEFT layout only."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=STUDENT)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = copy.deepcopy(peft_model.peft_config[STUDENT])
    cfg.inference_mode = True
    cfg.save_pretrained(out)
    return out


def base_fingerprint(base: str | Path) -> dict:
    """Cheap identity of a base model: sha256 of config.json, and per weights file its size
    and the sha256 of its safetensors header (tensor names, dtypes, shapes, offsets)."""
    base = Path(base)
    files = {}
    for f in sorted(base.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = fh.read(n)
        files[f.name] = {"bytes": f.stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest()}
    return {
        "path": str(base.resolve()),
        "config_sha256": hashlib.sha256((base / "config.json").read_bytes()).hexdigest(),
        "weights": files,
    }


def write_manifest(out: str | Path, **fields) -> Path:
    path = Path(out) / "muscle_manifest.json"
    path.write_text(json.dumps(fields, indent=2, default=str))
    return path
