"""The vLLM engine (`backend: vllm` in the serve config; `pip install muscle-ray[vllm]`), for GPUs.

Same interface as `engine.HFEngine`. One vLLM engine holds the base once; every adapter is a
`LoRARequest` riding on its requests (`max_loras` = the number of adapters, never merged), so
vLLM batches requests of different adapters together. Prompts go in as token ids encoded the
lm-eval way and text is cut at stop strings as the scoring job's vLLM backend does
(`scoring/vllm.py`), so the two backends answer alike. vllm is imported only here.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from muscle_ray.models import ModelVersion, default_device, default_dtype, load_tokenizer
from muscle_ray.scoring.encode import encode, encode_pair, max_length, prefix_token_id
from muscle_ray.scoring.hf import with_eos
from muscle_ray.scoring.vllm import require_vllm
from muscle_ray.serving.engine import ChoiceRequest, GenRequest, GenResult, finish, logprobs_object, token_text


class VLLMEngine:
    def __init__(self, base: str, models: dict[str, str | None], dtype: str | None = None,
                 max_model_len: int | None = None, **llm_kwargs):
        vllm, self._TokensPrompt, LoRARequest = require_vllm()
        from transformers import AutoConfig

        self.models = dict(models)
        self.tokenizer = load_tokenizer(ModelVersion(base))
        self.max_len = max_model_len or max_length(AutoConfig.from_pretrained(base), self.tokenizer)
        adapters = {n: a for n, a in models.items() if a}
        lora = {}
        if adapters:
            rank = max(int(json.loads((Path(a) / "adapter_config.json").read_text()).get("r", 8))
                       for a in adapters.values())
            lora = {"enable_lora": True, "max_lora_rank": max(8, 1 << (rank - 1).bit_length()),
                    "max_loras": len(adapters)}
        self.lora = {n: LoRARequest(n, i + 1, str(Path(a).resolve())) for i, (n, a) in enumerate(adapters.items())}
        dtype = dtype or str(default_dtype(default_device())).removeprefix("torch.")
        self.llm = vllm.LLM(model=base, tokenizer=base, dtype=dtype, seed=0, max_model_len=self.max_len,
                            **lora, **llm_kwargs)
        self._SamplingParams = vllm.SamplingParams
        self._lock = threading.Lock()   # vllm.LLM is not meant for concurrent callers

    def encode(self, text: str) -> list[int]:
        return encode(self.tokenizer, text) or [prefix_token_id(self.tokenizer)]

    def _run(self, model: str, prompts: list[list[int]], params):
        with self._lock:
            return self.llm.generate([self._TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                     lora_request=self.lora.get(model), use_tqdm=False)

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.decoding() + (r.logprobs, r.echo), []).append(i)
        for (model, stop, max_new, temperature, top_p, k, echo), idx in groups.items():
            stops = with_eos(self.tokenizer, list(stop))
            params = self._SamplingParams(
                max_tokens=max(1, max_new), temperature=temperature, top_p=top_p, seed=None,
                stop=[s for s in stop if s] or None, include_stop_str_in_output=True,
                logprobs=k, prompt_logprobs=(k or 0) if echo else None)
            for i, o in zip(idx, self._run(model, [list(reqs[i].prompt_ids) for i in idx], params)):
                gen = list(o.outputs[0].token_ids)[:max_new]
                text, kept, reason = finish(self.tokenizer, gen, stops, max_new)
                prompt = list(reqs[i].prompt_ids)
                res = GenResult(text, reason, len(prompt), len(gen), None)
                if echo:
                    res.text = self.tokenizer.decode(prompt, skip_special_tokens=True) + res.text
                if k is not None:
                    steps = ([(t, o.prompt_logprobs[j]) for j, t in enumerate(prompt)] if echo else [])
                    steps += [(t, o.outputs[0].logprobs[j]) for j, t in enumerate(gen[:kept])]
                    lps = [None if d is None else d[t].logprob for t, d in steps]
                    tops = [None if d is None else {token_text(self.tokenizer, tid): lp.logprob
                                                     for tid, lp in d.items() if lp.rank is not None and lp.rank <= k}
                            for t, d in steps] if k else [None if d is None else {} for _, d in steps]
                    offset = 0 if echo else len(self.tokenizer.decode(prompt, skip_special_tokens=True))
                    res.logprobs = logprobs_object(self.tokenizer, [t for t, _ in steps], lps, tops, offset)
                out[i] = res
        return out  # type: ignore[return-value]

    def choice_logliks(self, reqs: list[ChoiceRequest]) -> list[list[float]]:
        """Sum of prompt log-probs over each choice's tokens (the scoring job's vLLM way)."""
        params = self._SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out = []
        for r in reqs:
            lls = []
            for c in r.choices:
                ctx, cont = encode_pair(self.tokenizer, r.prompt, c)
                seq = (ctx + cont)[-self.max_len:]
                # one sequence per call: vLLM 0.32 mixes up LoRA prompt logprobs across requests
                (o,) = self._run(r.model, [seq], params)
                lls.append(sum(o.prompt_logprobs[j][seq[j]].logprob for j in range(len(seq) - len(cont), len(seq))))
            out.append(lls)
        return out

    def choice_tokens(self, prompt: str, choices: list[str]) -> int:
        return max(sum(map(len, encode_pair(self.tokenizer, prompt, c))) for c in choices)
