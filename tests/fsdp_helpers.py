"""Shared by the FSDP2 memory tests (tiny Llama and real SmolLM2): compat configs, random batches,
the loop's step on them, and two gloo workers (torch.multiprocessing, fork) running it sharded."""

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import torch

from muscle_ray.config import validated
from muscle_ray.training.config import CompatTrainConfig


def compat_raw(v1: Path, a1: Path, v2: Path, a2: Path, lr: float = 2e-2, batch: int = 4, **run) -> dict:
    """A compat config: student = copy of the v2 adapter `a2`, v1 teacher = `v1` + `a1` (inline)."""
    return {
        "base": str(v2),
        "out": "unused",
        "data": {"path": "unused"},
        "lora": {"r": 4, "alpha": 8},
        "optim": {"lr": lr, "micro_batch_size": batch},
        "run": run,
        "compat": {"old": {"base": str(v1), "adapter": str(a1)}, "new_adapter": str(a2), "mask": "muscle"},
    }


def random_batches(vocab: int, n: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
    """`n` batches of random full-length sequences, labels shifted (last position ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (batch, seq), generator=g)
        labels = torch.cat([ids[:, 1:], torch.full((batch, 1), -100)], 1)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def halves(batch: dict) -> list[dict]:
    half = len(batch["input_ids"]) // 2
    return [{k: v[i : i + half] for k, v in batch.items()} for i in (0, half)]


def train(cfg, batches, world: int = 1, rank: int = 0) -> dict:
    """The loop's step on `batches` (clip, AdamW): each step's loss and the bytes each model holds.

    A step is the mean over the two halves of a batch: the two workers' micro-batches under FSDP2
    (gradients averaged by the reduce-scatter), two accumulated micro-batches on one process.
    `base_params` counts the student's non-LoRA parameters whole (a shard counts its full shape)."""
    import torch.distributed as dist

    from muscle_ray.training.loop import batch_loss, build_model
    from muscle_ray.training.lora import local_bytes

    torch.manual_seed(cfg.run.seed)
    student, teachers, model = build_model(cfg, torch.device("cpu"), world)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)
    losses = []
    for batch in batches:
        parts = halves(batch)
        mine = parts[rank : rank + 1] if world > 1 else parts
        total = torch.zeros(())
        for b in mine:
            loss, _ = batch_loss(model, teachers, b, cfg)
            (loss / len(mine)).backward()
            total += loss.detach() / 2
        if world > 1:
            dist.all_reduce(total)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total))
    return {
        "losses": losses,
        "student_bytes": local_bytes(model),
        "teacher_bytes": local_bytes(teachers.old),
        "base_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n),
        "lora_dtypes": sorted({str(p.dtype) for p in params}),
        "opt_dtypes": sorted({str(v.dtype) for s in opt.state.values() for v in s.values() if v.dim()}),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def process_group(rank: int = 0, world: int = 1, port: int | None = None):
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port or free_port())
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, world: int, port: int, raws: dict, batches: list, out: str) -> None:
    """One FSDP2 worker: each config's `train` on this worker's half-batches."""
    torch.set_num_threads(1)
    results = {}
    with process_group(rank, world, port):
        for name, raw in raws.items():
            results[name] = train(validated(CompatTrainConfig, raw), batches, world, rank)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def two_fsdp_workers(raws: dict, batches: list, out: Path) -> list[dict]:
    """Each config of `raws` (strategy fsdp, 2 workers) trained by two gloo workers: per rank,
    {name: `train`'s result}. Fork: the workers inherit the imported modules (a spawned worker
    re-imports torch and transformers, slow on a loaded machine); the parent needs no process group."""
    import torch.multiprocessing as mp

    mp.start_processes(
        _fsdp_worker, args=(2, free_port(), raws, batches, str(out)), nprocs=2, join=True, start_method="fork"
    )
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def single_process(raws: dict, batches: list) -> dict:
    """Each config of `raws` trained on one process without sharding (strategy plain)."""
    return {
        name: train(validated(CompatTrainConfig, {**raw, "run": {**raw["run"], "strategy": "plain"}}), batches)
        for name, raw in raws.items()
    }


def check_sharded_run(ranks: list[dict], single: dict, bf16_rtol: float) -> None:
    """The two workers of `two_fsdp_workers` against `single_process` on configs "fp32" and "bf16":
    each holds ~1/2 of the student's and of the v1 teacher's bytes, both follow one all-reduced
    trajectory, the single process's (fp32 to 1e-5; bf16 to 1e-3: the same bf16 arithmetic), and
    bf16's stays within `bf16_rtol` of fp32's, which trains."""
    import pytest

    for name in ("fp32", "bf16"):
        full_s, full_t = single[name]["student_bytes"], single[name]["teacher_bytes"]
        for r in ranks:
            assert r[name]["student_bytes"] == pytest.approx(full_s / 2, rel=0.02), name
            assert r[name]["teacher_bytes"] == pytest.approx(full_t / 2, rel=0.02), name
            assert r[name]["losses"] == ranks[0][name]["losses"]  # all-reduced: one trajectory
    sharded = {name: ranks[0][name]["losses"] for name in ("fp32", "bf16")}
    assert sharded["fp32"] == pytest.approx(single["fp32"]["losses"], rel=1e-5)
    assert sharded["bf16"] == pytest.approx(single["bf16"]["losses"], rel=1e-3)
    assert sharded["bf16"] == pytest.approx(single["fp32"]["losses"], rel=bf16_rtol)
    assert single["fp32"]["losses"][-1] < single["fp32"]["losses"][0]
