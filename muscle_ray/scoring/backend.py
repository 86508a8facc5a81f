"""What a scoring backend is, choosing one, and running one batch of Instances through it.

A backend (`hf.HFScorer`, `vllm.VLLMScorer`) holds one model version and answers two
questions: the log-likelihood of each option of a multiple-choice question, and the greedy
completion of a prompt, already cut at the task's stop strings. Everything after that (picking
the answer, scoring the text) is shared here so the HF and vLLM backends cannot disagree on it.
"""

from __future__ import annotations

from typing import Literal, Protocol

from muscle_ray.models import ModelVersion
from muscle_ray.scoring.outputs import GenOutput, MCOutput
from muscle_ray.scoring.rows import gen_row, mc_row
from muscle_ray.tasks.base import Instance, Task

Backend = Literal["hf", "vllm"]


class Scorer(Protocol):
    """A model version that scores Instances, in the order given."""

    def loglikelihoods(self, instances: list[Instance]) -> list[MCOutput]: ...

    def generate(self, instances: list[Instance]) -> list[GenOutput]: ...


def make_scorer(backend: Backend, version: ModelVersion, batch_size: int, **kwargs) -> Scorer:
    """The backend's scorer; each backend is imported only when chosen (vllm is optional)."""
    if backend == "hf":
        from muscle_ray.scoring.hf import HFScorer

        return HFScorer(version, batch_size=batch_size, **kwargs)
    from muscle_ray.scoring.vllm import VLLMScorer  # raises MuscleError when vllm is absent

    return VLLMScorer(version, **kwargs)


def score_instances(scorer: Scorer, task: Task, items: list[tuple[int, Instance]], version: str) -> list[dict]:
    """Results rows for (row, Instance) pairs, in the order given."""
    mc = [(i, r, inst) for i, (r, inst) in enumerate(items) if inst.kind == "mc"]
    gen = [(i, r, inst) for i, (r, inst) in enumerate(items) if inst.kind == "gen"]
    out: list[dict | None] = [None] * len(items)
    if mc:
        for (i, r, inst), scored in zip(mc, scorer.loglikelihoods([x[2] for x in mc])):
            out[i] = mc_row(inst, scored.logliks, version, scored.n_tokens, r)
    if gen:
        for (i, r, inst), generated in zip(gen, scorer.generate([x[2] for x in gen])):
            out[i] = gen_row(task, inst, generated.text, version, generated.n_tokens, r)
    return out  # type: ignore[return-value]
