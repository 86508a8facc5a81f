"""Peak memory per training worker with and without bf16 and activation checkpointing.

For one model directory (default: a random Llama, hidden 256 x 4 layers; `--model PATH` for a real
one, e.g. the SmolLM2-135M directory `muscle score` converts), each mode runs a few task-adapter
steps (LoRA on all linear layers, cross-entropy, AdamW) through the training job's own pieces
(`loop.build_model`, `loop.batch_loss`), in fresh processes so each peak is that mode's alone:

  fp32        the default: fp32 base, no checkpointing
  fp32+ckpt   activation checkpointing per decoder block
  bf16        bf16 frozen base under bf16 autocast; LoRA, gradients and AdamW state fp32
  bf16+ckpt   both

With `--workers N` (> 1) every mode runs under FSDP2 on N processes (gloo on a CPU, NCCL on
GPUs): the student is built as a skeleton and each worker reads only its shards (`--load full`:
as before, each worker loads the whole model and then shards it, for comparison).

Per worker it reports: `load_peak_mib` (peak RSS up to the end of loading: imports + model; it
counts the safetensors pages mapped while reading), `anon_mib` (anonymous RSS after loading:
the process's own memory, not the file's), `step_peak_mib` (peak RSS over the steps, counted
from the RSS after loading, Linux's clear_refs), `param_mib` (bytes of the parameters the
worker holds), seconds per step, and on CUDA `cuda_peak_mib` (torch.cuda.max_memory_allocated
over the steps). The last line is a JSON summary; the table before it is the same numbers.

    python bench/bench_memory.py
    python bench/bench_memory.py --model DIR --batch 2 --seq 128   # DIR: SmolLM2-135M as converted
        # by muscle_ray.model_sources.resolve_model (MUSCLE_CACHE/gguf/HASH)
    python bench/bench_memory.py --workers 2 --modes fp32,bf16+ckpt
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "fp32": {"precision": "fp32", "activation_checkpointing": False},
    "fp32+ckpt": {"precision": "fp32", "activation_checkpointing": True},
    "bf16": {"precision": "bf16", "activation_checkpointing": False},
    "bf16+ckpt": {"precision": "bf16", "activation_checkpointing": True},
}
MiB = 2**20


def rss_status(field: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS
        f.write("5")


def default_model(root: Path) -> str:
    from muscle_ray.zoo.llama import LlamaSpec, random_model_dir

    spec = LlamaSpec(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=688
    )
    return str(random_model_dir(root / "model", spec=spec, seed=0))


def worker(rank: int, args: argparse.Namespace, mode: str, port: int, out: str) -> None:
    import torch

    from muscle_ray.config import validated
    from muscle_ray.training.config import AdapterTrainConfig
    from muscle_ray.training.loop import batch_loss, build_model, compute_dtype, fsdp_shard
    from muscle_ray.training.lora import build_student, local_bytes

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.workers > 1:
        import torch.distributed as dist

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.workers)
    raw = {
        "base": args.model,
        "out": "unused",
        "data": {"path": "unused"},
        "lora": {"r": args.r, "alpha": 2 * args.r},
        "run": {**MODES[mode], "strategy": "fsdp" if args.workers > 1 else "plain", "num_workers": args.workers},
    }
    cfg = validated(AdapterTrainConfig, raw)
    torch.manual_seed(0)
    if args.load == "full" and args.workers > 1:  # the previous way: whole model, then shard
        student = build_student(args.model, cfg.lora, None, dtype=compute_dtype(cfg)).to(device)
        model = fsdp_shard(student).train()
    else:
        student, _, model = build_model(cfg, device, args.workers)
    load_peak, anon = rss_status("VmHWM"), rss_status("RssAnon")
    vocab = student.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1),
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss, _ = batch_loss(model, None, batch, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(round(float(loss.detach()), 5))
    result = {
        "mode": mode,
        "rank": rank,
        "load_peak_mib": round(load_peak / MiB, 1),
        "anon_mib": round(anon / MiB, 1),
        "step_peak_mib": round(rss_status("VmHWM") / MiB, 1),
        "param_mib": round(local_bytes(model) / MiB, 2),
        "s_per_step": round(sorted(times)[len(times) // 2], 3),
        "losses": losses,
    }
    if cuda:
        result["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated(device) / MiB, 1)
    Path(out, f"{mode}.{rank}.json").write_text(json.dumps(result))
    if args.workers > 1:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(args, mode: str, out: str) -> list[dict]:
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(args, mode, free_port(), out), nprocs=args.workers, start_method="spawn")
    return [json.loads(Path(out, f"{mode}.{r}.json").read_text()) for r in range(args.workers)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory (default: a random Llama, hidden 256 x 4 layers)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--workers", type=int, default=1, help="> 1: FSDP2 over this many processes")
    p.add_argument("--load", choices=("sharded", "full"), default="sharded", help="FSDP2: read shards, or all")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"unknown modes {unknown}")
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = default_model(Path(tmp))
        results = {m: run_mode(args, m, tmp) for m in modes}
    keys = ("load_peak_mib", "anon_mib", "step_peak_mib", "param_mib", "s_per_step") + (
        ("cuda_peak_mib",) if args.device == "cuda" else ()
    )
    print(
        f"{args.model}: {args.workers} worker(s) on {args.device}, batch {args.batch} x {args.seq}, {args.steps} steps"
    )
    print(f"{'mode':<10} {'rank':>4} " + " ".join(f"{k:>14}" for k in keys))
    for m, ranks in results.items():
        for r in ranks:
            print(f"{m:<10} {r['rank']:>4} " + " ".join(f"{r[k]:>14}" for k in keys))
    summary = {
        "setup": f"{Path(args.model).name}, workers {args.workers} ({args.load} load), {args.device}, "
        f"batch {args.batch} x {args.seq}",
        **{f"{m}_{k}": max(r[k] for r in ranks) for m, ranks in results.items() for k in keys},
        "losses": {m: ranks[0]["losses"] for m, ranks in results.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
