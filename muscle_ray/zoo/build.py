"""Build the zoo once: shared tokenizer, base v1, base v2 ("updated"), the three demo tasks.

Everything lands as ordinary files (HF model directories, JSONL) that the rest of the system
loads through its normal paths. The build is cached under a key of its config: an unchanged
config reuses the directory, a changed one rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from muscle_ray.zoo import world
from muscle_ray.zoo.llama import LlamaSpec, init_model, save_model_dir
from muscle_ray.zoo.pretrain import pack, pretrain
from muscle_ray.zoo.tokenizer import build_tokenizer

ZOO_VERSION = 1  # bump when world.py or pretrain.py change what a config produces


class BaseConfig(BaseModel):
    """One base version: architecture, data and schedule. v2 differs as real updates do."""

    model_config = ConfigDict(extra="forbid")
    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    steps: int = Field(1500, gt=0)
    corpus_docs: int = Field(20000, gt=0)
    seed: int = 0
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, gt=0)
    seq_len: int = Field(64, gt=8)
    schedule: Literal["cosine", "constant"] = "cosine"

    def spec(self) -> LlamaSpec:
        return LlamaSpec(
            self.hidden_size,
            self.num_hidden_layers,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.intermediate_size,
            max_position_embeddings=256,
        )


class TaskSizes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: int = Field(20000, gt=0)
    val: int = Field(400, gt=0)
    test: int = Field(1000, gt=0)


class ZooConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(400, ge=300)
    # Calibration (README "What the demo shows"): quantities up to 99 and 20000 training pairs,
    # so adapters cannot memorise the sums (train accuracy = test accuracy) and what a task
    # model gets wrong comes from its base. Whether a base "gets" the arithmetic after 1500
    # steps depends on its seed, and on the machine's float kernels: the same seed can land on
    # either side of the jump on another CPU. Measured on the 2-core CI machine with the demo's
    # adapter recipe (sum_em / sum_mc / story_rouge): seed 1 71.9/61.2/75.6, seed 3 70.4/65.9/50.5,
    # seed 5 76.0/70.4/48.5, seed 6 15.1/67.2/52.6 (it missed the jump here). v1 = seed 3 and
    # v2 = seed 5: both imperfect and v2 a few points better on the sums (worse by 2 ROUGE-1
    # points on the summaries), the close update the paper sees the most flips in.
    v1: BaseConfig = BaseConfig(seed=3, steps=1500, corpus_docs=20000)
    v2: BaseConfig = BaseConfig(seed=5, steps=1500, corpus_docs=20000)
    tasks: list[str] = list(world.TASKS)
    sizes: TaskSizes = TaskSizes()
    data_seed: int = 1234
    max_number: int = Field(99, ge=3, le=99)  # largest quantity in the world: task difficulty
    qa_share: float = Field(0.15, ge=0, le=1)  # share of task-like sentences in pretraining

    def key(self) -> str:
        blob = json.dumps({"zoo_version": ZOO_VERSION, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build_task_data(cfg: ZooConfig, out: Path) -> None:
    """train/val/test JSONL per task; test/val in the task's eval schema, train as prompt/completion.

    Splits are drawn from one stream and de-duplicated by prompt, so no test item is trained on.
    """
    for t_i, name in enumerate(cfg.tasks):
        make = world.TASKS[name]
        rng = random.Random(cfg.data_seed * 100 + t_i)
        seen: set[str] = set()
        rows: list[dict] = []
        need = cfg.sizes.train + cfg.sizes.val + cfg.sizes.test
        while len(rows) < need:
            rec = make(rng, cfg.max_number)
            prompt = rec.get("prompt") or rec["context"]
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append(rec)
        test, val, train = (
            rows[: cfg.sizes.test],
            rows[cfg.sizes.test : cfg.sizes.test + cfg.sizes.val],
            rows[cfg.sizes.test + cfg.sizes.val :],
        )
        for split, part in (("test", test), ("val", val)):
            _write_jsonl(
                out / name / f"{split}.jsonl",
                [
                    {"id": f"{split}-{i}", **{k: v for k, v in r.items() if k != "completion"}}
                    for i, r in enumerate(part)
                ],
            )
        for split, part in (("train", train), ("val", val)):
            _write_jsonl(
                out / name / f"{split}_pairs.jsonl",
                [{"prompt": r.get("prompt") or r["context"], "completion": r["completion"]} for r in part],
            )


def pretrain_base(
    name: str, base: BaseConfig, cfg: ZooConfig, tokenizer_dir: str | Path, out: str | Path, log=print, progress=None
) -> float:
    """Pretrain one base from scratch and save it as an HF directory; returns seconds taken.

    `progress(step, steps)` is called after every step (the demo's progress bar)."""
    from transformers import AutoTokenizer

    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    log(f"zoo: pretraining base {name} ({base.num_hidden_layers}x{base.hidden_size}, {base.steps} steps)")
    stream = pack(
        tokenizer, world.corpus(base.corpus_docs, seed=base.seed, qa_share=cfg.qa_share, max_n=cfg.max_number)
    )
    model = init_model(base.spec(), tokenizer, seed=base.seed)
    pretrain(
        model,
        stream,
        base.steps,
        base.seed,
        base.batch_size,
        base.seq_len,
        base.lr,
        log=lambda m: log(f"zoo[{name}]{m}"),
        schedule=base.schedule,
        progress=progress,
    )
    save_model_dir(model, tokenizer, out)
    return round(time.perf_counter() - t, 1)


def is_built(out: str | Path, cfg: ZooConfig) -> bool:
    """Whether `out` holds the zoo of this config (its key is in zoo.json)."""
    stamp = Path(out) / "zoo.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("key") == cfg.key()


def build_zoo(out: str | Path, cfg: ZooConfig = ZooConfig(), log=print, map_fn=None) -> Path:
    """Build (or reuse) the zoo under `out`: tokenizer/, v1/, v2/, data/<task>/, zoo.json.

    `map_fn(fn, list_of_kwargs) -> results` runs the two pretraining jobs; the default runs
    them one after the other, the demo passes one that runs them as parallel Ray tasks.
    """
    out = Path(out)
    stamp = out / "zoo.json"
    if is_built(out, cfg):
        log(f"zoo: reusing {out} (key {cfg.key()})")
        return out
    t0 = time.perf_counter()
    build_tokenizer(world.tokenizer_text(), cfg.vocab_size, individual_digits=True).save_pretrained(out / "tokenizer")
    jobs = [
        dict(name=n, base=b, cfg=cfg, tokenizer_dir=str(out / "tokenizer"), out=str(out / n), log=log)
        for n, b in (("v1", cfg.v1), ("v2", cfg.v2))
    ]
    map_fn = map_fn or (lambda fn, kwargs: [fn(**kw) for kw in kwargs])
    seconds = map_fn(pretrain_base, jobs)
    build_task_data(cfg, out / "data")
    stamp.write_text(
        json.dumps(
            {
                "key": cfg.key(),
                "config": cfg.model_dump(),
                "seconds": dict(zip(("v1", "v2"), seconds)),
                "total_seconds": round(time.perf_counter() - t0, 1),
            },
            indent=2,
        )
    )
    log(f"zoo: built in {time.perf_counter() - t0:.0f}s at {out}")
    return out
