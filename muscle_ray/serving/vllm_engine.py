"""The vLLM engine (`backend: vllm` in the serve config; `pip install muscle-ray[vllm]`), for GPUs.

One vLLM engine holds the base once; every adapter is a `LoRARequest` riding on its requests
(`vllm_support.VLLMModel`, shared with the scoring job's vLLM backend), so vLLM batches
requests of different adapters together. Prompts go in as token ids encoded the lm-eval way,
and results are finished by `completion.py` as the HF engine's are, so the two answer alike.
"""

from __future__ import annotations

from muscle_ray.scoring.encode import encode_pair, encode_prompt, longest_choice_input, with_eos
from muscle_ray.serving.completion import finish, logprobs_object, token_text
from muscle_ray.serving.engine_types import ChoiceRequest, GenRequest, GenResult
from muscle_ray.vllm_support import VLLMModel


class VLLMEngine:
    def __init__(
        self,
        base: str,
        models: dict[str, str | None],
        dtype: str | None = None,
        max_model_len: int | None = None,
        **llm_kwargs,
    ):
        self.models = dict(models)
        self.vllm = VLLMModel(
            base, {n: a for n, a in models.items() if a}, dtype=dtype, max_model_len=max_model_len, **llm_kwargs
        )
        self.tokenizer, self.max_len = self.vllm.tokenizer, self.vllm.max_len

    def encode(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, text)

    def choice_tokens(self, prompt: str, choices: list[str]) -> int:
        return longest_choice_input(self.tokenizer, prompt, choices)

    def _adapter(self, model: str) -> str | None:
        return model if self.models.get(model) else None

    def generate(self, reqs: list[GenRequest]) -> list[GenResult]:
        out: list[GenResult | None] = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.decoding() + (r.logprobs, r.echo), []).append(i)
        for (model, stop, max_new, temperature, top_p, seed, k, echo), idx in groups.items():
            stops = with_eos(self.tokenizer, list(stop))
            params = self.vllm.sampling(
                max(1, max_new),
                stop,
                temperature,
                top_p=top_p,
                seed=seed,
                logprobs=k,
                prompt_logprobs=(k or 0) if echo else None,
            )
            outputs = self.vllm.run([list(reqs[i].prompt_ids) for i in idx], params, self._adapter(model))
            for i, o in zip(idx, outputs):
                gen = list(o.outputs[0].token_ids)[:max_new]
                text, kept, reason = finish(self.tokenizer, gen, stops, max_new)
                prompt = list(reqs[i].prompt_ids)
                res = GenResult(text, reason, len(prompt), len(gen), None)
                if echo:
                    res.text = self.tokenizer.decode(prompt, skip_special_tokens=True) + res.text
                if k is not None:
                    steps = [(t, o.prompt_logprobs[j]) for j, t in enumerate(prompt)] if echo else []
                    steps += [(t, o.outputs[0].logprobs[j]) for j, t in enumerate(gen[:kept])]
                    lps = [None if d is None else d[t].logprob for t, d in steps]
                    tops = (
                        [
                            None
                            if d is None
                            else {
                                token_text(self.tokenizer, tid): lp.logprob
                                for tid, lp in d.items()
                                if lp.rank is not None and lp.rank <= k
                            }
                            for t, d in steps
                        ]
                        if k
                        else [None if d is None else {} for _, d in steps]
                    )
                    offset = 0 if echo else len(self.tokenizer.decode(prompt, skip_special_tokens=True))
                    res.logprobs = logprobs_object(self.tokenizer, [t for t, _ in steps], lps, tops, offset)
                out[i] = res
        return out  # type: ignore[return-value]

    def choice_logliks(self, reqs: list[ChoiceRequest]) -> list[list[float]]:
        """log P(choice | prompt) per choice: prompt log-probs summed over the choice's tokens,
        as the scoring job's vLLM backend computes them."""
        out = []
        for r in reqs:
            pairs = [encode_pair(self.tokenizer, r.prompt, c) for c in r.choices]
            out.append(self.vllm.continuation_logliks(pairs, self._adapter(r.model)))
        return out
