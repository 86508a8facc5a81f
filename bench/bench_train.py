"""Cost of a compatibility step vs a task-adapter step, same model, batch and sequence length.

Three modes, each in its own subprocess (so peak RSS is per mode), running the training job's
own pieces (`build_student`, the teachers, `batch_loss`, AdamW) for a few optimizer steps:
  task     cross-entropy on the student only                     (the reference step)
  inline   MUSCLE loss, both teachers run in the step            (target <= 2.2x task)
  cached   MUSCLE loss, teachers' top-k read from the batch      (target <= 1.2x task)
The model is a random Llama (hidden 256, 4 layers) so the transformer compute dominates.
Prints one JSON line: seconds per step and peak RSS per mode, and the ratios to `task`.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, SEQ, STEPS, WARMUP, TOPK = 8, 128, 6, 2, 64


def build_models(root: Path) -> dict:
    from muscle_ray.zoo.llama import LlamaSpec, random_lora_dir, random_model_dir
    from muscle_ray.zoo.tokenizer import SAMPLE_TEXT, build_tokenizer

    spec = LlamaSpec(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=688
    )
    tok = build_tokenizer(SAMPLE_TEXT, vocab_size=384)
    v1 = random_model_dir(root / "v1", spec=spec, seed=0, tokenizer=tok)
    v2 = random_model_dir(root / "v2", spec=spec, seed=1, tokenizer=tok)
    return {
        "v1": str(v1),
        "v2": str(v2),
        "a1": str(random_lora_dir(v1, root / "a1", seed=0, r=8)),
        "a2": str(random_lora_dir(v2, root / "a2", seed=1, r=8)),
    }


def run_mode(mode: str, paths: dict) -> dict:
    import torch

    from muscle_ray.config import validated
    from muscle_ray.models import ModelVersion
    from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig
    from muscle_ray.training.loop import batch_loss
    from muscle_ray.training.lora import build_student
    from muscle_ray.training.teachers import CachedTeachers, InlineTeachers, TeacherPair

    torch.set_num_threads(1)
    torch.manual_seed(0)
    raw = {"base": paths["v2"], "out": "unused", "data": {"path": "unused"}}
    if mode != "task":
        raw["compat"] = {
            "old": {"base": paths["v1"], "adapter": paths["a1"]},
            "new_adapter": paths["a2"],
            "teachers": "inline" if mode == "inline" else "cached",
            "topk": TOPK,
        }
    cfg = validated(CompatTrainConfig if mode != "task" else AdapterTrainConfig, raw)
    student = build_student(paths["v2"], cfg.lora, paths["a2"] if mode != "task" else None).train()
    ids = torch.randint(0, 384, (BATCH, SEQ))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], 1),
    }
    teachers = None
    if mode == "inline":
        teachers = InlineTeachers(student, ModelVersion(paths["v1"], paths["a1"]), paths["a2"], device="cpu")
    elif mode == "cached":  # precomputed outside the step, as the Ray Data cache job does
        pair = TeacherPair(ModelVersion(paths["v1"], paths["a1"]), ModelVersion(paths["v2"], paths["a2"]), "cpu")
        batch.update(
            {
                k: torch.as_tensor(v)
                for k, v in pair.answer(
                    ids.numpy(), batch["attention_mask"].numpy(), batch["labels"].numpy(), TOPK, 2.0
                ).items()
            }
        )
        del pair
        teachers = CachedTeachers()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for i in range(WARMUP + STEPS):
        t0 = time.perf_counter()
        loss, _ = batch_loss(student, teachers, batch, cfg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= WARMUP:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "s_per_step": times[len(times) // 2],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    if len(sys.argv) == 3:  # child: one mode
        print(json.dumps(run_mode(sys.argv[1], json.loads(sys.argv[2]))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_models(Path(tmp))
        res = {}
        for mode in ("task", "inline", "cached"):
            out = subprocess.run(
                [sys.executable, __file__, mode, json.dumps(paths)], check=True, stdout=subprocess.PIPE, text=True
            ).stdout
            res[mode] = json.loads(out.strip().splitlines()[-1])
    t = res["task"]["s_per_step"]
    summary = {
        "setup": f"llama hidden 256 x 4 layers, batch {BATCH} x seq {SEQ}, topk {TOPK}, 1 thread, median of {STEPS}",
        **{f"{m}_s_per_step": round(r["s_per_step"], 4) for m, r in res.items()},
        **{f"{m}_peak_rss_mib": round(r["peak_rss_mib"], 1) for m, r in res.items()},
        "inline_over_task": round(res["inline"]["s_per_step"] / t, 3),
        "cached_over_task": round(res["cached"]["s_per_step"] / t, 3),
        "targets": {"inline_over_task": 2.2, "cached_over_task": 1.2},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
