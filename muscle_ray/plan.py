"""How much memory one worker of a training or scoring job needs, from the model's config.json alone.

`muscle plan` answers "will this fit, and on how many workers?" before any weights are read. The
parameter counts come from the architecture (embeddings, attention with grouped KV heads, gated
MLP, RMSNorms, lm_head tied or not; Llama, Mistral and Qwen2 style decoders) and match what
transformers instantiates. Everything else is a documented estimate, per worker, in bytes:

- base weights: params x bytes(dtype). Training loads the student in `run.precision` (fp32 by
  default), the teachers in bf16 with `run.precision: bf16` and otherwise, like the scoring models,
  in bf16 on a GPU and fp32 on a CPU (`models.default_dtype`); `--dtype` overrides all three.
  Under FSDP every parameter is sharded over the workers, and each worker also holds what FSDP2
  gathers: the root's parameters (embeddings, final norm, lm_head: the root is not resharded after
  forward) and two decoder blocks (the current one, the prefetched one).
- LoRA + AdamW: trainable params x 16 B (fp32 weight, gradient, two moments), sharded under FSDP.
- activations per micro-batch, what autograd saves, measured on transformers' Llama (SDPA
  attention, LoRA on all linear layers): per layer and token 6 h + 4 i + 2 kv + heads + 7 r
  elements (h hidden, i intermediate, kv = KV heads x head_dim, r the LoRA rank), in the compute
  dtype's bytes. With activation checkpointing a layer keeps only its input (h elements per token)
  and one layer at a time is recomputed in full during backward. Training's default is
  `run.activation_checkpointing`, whose "auto" is resolved as the loop does
  (`lora.use_checkpointing` on the student's parameter count, LoRA adapters included).
- logits and loss: cross-entropy keeps three fp32 (tokens x vocab) tensors at its peak (the
  logits, the saved log-softmax, its gradient). The MUSCLE loss keeps the student's logits and
  their gradient, plus ~8 fp32 (chunk x vocab) temporaries of its chunked KL (`chunk_tokens`; an
  estimate from the code, not yet measured).
- teachers (compat): the v1 base + v1 adapter; the v2 adapter is loaded into the student as a
  frozen second adapter (inline teachers). Their logits: 2 x tokens x vocab in their dtypes, or
  top-k (ids, log-probs, tail, label log-prob) with `topk`.
- runtime: the process before any model (Python, torch, transformers, peft: ~0.5 GiB RSS on a CPU;
  the CUDA context, outside torch's allocator, on a GPU).
- CPU heap slack (training on a CPU): glibc's malloc raises its mmap threshold as tensors are
  freed, so later activations come from heaps it does not give back; the peak RSS of steady-state
  steps exceeds the live tensors by ~0.9 x (activations + loss) (SmolLM2-135M, micro-batch 4 x 256:
  4.5 GiB RSS against 2.8 GiB live). MALLOC_MMAP_THRESHOLD_=131072 in the workers' environment
  pins the threshold and removes it (2.8 GiB), at a cost in step time (12.6 against 9.0 s there).
- scoring: the largest version (base + adapter), one block's activations, fp32 logits and their
  log-softmax for one batch, and the KV cache of generation tasks.

bench/plan_vs_measured.py checks the task-adapter estimate against the peak RSS of real steps.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from muscle_ray.errors import MuscleError
from muscle_ray.locations import in_workspace

GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
RUNTIME_BYTES = {"cpu": GiB // 2, "gpu": GiB // 2}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHS = ("llama", "mistral", "qwen2")
ADAM_BYTES = 16  # fp32 weight + gradient + exp_avg + exp_avg_sq
LOSS_TEMPS = 8  # fp32 (chunk x vocab) temporaries of the chunked MUSCLE KL at its peak
HEAP_SLACK = 0.9  # CPU: freed step memory glibc keeps, x (activations + loss); bench/plan_vs_measured.py


@dataclass(frozen=True)
class Arch:
    """A Llama-style decoder's shape, from its config.json."""

    model_type: str
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Arch":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise MuscleError(f"{model_dir}: no config.json there (muscle plan reads only the model's config.json)")
        try:
            return cls.from_config(json.loads(path.read_text()), str(path))
        except json.JSONDecodeError as e:
            raise MuscleError(f"{path}: not valid JSON ({e})") from None

    @classmethod
    def from_config(cls, c: dict, where: str = "config.json") -> "Arch":
        kind = c.get("model_type")
        if kind not in ARCHS:
            raise MuscleError(f"{where}: model_type {kind!r}: muscle plan knows {', '.join(ARCHS)} decoders")
        need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in need if not isinstance(c.get(k), int)]
        if missing:
            raise MuscleError(f"{where}: missing or not an integer: {', '.join(missing)}")
        heads = c["num_attention_heads"]
        attention_bias = bool(c.get("attention_bias", False))
        return cls(
            model_type=kind,
            vocab=c["vocab_size"],
            hidden=c["hidden_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate=c["intermediate_size"],
            tied=bool(c.get("tie_word_embeddings", False)),  # False: the default of all three configs
            qkv_bias=kind == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(c.get("mlp_bias", False)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def params(self) -> dict[str, int]:
        """Parameter counts by part, and their total (a tied lm_head counts once, as embeddings)."""
        lin = self.linears()
        bias = {"q_proj": self.qkv_bias, "k_proj": self.qkv_bias, "v_proj": self.qkv_bias, "o_proj": self.o_bias}
        bias |= dict.fromkeys(("gate_proj", "up_proj", "down_proj"), self.mlp_bias)
        per = {n: a * b + (b if bias[n] else 0) for n, (a, b) in lin.items()}
        parts = {
            "embeddings": self.vocab * self.hidden,
            "attention": self.layers * sum(per[n] for n in LINEARS[:4]),
            "mlp": self.layers * sum(per[n] for n in LINEARS[4:]),
            "norms": (2 * self.layers + 1) * self.hidden,
            "lm_head": 0 if self.tied else self.vocab * self.hidden,
        }
        return {**parts, "total": sum(parts.values())}

    def block_params(self) -> int:
        p = self.params()
        return (p["attention"] + p["mlp"] + 2 * self.layers * self.hidden) // self.layers

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        """Trainable LoRA parameters: r x (in + out) per targeted linear layer of every block."""
        names = LINEARS if targets == "all-linear" else ([targets] if isinstance(targets, str) else targets)
        unknown = sorted(set(names) - set(LINEARS))
        if unknown:
            raise MuscleError(f"lora.target_modules: {unknown} are not linear layers of a block ({', '.join(LINEARS)})")
        lin = self.linears()
        return self.layers * sum(r * (lin[n][0] + lin[n][1]) for n in names)

    def activation_elems(self, r: int, checkpointing: bool) -> int:
        """Elements autograd keeps per token for all blocks (see the module docstring)."""
        full = 6 * self.hidden + 4 * self.intermediate + 2 * self.kv_heads * self.head_dim + self.heads + 7 * r
        if checkpointing:
            return self.layers * self.hidden + full  # layer inputs + the one layer recomputed
        return self.layers * full


@dataclass
class Part:
    name: str
    bytes: int
    note: str
    sharded: bool = False  # divided over FSDP workers


@dataclass
class Plan:
    kind: str  # train-adapter | train-compat | score
    model: str
    arch: dict
    params: dict
    settings: dict
    parts: list[Part] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def parse_bytes(text: str) -> int:
    """`80GiB`, `80G`, `512MiB`, `1.5TB`, `1000000` -> bytes (G and GiB both mean 2**30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise MuscleError(f"--device-memory {text!r}: expected a size such as 80GiB, 24G or 512MiB")
    scale = 1024 ** "KMGT".find(m[2].upper()) * 1024 if m[2] else 1
    return int(float(m[1]) * scale)


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def adapter_lora(adapter: str | None, default: tuple[int, str | list[str]]) -> tuple[int, str | list[str]]:
    """(r, target modules) of a PEFT adapter directory, else `default` (the adapter is not there yet)."""
    path = Path(adapter) / "adapter_config.json" if adapter else None
    if path is None or not path.is_file():
        return default
    c = json.loads(path.read_text())
    targets = c.get("target_modules") or default[1]
    if isinstance(targets, list) and "lm_head" in targets:
        targets = [t for t in targets if t != "lm_head"]
    return int(c.get("r", default[0])), "all-linear" if targets == "all-linear" else list(targets)


def _fsdp_gathered(arch: Arch, dtype_bytes: int, workers: int) -> int:
    """What FSDP2 holds unsharded on each worker: the root's parameters and two decoder blocks."""
    p = arch.params()
    root = p["embeddings"] + p["lm_head"] + arch.hidden
    return (root - root // workers + 2 * arch.block_params()) * dtype_bytes


def _settings_from_config(cfg, dtype: str | None, checkpointing: bool | None, n_params: int) -> dict:
    """The student's dtype and activation checkpointing, each with where it came from: the
    argument (the command line's flag) when given, else the config's `run` section."""
    from muscle_ray.training.lora import use_checkpointing

    setting = cfg.run.activation_checkpointing
    if checkpointing is not None:
        ckpt, ckpt_from = checkpointing, "--checkpointing" if checkpointing else "--no-checkpointing"
    elif setting == "auto":
        ckpt = use_checkpointing(setting, n_params)
        ckpt_from = f"config run.activation_checkpointing: auto, {n_params / 1e6:,.1f}M params"
    else:
        ckpt, ckpt_from = setting, "config run.activation_checkpointing"
    return dict(
        dtype=dtype or cfg.run.precision,
        dtype_from="--dtype" if dtype else "config run.precision",
        checkpointing=ckpt,
        checkpointing_from=ckpt_from,
    )


def plan_training(
    cfg,
    *,
    dtype: str | None = None,
    checkpointing: bool | None = None,
    workers: int | None = None,
    seq_len: int | None = None,
    teacher: str = "inline",
    fsdp: bool | None = None,
) -> Plan:
    """Per-worker memory of `muscle train-adapter`/`train-compat` with this TrainConfig.

    teacher (compat): inline (each worker holds the v1 teacher, as the loop does), sharded (the
    teacher under FSDP like the student) or offloaded (teachers: cached, top-k read from Parquet).
    fsdp: shard over the workers (default: as `run.strategy` says, FSDP for auto with > 1 worker).
    dtype, checkpointing: None takes `run.precision` / `run.activation_checkpointing` (see
    `_settings_from_config`); dtype also sets the teachers' weights."""
    arch = Arch.from_dir(_local(cfg.base))
    n = workers or cfg.run.num_workers
    fsdp = n > 1 and (cfg.run.strategy in ("auto", "fsdp") if fsdp is None else fsdp)
    gpu = cfg.run.use_gpu
    c = cfg.compat
    r, targets = cfg.lora.r, cfg.lora.target_modules
    if c is not None and c.init == "from_new":
        r, targets = adapter_lora(_local(c.new_adapter), (r, targets))
    mb, seq = cfg.optim.micro_batch_size, seq_len or cfg.data.max_length
    tokens = mb * seq
    p = arch.params()
    lora = arch.lora_params(r, targets)
    inline = c is not None and c.mask != "ce" and c.teachers == "inline"
    v2 = 0
    if inline:
        v2 = arch.lora_params(*adapter_lora(_local(c.new_adapter), (cfg.lora.r, cfg.lora.target_modules)))
    # what the loop counts for "auto": the student with its LoRA and the inline v2 teacher adapter
    chosen = _settings_from_config(cfg, dtype, checkpointing, p["total"] + lora + v2)
    s_dtype, checkpointing = chosen["dtype"], chosen["checkpointing"]
    w_bytes = DTYPE_BYTES[s_dtype]
    t_dtype = dtype or ("bf16" if s_dtype == "bf16" else None)  # None: the device's default, as the loop
    shard = n if fsdp else 1
    kind = "train-compat" if c is not None else "train-adapter"
    plan = Plan(
        kind,
        str(cfg.base),
        asdict(arch),
        p,
        dict(
            workers=n,
            workers_from="--workers" if workers else "config run.num_workers",
            strategy="fsdp" if fsdp else cfg.run.strategy if n > 1 else "plain",
            device="gpu" if gpu else "cpu",
            micro_batch=mb,
            seq_len=seq,
            **chosen,
            lora_r=r,
            teacher=None if c is None else teacher if c.teachers == "inline" else "offloaded",
        ),
    )
    add = plan.parts.append
    add(Part("student base weights", -(-p["total"] * w_bytes // shard), f"{p['total']:,} x {w_bytes} B", fsdp))
    if fsdp:
        add(Part("FSDP gathered (root + 2 blocks)", _fsdp_gathered(arch, w_bytes, n), "unsharded while in use"))
    add(Part("LoRA + AdamW (fp32)", -(-lora * ADAM_BYTES // shard), f"{lora:,} trainable x {ADAM_BYTES} B", fsdp))
    act = arch.activation_elems(r, checkpointing) * tokens * w_bytes
    how = "checkpointed" if checkpointing else "no checkpointing"
    add(Part("activations / micro-batch", act, f"{mb} x {seq} tokens, {how}"))
    vocab_f32 = tokens * arch.vocab * 4
    if c is None or c.mask == "ce":
        loss = 3 * vocab_f32
        add(Part("logits + CE", loss, f"3 x {mb} x {seq} x {arch.vocab} x 4 B"))
    else:
        loss = 2 * vocab_f32 + LOSS_TEMPS * min(tokens, c.chunk_tokens) * arch.vocab * 4
        add(Part("logits + MUSCLE loss", loss, f"chunks of {c.chunk_tokens} tokens"))
        _teacher_parts(plan, cfg, arch, t_dtype, s_dtype, teacher, n, tokens)
    if not gpu:
        slack = int(HEAP_SLACK * (act + loss))
        add(Part("CPU heap slack (glibc)", slack, "0 with MALLOC_MMAP_THRESHOLD_=131072 in the workers' env"))
    add(Part("runtime", RUNTIME_BYTES["gpu" if gpu else "cpu"], "CUDA context" if gpu else "Python + torch + HF"))
    return plan


def _teacher_parts(
    plan: Plan, cfg, arch: Arch, dtype: str | None, s_dtype: str, teacher: str, n: int, tokens: int
) -> None:
    c = cfg.compat
    gpu = cfg.run.use_gpu or (c.teachers == "colocated" and c.teacher_gpus > 0)
    t_dtype = dtype or ("bf16" if gpu else "fp32")
    t_bytes = DTYPE_BYTES[t_dtype]
    if teacher == "offloaded" or c.teachers != "inline":
        where = "cached" if c.teachers == "inline" else c.teachers  # the what-if offload is the cache
        k = c.topk or (64 if where == "cached" else None)
        plan.parts.append(Part("teacher weights", 0, f"offloaded (teachers: {where})"))
        if k is None:  # colocated with full logits: both arrive whole through the object store
            plan.parts.append(
                Part("teacher logits / micro-batch", 2 * tokens * arch.vocab * 4, "2 x full logits, fp32")
            )
        else:
            plan.parts.append(Part("teacher logits / micro-batch", 2 * tokens * (12 * k + 8), f"2 x top-{k} per token"))
        return
    old = Arch.from_dir(_local(c.old.base))
    if old.vocab != arch.vocab:
        raise MuscleError(
            f"compat.old.base: vocab {old.vocab} != the student's {arch.vocab}; MUSCLE needs one tokenizer"
        )
    r1, t1 = adapter_lora(_local(c.old.adapter) if c.old.adapter else None, (cfg.lora.r, "all-linear"))
    r2, t2 = adapter_lora(_local(c.new_adapter), (cfg.lora.r, cfg.lora.target_modules))
    v1 = old.params()["total"] * t_bytes + (old.lora_params(r1, t1) * 4 if c.old.adapter else 0)
    v2 = arch.lora_params(r2, t2) * 4  # frozen in the student; PEFT keeps adapters in fp32
    if teacher == "sharded":
        plan.parts.append(Part("teacher weights (v1 + adapters)", -(-(v1 + v2) // n), f"{t_dtype}, FSDP", True))
        plan.parts.append(Part("teacher FSDP gathered", _fsdp_gathered(old, t_bytes, n), "root + 2 blocks"))
    else:
        plan.parts.append(Part("teacher weights (v1 + adapters)", v1 + v2, f"v1 base {t_dtype} + v1/v2 LoRA"))
    logits = tokens * arch.vocab * (t_bytes + DTYPE_BYTES[s_dtype])
    plan.parts.append(Part("teacher logits / micro-batch", logits, f"v1 + v2 full logits x {arch.vocab}"))


def plan_scoring(cfg, *, dtype: str | None = None, seq_len: int | None = None, workers: int | None = None) -> Plan:
    """Per-actor memory of `muscle score`: versions are scored one after another, so the largest
    version (base + adapter) and one forward pass of `batch_size` rows of `seq_len` tokens."""
    from muscle_ray.tasks import get_task

    gen = get_task(cfg.task, **cfg.task_options).kind == "gen"
    plans = [_score_version(cfg, v, dtype, seq_len or 512, gen, workers) for v in cfg.versions]
    return max(plans, key=lambda p: p.total)


def _score_version(cfg, version, dtype: str | None, seq: int, gen: bool, workers: int | None) -> Plan:
    gpu = bool(cfg.gpus_per_worker)  # None: placed when the job starts (CPU here unless given)
    t = dtype or ("bf16" if gpu else "fp32")
    w_bytes, batch = DTYPE_BYTES[t], cfg.batch_size
    arch = Arch.from_dir(_local(version.base))
    p = arch.params()
    device = "gpu" if gpu else "cpu"
    settings = dict(workers=workers or (cfg.workers or (1, 1))[1], dtype=t, device=device, batch=batch, seq_len=seq)
    plan = Plan("score", f"{version.name} ({version.base})", asdict(arch), p, settings)
    add = plan.parts.append
    add(Part("base weights", p["total"] * w_bytes, f"{p['total']:,} x {w_bytes} B"))
    r, targets = adapter_lora(_local(version.adapter) if version.adapter else None, (0, "all-linear"))
    add(Part("adapter", arch.lora_params(r, targets) * w_bytes, f"LoRA r={r}" if r else "none"))
    tokens = batch * seq
    add(Part("activations / batch", arch.activation_elems(0, False) // arch.layers * tokens * w_bytes, "one block"))
    add(Part("logits / batch", 2 * tokens * arch.vocab * 4, "logits + log-softmax, fp32"))
    if gen:
        kv = 2 * arch.layers * arch.kv_heads * arch.head_dim * tokens * w_bytes
        add(Part("KV cache", kv, f"generation, {batch} x {seq} tokens"))
    add(Part("runtime", RUNTIME_BYTES[device], "CUDA context" if gpu else "Python + torch + HF"))
    return plan


def _local(path: str) -> str:
    """A config's model or adapter path as the job will open it (relative: under MUSCLE_WORKSPACE)."""
    return in_workspace(path, os.environ.get("MUSCLE_WORKSPACE"))


def placement(cfg, device_memory: int, *, dtype=None, checkpointing=None, seq_len=None, max_workers=64) -> dict:
    """The smallest placement whose per-worker total fits `device_memory`: fewest workers first,
    then activation checkpointing as asked (None: as the config says) before with it, then the
    teacher inline, sharded, offloaded."""
    if not hasattr(cfg, "optim"):
        plan = plan_scoring(cfg, dtype=dtype, seq_len=seq_len)
        per_device = device_memory // plan.total
        return {"fits": per_device >= 1, "workers_per_device": per_device, "per_worker": plan.total}
    teachers = ("inline", "sharded", "offloaded") if cfg.compat is not None and cfg.compat.mask != "ce" else ("inline",)
    if checkpointing is None:
        checkpointing = plan_training(cfg, dtype=dtype, seq_len=seq_len).settings["checkpointing"]
    for n in range(1, max_workers + 1):
        for ckpt in dict.fromkeys((checkpointing, True)):
            for teacher in teachers:
                plan = plan_training(
                    cfg, dtype=dtype, checkpointing=ckpt, workers=n, seq_len=seq_len, teacher=teacher, fsdp=True
                )
                if plan.total <= device_memory:
                    return {
                        "fits": True,
                        "workers": n,
                        "checkpointing": ckpt,
                        "teacher": teacher,
                        "per_worker": plan.total,
                    }
    return {"fits": False, "workers": None, "max_workers": max_workers}
