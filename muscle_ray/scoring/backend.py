"""Choosing a backend and running one batch of Instances through it, whatever the backend.

Both backends expose `loglikelihoods(instances) -> [MCOutput]` and
`generate(instances) -> [GenOutput]`; everything after that (picking the answer, scoring the
text) is shared here so the HF and vLLM backends cannot disagree on it.
"""

from __future__ import annotations

from typing import Literal

from muscle_ray.models import ModelVersion
from muscle_ray.scoring.rows import gen_row, mc_row
from muscle_ray.tasks.base import Instance, Task

Backend = Literal["hf", "vllm"]


def make_scorer(backend: Backend, version: ModelVersion, batch_size: int, **kwargs):
    if backend == "hf":
        from muscle_ray.scoring.hf import HFScorer

        return HFScorer(version, batch_size=batch_size, **kwargs)
    from muscle_ray.scoring.vllm import VLLMScorer   # raises MuscleError when vllm is absent

    return VLLMScorer(version, **kwargs)


def score_instances(scorer, task: Task, items: list[tuple[int, Instance]], version: str) -> list[dict]:
    """Results rows for (row, Instance) pairs, in the order given."""
    mc = [(i, r, inst) for i, (r, inst) in enumerate(items) if inst.kind == "mc"]
    gen = [(i, r, inst) for i, (r, inst) in enumerate(items) if inst.kind == "gen"]
    out: list[dict | None] = [None] * len(items)
    if mc:
        for (i, r, inst), o in zip(mc, scorer.loglikelihoods([x[2] for x in mc])):
            out[i] = mc_row(inst, o.logliks, version, o.n_tokens, r)
    if gen:
        for (i, r, inst), o in zip(gen, scorer.generate([x[2] for x in gen])):
            out[i] = gen_row(task, inst, o.text, version, o.n_tokens, r)
    return out  # type: ignore[return-value]
