"""The student (frozen base + one trainable LoRA), adapter switching, and adapter export.

Exported adapters are plain PEFT directories (adapter_config.json + adapter_model.safetensors
with PEFT's own key names), so `PeftModel.from_pretrained` and vLLM's LoRA loader take them
as they are; `muscle_manifest.json` beside them records what they were trained from.

Sharded loading (FSDP2): `skeleton` builds a model whose base weights take no memory (each is a
zero-stride view of one element), so PEFT adds its adapters exactly as on a loaded base (same
random LoRA init, same dtypes); `load_sharded` then moves every parameter to the meta device,
lets the caller `fully_shard` it, allocates only this worker's shards on the device and reads
only their rows from the safetensors files. No worker ever holds the whole base.
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
AUTO_CHECKPOINTING_PARAMS = 500_000_000  # `activation_checkpointing: auto` turns it on above this
_STAND_IN = "_muscle_stand_in"  # marks a skeleton's base weight: no values yet


def build_student(
    base: str, lora: LoraSettings, init_adapter: str | None, dtype=torch.float32, *, weights: bool = True
):
    """Base + trainable LoRA: a copy of `init_adapter` (compat default) or a fresh LoRA.

    The base is frozen in `dtype`; the LoRA weights are fp32 whatever `dtype` is (PEFT upcasts
    bf16 adapters, and the optimizer state follows them). `weights=False` builds the base as a
    `skeleton` for `load_sharded`."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    if weights:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
    else:
        model = skeleton(base, dtype)
    model.config.use_cache = False
    if init_adapter:
        student = PeftModel.from_pretrained(model, init_adapter, adapter_name=STUDENT, is_trainable=True)
        return _fp32_trainable(student)
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT says int; scaling takes any number
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return _fp32_trainable(get_peft_model(model, cfg, adapter_name=STUDENT))


def _fp32_trainable(model):
    """Trainable weights in fp32 (a no-op unless PEFT left some in the base's dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


def hf_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_blocks(model) -> list[torch.nn.Module]:
    """The decoder blocks (transformers' `_no_split_modules`): FSDP2 and checkpointing units."""
    names = set(getattr(hf_model(model), "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def n_params(model) -> int:
    """Parameters of the model, LoRA included (a skeleton counts as its loaded self)."""
    return sum(p.numel() for p in model.parameters())


def use_checkpointing(setting: bool | str, model) -> bool:
    """`run.activation_checkpointing`: True/False, or "auto": on for bases over 500M parameters.
    `model` may be a parameter count (`muscle plan` has only config.json)."""
    if setting == "auto":
        return (model if isinstance(model, int) else n_params(model)) > AUTO_CHECKPOINTING_PARAMS
    return bool(setting)


def enable_checkpointing(model) -> None:
    """Recompute each decoder block's activations in backward (transformers' per-layer hook,
    non-reentrant: works under PEFT, autocast and FSDP2, whose all-gather it repeats)."""
    hf_model(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def skeleton(base: str, dtype=torch.float32, trust_remote_code: bool = False):
    """The model of `base` without its weights, for `load_sharded`.

    Built on the meta device, then each parameter becomes a CPU zero-stride view of one element
    (its shape and dtype, no memory), so PEFT creates and initialises adapters on the CPU as on a
    loaded model. Buffers are real: the rotary embeddings' are recomputed by transformers' own
    `_init_weights`; a model with other buffers is refused (they would need the checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from muscle_ray.errors import MuscleError

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    stand_ins: dict[int, torch.nn.Parameter] = {}  # tied weights stay one parameter
    for name, module in model.named_modules():
        for key, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in stand_ins:
                stand_ins[id(p)] = torch.nn.Parameter(torch.zeros((), dtype=p.dtype).expand(p.shape), p.requires_grad)
                setattr(stand_ins[id(p)], _STAND_IN, True)
            module._parameters[key] = stand_ins[id(p)]
        if any(b is not None for b in module._buffers.values()):
            if "RotaryEmbedding" not in type(module).__name__ or module._parameters:
                raise MuscleError(
                    f"{base}: {name} ({type(module).__name__}) has buffers sharded loading cannot rebuild; "
                    "train it with strategy ddp or plain"
                )
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = torch.empty_like(b, device="cpu")
            model._init_weights(module)
    return model


class _SafetensorsRows:
    """Rows of the checkpoint's tensors, read from the safetensors files without loading them whole."""

    def __init__(self, base: str | Path):
        from safetensors import safe_open

        from muscle_ray.errors import MuscleError

        base = Path(base)
        index = base / "model.safetensors.index.json"
        if index.is_file():
            files = {k: base / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = {}
            for f in sorted(base.glob("*.safetensors")):
                with safe_open(str(f), "pt") as fh:
                    files.update({k: f for k in fh.keys()})
        if not files:
            raise MuscleError(f"{base}: no safetensors weights to load")
        self.base, self.files = base, files
        self.open = {f: safe_open(str(f), "pt") for f in set(files.values())}

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        from muscle_ray.errors import MuscleError

        if key not in self.files:
            raise MuscleError(f"{self.base}: no tensor {key!r} in its safetensors files")
        return self.open[self.files[key]].get_slice(key)[start:stop]


def checkpoint_key(param_name: str) -> str:
    """The safetensors key of a (PEFT-wrapped) model's base parameter."""
    return param_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def shard_rows(p: torch.Tensor) -> tuple[int, int]:
    """The rows [start, stop) of dim 0 this worker holds: FSDP2's `torch.chunk` split for a
    DTensor sharded on dim 0, all rows for a plain tensor."""
    from torch.distributed.tensor import DTensor, Shard

    n = p.shape[0] if p.dim() else 1
    if not isinstance(p, DTensor):
        return 0, n
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"expected a dim-0 sharded parameter, got {p.placements}")
    rank, world = p.device_mesh.get_local_rank(), p.device_mesh.size()
    chunk = -(-n // world)
    start = min(rank * chunk, n)
    return start, min(start + chunk, n)


def local_bytes(model) -> int:
    """Bytes of the parameters this worker holds (its shards under FSDP2)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())


def _to_meta(model) -> None:
    """Every parameter and buffer to the meta device, tied weights kept one parameter
    (`Module.to` makes a new parameter per module when the device type changes)."""
    params: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                if id(p) not in params:
                    params[id(p)] = torch.nn.Parameter(p.detach().to("meta"), p.requires_grad)
                module._parameters[key] = params[id(p)]
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.to("meta")


@torch.no_grad()
def load_sharded(model, base: str | Path, device, shard):
    """Shard a `skeleton`-built model with `shard(model)` (FSDP2 `fully_shard` calls), allocate
    this worker's shards on `device` and fill them: base weights from the rows of `base`'s
    safetensors files, adapters (the real parameters PEFT made) from their full values."""
    from torch.distributed.tensor import DTensor

    real = {n: p.detach() for n, p in model.named_parameters() if not getattr(p, _STAND_IN, False)}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    _to_meta(model)  # drops the stand-ins; FSDP2 shards meta parameters without allocating them
    shard(model)
    model.to_empty(device=device)
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    reader = _SafetensorsRows(base)
    for n, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        start, stop = shard_rows(p)
        if n in real:
            src = real[n][start:stop] if p.dim() else real[n]
        else:
            src = reader.rows(checkpoint_key(n), start, stop)
        local.copy_(src.reshape(local.shape))
    return model


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
