"""Build the zoo once: shared tokenizer, base v1, base v2 ("updated"), the three demo tasks.

v1 and v2 differ as real updates do: in what their pretraining data covers (world.py), not
only in seed: v2 reads about more families than v1 but not all of v1's, and tells trips in
another style.

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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from muscle_ray.zoo import world
from muscle_ray.zoo.llama import LlamaSpec, init_model, save_model_dir
from muscle_ray.zoo.pretrain import pack, pretrain
from muscle_ray.zoo.tokenizer import build_tokenizer

ZOO_VERSION = 5  # bump when world.py or pretrain.py change what a config produces


class BaseConfig(BaseModel):
    """One base version: architecture, data and schedule. v2 differs as real updates do."""

    model_config = ConfigDict(extra="forbid")
    families: list[int] = list(range(len(world.FAMILIES)))  # whose people its corpus is about
    style: Literal["went", "flew", "headed"] = "went"  # how its corpus tells a trip
    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(256, gt=0)
    # Long enough to know every person of its corpus, with room to spare: a base that knows
    # part of its people (v1 at 1500 steps knew 54-65% of the exceptions to the family rules)
    # knows a part that moves with the CPU's float kernels, the knife edge. Probed: v2 (800
    # people) knew 74% of homes at 2000 steps on 25k documents, 100% at 2500 on 30k.
    steps: int = Field(2500, gt=0)
    corpus_docs: int = Field(30000, gt=0)
    seed: int = 0
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(32, gt=0)
    seq_len: int = Field(64, gt=8)
    schedule: Literal["cosine", "constant"] = "cosine"

    @field_validator("families")
    @classmethod
    def _families(cls, v: list[int]) -> list[int]:
        bad = [f for f in v if not 0 <= f < len(world.FAMILIES)]
        if bad or not v:
            raise ValueError(f"families: indices in 0..{len(world.FAMILIES) - 1}, at least one (got {v})")
        return sorted(set(v))

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
    """Training items per task, and the share of the world's people held out for val and test
    (one item per held-out person: a test answer is never a training label)."""

    model_config = ConfigDict(extra="forbid")
    train: int = Field(3000, gt=0)
    val_share: float = Field(0.15, gt=0, lt=0.5)
    test_share: float = Field(0.35, gt=0, lt=0.7)
    limit: int | None = Field(None, gt=0)  # at most this many val/test items (small test zoos)


class ZooConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(700, ge=300)
    # The same recipe on different data: v2 reads about families 2-11, v1 about 0-8, so each
    # knows people the other never read about and v2 knows more (v1 reads fewer documents, as
    # many per person).
    v1: BaseConfig = BaseConfig(seed=3, families=list(range(0, 9)), style="went", corpus_docs=27000)
    v2: BaseConfig = BaseConfig(seed=5, families=list(range(2, 12)), style="headed")
    tasks: list[str] = list(world.TASKS)
    sizes: TaskSizes = TaskSizes()
    world_seed: int = 7  # who lives where: shared by both bases and the tasks
    data_seed: int = 1234  # which people are held out, and the task items
    # Share of people whose home (pet) is their family's: what a family rule alone gets right.
    # At 0.3 a task model guessing from the rule is right on a third of the people its base
    # never read about: v1 ~84%, v2 ~90%, NFR ~10% if both bases know their people.
    p_home: float = Field(0.3, ge=0, le=1)
    p_pet: float = Field(0.3, ge=0, le=1)
    mentions: int = Field(5, ge=0, le=8)  # people named in each task context before the question
    # Whom the task texts name: "v1", people of v1's families (texts of v1's time, world.py), or "all".
    mentions_of: Literal["v1", "all"] = "v1"

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str]) -> list[str]:
        unknown = [t for t in v if t not in world.TASKS]
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a zoo task ({', '.join(world.TASKS)})")
        return v

    def world(self) -> dict:
        return world.people(self.world_seed, self.p_home, self.p_pet)

    def key(self) -> str:
        blob = json.dumps({"zoo_version": ZOO_VERSION, **self.model_dump()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def build_task_data(cfg: ZooConfig, out: Path) -> None:
    """Per task: test.jsonl and val.jsonl (one item per held-out person, in the task's eval
    schema) and train_pairs.jsonl / val_pairs.jsonl (prompt/completion) for the adapters."""
    people = cfg.world()
    split = world.split_people(people, cfg.data_seed, cfg.sizes.val_share, cfg.sizes.test_share)
    named = sorted(n for n, p in people.items() if cfg.mentions_of == "all" or p["family"] in cfg.v1.families)
    for t_i, name in enumerate(cfg.tasks):
        make = world.TASKS[name]
        rng = random.Random(cfg.data_seed * 100 + t_i)
        rows = {
            "train": [
                make(people, rng.choice(split["train"]), rng, cfg.mentions, split["train"], named)
                for _ in range(cfg.sizes.train)
            ],
            **{
                s: [make(people, n, rng, cfg.mentions, split[s], named) for n in split[s][: cfg.sizes.limit]]
                for s in ("val", "test")
            },
        }
        for s in ("val", "test"):
            _write_jsonl(
                out / name / f"{s}.jsonl",
                [
                    {"id": f"{s}-{i}", **{k: v for k, v in r.items() if k != "completion"}}
                    for i, r in enumerate(rows[s])
                ],
            )
        for s in ("train", "val"):
            _write_jsonl(
                out / name / f"{s}_pairs.jsonl",
                [{"prompt": r.get("prompt") or r["context"], "completion": r["completion"]} for r in rows[s]],
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
    stream = pack(tokenizer, world.corpus(cfg.world(), base.families, base.corpus_docs, base.seed, base.style))
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
    build_tokenizer(world.tokenizer_text(cfg.world()), cfg.vocab_size).save_pretrained(out / "tokenizer")
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
