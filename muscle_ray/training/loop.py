"""The per-worker training loop Ray Train runs on every worker (task or compat adapter).

One loop for both jobs: the compat job only adds teachers and swaps the loss. Per worker:
build the student -> (teachers) -> shard (FSDP2 per decoder block, or DDP) -> resume from
`ray.train.get_checkpoint()` -> epochs over this worker's Ray Data shard with gradient
accumulation -> validation + checkpoint at each epoch end (and every `eval_every_steps`),
and adapter snapshots every `snapshot_every_steps` (see `muscle_ray.training.snapshots`).

Memory (`run.precision`, `run.activation_checkpointing`): with bf16 the frozen bases are bf16 and
the forward runs under bf16 autocast, while LoRA weights, their gradients, AdamW's state and the
losses stay fp32 (FSDP2 all-gathers in bf16 and reduces gradients in fp32). Under FSDP2 the
student and the inline v1 teacher are built as skeletons and each worker reads only its shards
(`lora.load_sharded`). Activation checkpointing recomputes each decoder block in backward.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from muscle_ray.models import ModelVersion
from muscle_ray.training import snapshots
from muscle_ray.training.config import TrainConfig
from muscle_ray.training.data import IGNORE, trim_batch
from muscle_ray.training.lora import (
    build_student,
    decoder_blocks,
    enable_checkpointing,
    hf_model,
    load_sharded,
    save_adapter,
    use_checkpointing,
)
from muscle_ray.training.losses import ce_loss, compat_loss

TRAIN_STATE = "train_state.pt"


def strategy_for(cfg: TrainConfig, world: int) -> str:
    if cfg.run.strategy == "auto":
        return "plain" if world == 1 else "fsdp"
    return cfg.run.strategy


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The frozen bases' dtype (and autocast's) for `run.precision`."""
    return torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32


def autocast(cfg: TrainConfig, device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward passes when `run.precision` is bf16 (CPU and CUDA)."""
    if cfg.run.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def fsdp_shard(model):
    """FSDP2: `fully_shard` each decoder block, then the root (works on gloo and NCCL). A bf16
    base all-gathers its parameters (fp32 LoRA included) in bf16 and reduces gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if hf_model(model).dtype == torch.bfloat16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def shard_model(student, strategy: str, device):
    """Wrap a loaded student: FSDP2 (`fsdp_shard`), DDP, or nothing."""
    if strategy == "fsdp":
        return fsdp_shard(student)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    return student


def make_scheduler(opt, cfg: TrainConfig, total_steps: int):
    warm, kind = cfg.optim.warmup_steps, cfg.optim.schedule

    def factor(step):
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        done = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - done if kind == "linear" else 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def make_teachers(cfg: TrainConfig, student, device, sharded: bool = False):
    """The compat job's teachers (None for task adapters and the CE control). `sharded`: the
    inline v1 teacher is built and FSDP2-sharded like the student (the v2 teacher is the student)."""
    c = cfg.compat
    if c is None or c.mask == "ce":
        return None
    from muscle_ray.training import teachers as T

    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else None  # None: the device's default
    old = ModelVersion(c.old.base, c.old.adapter, name="old")
    if c.teachers == "inline":
        return T.InlineTeachers(student, old, c.new_adapter, device, dtype=dtype, shard=fsdp_shard if sharded else None)
    if c.teachers == "colocated":
        new = ModelVersion(cfg.base, c.new_adapter, name="new")
        return T.ColocatedTeachers(
            old,
            new,
            c.topk,
            c.temperature,
            num_cpus=c.teacher_cpus,
            num_gpus=c.teacher_gpus,
            device=device,
            dtype=dtype,
        )
    return T.CachedTeachers()


def build_model(cfg: TrainConfig, device, world: int):
    """(student, teachers, model): the PEFT student, its teachers, and the student as trained
    (FSDP2-sharded, DDP-wrapped, or itself). Under FSDP2 the student is a skeleton until
    `load_sharded` fills this worker's shards; otherwise it is loaded whole, as before."""
    strategy = strategy_for(cfg, world)
    sharded = strategy == "fsdp"
    c = cfg.compat
    init = c.new_adapter if c is not None and c.init == "from_new" else None
    student = build_student(cfg.base, cfg.lora, init, dtype=compute_dtype(cfg), weights=not sharded)
    if not sharded:
        student = student.to(device)
    teachers = make_teachers(cfg, student, device, sharded)  # before sharding: inline adds an adapter
    if use_checkpointing(cfg.run.activation_checkpointing, student):
        enable_checkpointing(student)
    if sharded:
        model = load_sharded(student, cfg.base, device, fsdp_shard)
    else:
        model = shard_model(student, strategy, device)
    return student, teachers, model.train()


def batch_loss(model, teachers, batch, cfg: TrainConfig):
    """(loss, stats) of one micro-batch: forwards under `run.precision`'s autocast, losses in fp32
    (they upcast the logits, a chunk at a time for the compat loss)."""
    with autocast(cfg, batch["input_ids"].device):
        old_new = teachers(batch) if teachers is not None else None
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    c = cfg.compat
    if old_new is None or c is None:
        return ce_loss(logits, batch["labels"], ignore_index=IGNORE, return_stats=True)
    old, new = old_new
    return compat_loss(
        logits,
        old,
        new,
        batch["labels"],
        mask=c.mask,
        temperature=c.temperature,
        ce_weight=c.ce_weight,
        ignore_index=IGNORE,
        return_stats=True,
        t2_scaling=c.t2_scaling,
        chunk_tokens=c.chunk_tokens,
    )


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def evaluate(model, teachers, shard, cfg, device) -> float:
    """Token-weighted mean loss over this worker's validation shard, summed over workers."""
    import torch.distributed as dist

    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in shard.iter_torch_batches(batch_size=cfg.optim.micro_batch_size, drop_last=False):
            b = trim_batch(batch, device)
            loss, stats = batch_loss(model, teachers, b, cfg)
            total += torch.tensor([float(loss) * stats["tokens"], stats["tokens"]], dtype=torch.float64)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1.0))


def save_checkpoint(model, student, opt, sched, progress: dict, metrics: dict, rank: int):
    """Gather the full LoRA + optimizer state on rank 0, write it, report it to Ray Train."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    msd = get_model_state_dict(model, options=_state_options())
    osd = get_optimizer_state_dict(model, opt, options=_state_options())
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_adapter(student, msd, Path(tmp) / "adapter")
            torch.save(
                {"model": msd, "optimizer": osd, "scheduler": sched.state_dict(), **progress}, Path(tmp) / TRAIN_STATE
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class Snapshotter:
    """Exports the adapter when a snapshot is due: marked `due` after an optimizer step, written
    before the weights move again (so after any evaluation at that step, whose val_loss it keeps).
    Every rank gathers (a collective under FSDP); rank 0 writes."""

    def __init__(self, location: str | None, every: int | None, model, student, rank: int, start_step: int):
        self.location, self.every = location, every
        self.model, self.student, self.rank = model, student, rank
        self.pending: int | None = None
        self.written = start_step  # a resumed run has the snapshot of the step it starts from
        if location and rank == 0:
            snapshots.keep_until(location, start_step)

    def due(self, step: int, last: bool) -> None:
        if self.location and self.every and step != self.written and (step % self.every == 0 or last):
            self.pending = step

    def write(self, val_loss: float | None = None) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if self.pending is None or self.location is None:
            return
        msd = get_model_state_dict(self.model, options=_state_options())
        if self.rank == 0:
            snapshots.record(self.location, self.pending, val_loss, lambda d: save_adapter(self.student, msd, d))
            print(f"[muscle-train] snapshot step={self.pending} -> {self.location}", flush=True)
        self.written, self.pending = self.pending, None


def restore(model, opt, sched) -> dict:
    """Load adapter + optimizer + scheduler from Ray Train's latest checkpoint, if any."""
    import ray.train
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return {"step": 0, "epoch": 0, "micro_in_epoch": 0}
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=False)
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    sched.load_state_dict(state["scheduler"])
    print(f"[muscle-train] resumed at step {state['step']} (epoch {state['epoch']})", flush=True)
    return {k: state[k] for k in ("step", "epoch", "micro_in_epoch")}


def train_loop_per_worker(config: dict):
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    torch.manual_seed(cfg.run.seed)
    torch.set_num_threads(max(1, int(config.get("threads", 1))))

    student, teachers, model = build_model(cfg, device, world)

    o = cfg.optim
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=o.lr, weight_decay=o.weight_decay)
    rows_per_worker = config["n_train"] // world
    steps_per_epoch = max(1, rows_per_worker // o.micro_batch_size // o.grad_accum)
    total_steps = o.max_steps or steps_per_epoch * o.epochs
    sched = make_scheduler(opt, cfg, total_steps)
    progress = restore(model, opt, sched)
    step, skip = progress["step"], progress["micro_in_epoch"]
    report_step = config.get("progress") if rank == 0 else None  # the driver's progress bar
    if report_step:
        report_step(step, total_steps)

    snapshot = Snapshotter(config.get("snapshots"), cfg.run.snapshot_every_steps, model, student, rank, step)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    window = {"t0": time.perf_counter(), "tokens": 0}
    last: dict[str, float] = {}

    def checkpoint(epoch, micro_in_epoch):
        val = evaluate(model, teachers, val_shard, cfg, device)
        snapshot.write(val)  # before the checkpoint: a run resumed from it has this snapshot
        metrics = {"val_loss": val, "step": step, "epoch": epoch, **{f"train_{k}": v for k, v in last.items()}}
        if rank == 0:
            print(f"[muscle-train] eval step={step} epoch={epoch} val_loss={val:.5f}", flush=True)
        save_checkpoint(
            model, student, opt, sched, {"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch}, metrics, rank
        )

    for epoch in range(progress["epoch"], o.epochs):
        if step >= total_steps:
            break
        acc_stats: dict[str, float] = {}
        n_micro = 0
        for i, batch in enumerate(train_shard.iter_torch_batches(batch_size=o.micro_batch_size, drop_last=True)):
            if i < skip:
                continue
            b = trim_batch(batch, device)
            sync = (i + 1) % o.grad_accum == 0
            if cfg.run.num_workers > 1 and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(sync)  # FSDP2: reduce only on the last micro-step
            # DDP: skip the gradient all-reduce on all but the last micro-step.
            no_sync = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
            with no_sync:
                loss, stats = batch_loss(model, teachers, b, cfg)
                (loss / o.grad_accum).backward()
            window["tokens"] += stats["tokens"]
            for k, v in {"loss": float(loss), **stats}.items():
                acc_stats[k] = acc_stats.get(k, 0.0) + float(v)
            n_micro += 1
            if not sync:
                continue
            snapshot.write()  # one due at the previous step, with no evaluation there
            if o.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            snapshot.due(step, last=step == total_steps)
            if report_step:
                report_step(step, total_steps)
            elapsed = time.perf_counter() - window["t0"]
            last = {k: v / n_micro for k, v in acc_stats.items() if k != "tokens"}
            last["tokens_per_s"] = window["tokens"] * world / max(elapsed, 1e-9)
            if rank == 0 and (step % cfg.run.log_every_steps == 0 or step == total_steps):
                print(
                    "[muscle-train] "
                    + json.dumps(
                        {
                            "step": step,
                            "epoch": epoch,
                            "lr": sched.get_last_lr()[0],
                            **{k: round(v, 6) for k, v in last.items()},
                        }
                    ),
                    flush=True,
                )
            window.update(t0=time.perf_counter(), tokens=0)
            acc_stats, n_micro = {}, 0
            if cfg.run.eval_every_steps and step % cfg.run.eval_every_steps == 0 and step < total_steps:
                checkpoint(epoch, i + 1)
            if step >= total_steps:
                break
        skip = 0
        snapshot.due(step, last=step >= total_steps or epoch + 1 == o.epochs)
        checkpoint(epoch + 1, 0)
    if teachers is not None and hasattr(teachers, "close"):
        teachers.close()
