"""What a scoring backend is, choosing one, and running one batch of Instances through it.

A backend (`hf.HFScorer`, `vllm.VLLMScorer`) holds one model version and answers two
questions: the log-likelihood of each option of a multiple-choice question, and the greedy
completion of a prompt, already cut at the task's stop strings. Everything after that (picking
the answer, scoring the text) is shared here so the HF and vLLM backends cannot disagree on it.

`VersionGroup` holds several versions of one base in one process (the base loaded once, each
adapter beside it), so the scoring job scores them all in one pass; `group_versions` says which
versions can share one. Its keyword arguments reach the backend's scorer: `chat_template` and
the config's `backend_options` (checked per backend by `config.check_backend_options`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal, Protocol

from muscle_ray.errors import MuscleError
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


def adapter_type(version: ModelVersion) -> str | None:
    """The PEFT type of the version's adapter (None without one), after checking on the driver
    that the directory holds a readable config and weights: a broken adapter is named here, in
    one line, before any actor starts (a mismatch with the base only shows when it loads)."""
    if not version.adapter:
        return None
    where = f"version {version.name}: adapter {version.adapter}"
    d = Path(version.adapter)
    try:
        peft_type = json.loads((d / "adapter_config.json").read_text())["peft_type"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MuscleError(f"{where}: unreadable adapter_config.json ({type(e).__name__}: {e})") from None
    weights = d / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt") as f:  # reads the header only
                f.keys()
        except Exception as e:
            raise MuscleError(f"{where}: {weights.name} is not a readable safetensors file ({e})") from None
    elif not (d / "adapter_model.bin").is_file():
        raise MuscleError(f"{where}: no adapter_model.safetensors (or .bin) weights")
    return str(peft_type)


def group_versions(backend: Backend, versions: list[ModelVersion], processor: bool = False) -> list[list[int]]:
    """Indices of `versions` in groups that one pass can score, in first-seen order.

    HF: one group per base (resolved path, trust_remote_code) and adapter type (PEFT cannot
    mix types in one model); a version without adapter joins its base's first group.
    vLLM through Ray Data LLM (`processor`, see `vllm_batch.through_processor`): one group per
    base and adapter type too (its engines take each request's adapter), but a version without
    adapter gets an engine of its own: vLLM 0.32 on CPU applies a LoRA to the adapter-free
    requests that share its batch (tests/test_vllm_backend.py found it; two adapters in one batch
    are right). Multiple choice on vLLM: one version per group (`VersionGroup` holds one).
    """
    kinds = [adapter_type(v) for v in versions]  # checks every adapter, whatever the backend
    if backend != "hf" and not processor:
        return [[i] for i in range(len(versions))]
    groups: dict[tuple, list[int]] = {}
    bare: dict[tuple, list[int]] = {}
    for i, (v, kind) in enumerate(zip(versions, kinds)):
        base = (str(Path(v.base).resolve()), v.trust_remote_code)
        if kind is None:
            bare.setdefault(base, []).append(i)
        else:
            groups.setdefault((*base, kind), []).append(i)
    for base, members in bare.items():
        key = (*base, None) if backend == "vllm" else next((k for k in groups if k[:2] == base), (*base, None))
        groups[key] = sorted(groups.get(key, []) + members)
    return sorted(groups.values(), key=min)


class VersionGroup:
    """Model versions on one base in one process: HF loads the base once and every adapter into
    one PeftModel, unmerged (`HFScorer.add_adapter`); `using(name)` gives the scorer with that
    version's adapter active, or every adapter off for a version without one. vLLM holds one
    version (the scoring job runs a pass per version there)."""

    def __init__(self, backend: Backend, versions: list[ModelVersion], batch_size: int, **kwargs):
        self.adapters = {v.name: v.adapter for v in versions}
        if backend != "hf":
            if len(versions) != 1:
                raise MuscleError(f"the {backend} backend scores one version per pass, got {len(versions)}")
            self.scorer: Scorer = make_scorer(backend, versions[0], batch_size, **kwargs)
            self._hf = None
            return
        from muscle_ray.scoring.hf import HFScorer

        first = versions[0]
        base = ModelVersion(first.base, name=first.name, trust_remote_code=first.trust_remote_code)
        self._hf = self.scorer = HFScorer(base, batch_size=batch_size, **kwargs)
        for v in versions:
            if v.adapter:
                try:
                    self._hf.add_adapter(v.name, v.adapter)
                except Exception as e:
                    why = " ".join(str(e).split())[:500]
                    raise MuscleError(
                        f"version {v.name}: adapter {v.adapter} does not load on {v.base} ({type(e).__name__}: {why})"
                    ) from None

    @contextmanager
    def using(self, name: str) -> Iterator[Scorer]:
        if self._hf is None:
            yield self.scorer
            return
        with self._hf.use_adapter(name if self.adapters[name] else None):
            yield self._hf


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
