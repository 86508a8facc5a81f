"""Benchmark the HF scorer against lm-evaluation-harness's HFLM on the HellaSwag sample.

Same model (random weights, hidden 256 / 4 layers: a realistic shape, tiny size), same
requests, same process: times `HFScorer.loglikelihoods` (each question's
context encoded once, options packed in one sequence) and `HFLM.loglikelihood` (one request
per option), checks that every per-instance prediction is identical and the log-likelihoods
agree, and prints one JSON line with the wall times and the ratio to lm-eval's FASTEST batch size
(on CPU, lm-eval's batch 1 often beats its batch 8: padded full-vocabulary log-softmax).
Target: ratio >= 1.5.

    .venv/bin/python bench/bench_score.py [--items 200] [--batch-size 8] [--lm-eval-batch-sizes 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hellaswag" / "val_sample1000.jsonl"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lm-eval-batch-sizes", default="1,8")
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args(argv)

    from lm_eval.api.instance import Instance as LmInstance
    from lm_eval.models.huggingface import HFLM

    from muscle_ray.models import ModelVersion
    from muscle_ray.scoring.hf import HFScorer
    from muscle_ray.tasks import get_task
    from muscle_ray.zoo.llama import LlamaSpec, random_model_dir
    from muscle_ray.zoo.tokenizer import SAMPLE_TEXT, build_tokenizer

    if not Path(args.data).is_file():
        print(json.dumps({"skipped": f"{args.data} not present"}))
        return 0
    task = get_task("hellaswag")
    insts = [task.parse(rec) for rec in islice(task.records(args.data), args.items)]
    texts = SAMPLE_TEXT + [c + e for i in insts for c, e in zip(i.contexts * 4, i.continuations)]
    spec = LlamaSpec(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=688,
        max_position_embeddings=1024,
    )
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model_dir(Path(tmp) / "m", spec, seed=0, tokenizer=build_tokenizer(texts, vocab_size=4096))
        ours = HFScorer(ModelVersion(str(model)), batch_size=args.batch_size, device="cpu")
        reqs = [
            LmInstance(request_type="loglikelihood", doc={}, arguments=(i.context_for(k), c), idx=k)
            for i in insts
            for k, c in enumerate(i.continuations)
        ]
        ours.loglikelihoods(insts[:4])  # warm up
        t0 = time.perf_counter()
        outs = ours.loglikelihoods(insts)
        t_ours = time.perf_counter() - t0
        mine = [o.logliks for o in outs]
        t_lm = {}
        for bs in [int(b) for b in args.lm_eval_batch_sizes.split(",")]:
            lm = HFLM(pretrained=str(model), batch_size=bs, device="cpu")
            lm.loglikelihood(reqs[:16], disable_tqdm=True)  # warm up the same way
            t0 = time.perf_counter()
            flat = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
            t_lm[bs] = time.perf_counter() - t0
        from muscle_ray.scoring.encode import encode_pair

        lm_tokens = sum(len(sum(encode_pair(ours.tokenizer, *r.args), [])) - 1 for r in reqs)

    ref = [flat[4 * k : 4 * k + 4] for k in range(len(insts))]
    same_pred = [int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(mine, ref)]
    same_norm = [
        int(np.argmax(np.array(a) / i.choice_chars)) == int(np.argmax(np.array(b) / i.choice_chars))
        for a, b, i in zip(mine, ref, insts)
    ]
    diff = float(np.max(np.abs(np.array(mine) - np.array(ref))))
    result = {
        "items": len(insts),
        "requests": len(reqs),
        "batch_size": args.batch_size,
        "muscle_s": round(t_ours, 3),
        "lm_eval_s_by_batch_size": {b: round(t, 3) for b, t in t_lm.items()},
        "speedup_vs_lm_eval_best": round(min(t_lm.values()) / t_ours, 2),
        "tokens_muscle": sum(o.n_tokens for o in outs),
        "tokens_lm_eval": lm_tokens,
        "identical_predictions": all(same_pred) and all(same_norm),
        "max_abs_loglik_diff": diff,
        "target_speedup": 1.5,
    }
    print(json.dumps(result))
    assert all(same_pred) and all(same_norm), "per-instance predictions differ from lm-eval's"
    assert diff < 1e-3, f"log-likelihoods differ from lm-eval's by {diff}"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
