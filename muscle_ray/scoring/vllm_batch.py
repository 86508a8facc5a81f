"""Generation on the vllm backend through Ray Data LLM (`ray.data.llm`): the scoring job's pass
for generative tasks when `backend: vllm`.

Ray Data LLM runs the engines: an actor pool of vLLM engines it places (GPUs per
`tensor_parallel_size`, or the CPU bundle given here), continuous batching across the pass's
requests, each adapter loaded on its first request (the request's `model` is the adapter's
directory: a `LoRARequest` on the base, never merged). That is the part a platform team
already runs and tunes. What keeps the scores comparable stays ours: prompts go in as token ids
encoded the lm-eval way (`encode.prompt_tokens`, the tokens the HF backend runs), greedy, the
stop strings left in vLLM's output and the text cut once by `encode.completion_text`, as every
backend cuts it. Multiple choice stays on our packed scorer (`backend.py`): prompt
log-likelihoods are not a processor's task.

The pass: input rows -> parsed, one request per (row, version whose shard is missing) -> the
processor -> each generation scored (`rows.gen_row`). A row that does not parse (or carries a
duplicate id) never reaches an engine: it leaves as one part per version, with its reason.
Every part is a row of the job's collector (`ScoreActor`'s columns, one version's entry
filled), so shards, errors.parquet and resume work as on the other path.
"""

from __future__ import annotations

import json
import pickle
from functools import lru_cache

from muscle_ray.errors import BadRow
from muscle_ray.scoring.config import ScoreConfig, VersionSpec
from muscle_ray.scoring.rows import raw_text
from muscle_ray.tasks.base import get_task

ENGINE = "ray.data.llm"  # results' `actor`: the processor does not say which engine replica ran a row
CPUS = 0.25  # the maps around the engines (parse and encode, score) never ask a whole CPU
PARTS = ("ord", "row", "results", "errors", "raw", "actor")


def through_processor(backend: str, kind: str) -> bool:
    """Whether a task of this kind scores through Ray Data LLM on this backend (generation on vLLM)."""
    return backend == "vllm" and kind == "gen"


@lru_cache(maxsize=4)
def _tokenizer(base: str, trust_remote_code: bool):
    from muscle_ray.models import ModelVersion, load_tokenizer

    return load_tokenizer(ModelVersion(base, trust_remote_code=trust_remote_code))


@lru_cache(maxsize=4)
def _task(name: str, options: str):
    return get_task(name, **json.loads(options))


class _Pass:
    """The per-row work around the engines, as functions of a batch (Ray Data tasks)."""

    def __init__(self, cfg: ScoreConfig, specs: list[VersionSpec], need: dict[int, str], max_len: int):
        self.task, self.options = cfg.task, json.dumps(cfg.task_options, sort_keys=True)
        self.chat_template, self.shard_size = cfg.chat_template, cfg.shard_size
        self.specs, self.need, self.max_len = specs, need, max_len
        base = specs[0].model_version()
        self.tokenizer = (base.base, base.trust_remote_code)

    def _versions(self, ord_) -> list[int]:
        """The versions whose shard of this row is missing."""
        return [j for j, c in enumerate(self.need[int(ord_) // self.shard_size]) if c == "1"]

    def _parse(self, batch: dict, i: int):
        """(Instance, "") or (None, why the row is not scored)."""
        if batch["error"][i]:
            return None, str(batch["error"][i])
        try:
            return _task(self.task, self.options).parse(pickle.loads(batch["record"][i])), ""
        except BadRow as e:
            return None, e.reason

    def requests(self, batch: dict) -> dict:
        """One engine request per (row that parses, version it is missing for)."""
        from muscle_ray.scoring.encode import chat_instance, prompt_tokens

        tok = _tokenizer(*self.tokenizer)
        keys = ("ord", "row", "instance", "j", "prompt_len", "tokenized_prompt", "sampling_params", "model")
        out: dict[str, list] = {k: [] for k in keys}
        for i, ord_ in enumerate(batch["ord"]):
            inst, _ = self._parse(batch, i)
            if inst is None:
                continue
            parsed = pickle.dumps(inst)  # scored as parsed here, once per row (not per version)
            read = chat_instance(tok, inst) if self.chat_template else inst
            prompt = prompt_tokens(tok, read.contexts[0], self.max_len - inst.max_new_tokens)
            params = {
                "max_tokens": inst.max_new_tokens,
                "temperature": 0.0,
                "stop": [s for s in inst.stop if s],
                "include_stop_str_in_output": True,  # the text is cut once, by completion_text
            }
            for j in self._versions(ord_):
                spec = self.specs[j]
                row = (int(ord_), int(batch["row"][i]), parsed, j, len(prompt), prompt, params)
                for k, v in zip(keys, row):
                    out[k].append(v)
                out["model"].append(spec.adapter or spec.base)  # an adapter's directory: a LoRA request
        return out

    def _part(self, out: dict, ord_, row, j: int, result: dict | None = None, error: str = "", raw: str = "") -> None:
        """One version's entry of a row, in `ScoreActor`'s columns (the others empty)."""
        results: list[dict | None] = [None] * len(self.specs)
        errors = [""] * len(self.specs)
        results[j], errors[j] = result, error
        for k, v in zip(PARTS, (int(ord_), int(row), json.dumps(results), json.dumps(errors), raw, ENGINE)):
            out[k].append(v)

    def rejected(self, batch: dict) -> dict:
        """The rows that do not parse: one part per version, each with the reason."""
        out: dict[str, list] = {k: [] for k in PARTS}
        for i, ord_ in enumerate(batch["ord"]):
            inst, reason = self._parse(batch, i)
            if inst is None:
                raw = raw_text(pickle.loads(batch["record"][i]))
                for j in self._versions(ord_):
                    self._part(out, ord_, batch["row"][i], j, error=reason, raw=raw)
        return out

    def scored(self, batch: dict) -> dict:
        """The engines' generations as result rows, one part per request."""
        from muscle_ray.scoring.encode import completion_text
        from muscle_ray.scoring.rows import gen_row

        task, tok = _task(self.task, self.options), _tokenizer(*self.tokenizer)
        out: dict[str, list] = {k: [] for k in PARTS}
        for i in range(len(batch["ord"])):
            inst = pickle.loads(batch["instance"][i])
            ids = [int(t) for t in batch["generated_tokens"][i]]
            j, row = int(batch["j"][i]), int(batch["row"][i])
            text = completion_text(tok, ids, list(inst.stop))
            result = gen_row(task, inst, text, self.specs[j].name, int(batch["prompt_len"][i]) + len(ids), row)
            self._part(out, batch["ord"][i], row, j, result=result)
        return out


def engine_config(cfg: ScoreConfig, specs: list[VersionSpec], max_len: int):
    """The processor's config: one engine per pool actor, our placement, vLLM's arguments from
    `backend_options`; no tokenize/chat/detokenize stages (we send token ids and cut the text)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    from muscle_ray.vllm_support import lora_kwargs

    options = {k: v for k, v in cfg.backend_options.items() if k not in ("dtype", "max_model_len")}
    adapters = [s.adapter for s in specs if s.adapter]
    engine = {
        "tokenizer": specs[0].base,
        "dtype": cfg.backend_options.get("dtype") or ("bfloat16" if cfg.gpus_per_worker else "float32"),
        "seed": 0,
        "max_model_len": max_len,
        "trust_remote_code": specs[0].model_version().trust_remote_code,
        **options,
    }
    engine.update(lora_kwargs(adapters))
    lo, hi = cfg.workers or (1, 1)
    return vLLMEngineProcessorConfig(
        model_source=specs[0].base,
        engine_kwargs=engine,
        batch_size=cfg.batch_size,
        concurrency=(lo, hi),
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        # No GPUs: the engine actor asks for its share of CPUs, as the HF pool's actors do.
        placement_group_config=None if cfg.gpus_per_worker else {"bundles": [{"CPU": cfg.cpus_per_worker}]},
        log_engine_metrics=False,
    )


def generation_pass(cfg: ScoreConfig, specs: list[VersionSpec], rows, need: dict[int, str]):
    """The pass's parts (a Dataset) for the input rows `rows` (a Dataset of the job's input
    rows); `need` as `ScoreActor` takes it."""
    from ray.data.llm import build_processor

    from muscle_ray.vllm_support import context_length

    base = specs[0].model_version()
    tok = _tokenizer(base.base, base.trust_remote_code)
    max_len = context_length(base.base, tok, cfg.backend_options.get("max_model_len"), base.trust_remote_code)
    p = _Pass(cfg, specs, need, max_len)
    processor = build_processor(engine_config(cfg, specs, max_len))
    generated = processor(rows.map_batches(p.requests, num_cpus=CPUS)).map_batches(p.scored, num_cpus=CPUS)
    return generated.union(rows.map_batches(p.rejected, num_cpus=CPUS))
