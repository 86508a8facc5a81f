"""The vLLM backend (`--backend vllm`, `pip install muscle-ray[vllm]`), for GPUs.

Same inputs and outputs as the HF backend, and the same lm-eval tokenisation (`encode.py`):
requests go in as token ids, so both backends score exactly the same tokens.
* MC: each option's full sequence with `prompt_logprobs`; vLLM's prefix cache shares the
  context's work across options.
* Generation: greedy, with the stop strings and the token limit; the text cut as the HF
  backend cuts it.
* Adapters: a `LoRARequest` on the base model, never merged (`vllm_support.VLLMModel`).
* `backend_options` (config.VLLMOptions: tensor_parallel_size, gpu_memory_utilization,
  max_model_len, enforce_eager, dtype) are `vllm.LLM`'s arguments; the scoring pool gives each
  actor `tensor_parallel_size` GPUs (`placement.py`), and the engine's tensor-parallel workers
  are its own processes on them ("mp"): vLLM's Ray executor would ask Ray for GPUs again, ones
  the actor already holds, and wait for them.
"""

from __future__ import annotations

from muscle_ray.chat import require_chat_template
from muscle_ray.models import ModelVersion
from muscle_ray.scoring.encode import (
    chat_instance,
    check_fits,
    completion_text,
    encode_pair,
    generation_groups,
    prompt_tokens,
)
from muscle_ray.scoring.outputs import GenOutput, MCOutput
from muscle_ray.tasks.base import Instance
from muscle_ray.vllm_support import VLLMModel


class VLLMScorer:
    """Holds one model version in a vLLM engine; the adapter, if any, rides on each request."""

    def __init__(
        self,
        version: ModelVersion,
        dtype: str | None = None,
        max_model_len: int | None = None,
        chat_template: bool = False,
        **llm_kwargs,
    ):
        self.version = version
        self.adapter = version.name if version.adapter else None
        if (llm_kwargs.get("tensor_parallel_size") or 1) > 1:
            llm_kwargs.setdefault("distributed_executor_backend", "mp")
        self.vllm = VLLMModel(
            version.base,
            {version.name: version.adapter} if version.adapter else {},
            dtype=dtype,
            max_model_len=max_model_len,
            trust_remote_code=version.trust_remote_code,
            **llm_kwargs,
        )
        self.tokenizer, self.max_len = self.vllm.tokenizer, self.vllm.max_len
        self.chat_template = chat_template
        if chat_template:
            require_chat_template(self.tokenizer)

    def _as_read(self, instances: list[Instance]) -> list[Instance]:
        """Through the chat template when asked, exactly as the HF backend reads them."""
        return [chat_instance(self.tokenizer, i) for i in instances] if self.chat_template else instances

    def loglikelihoods(self, instances: list[Instance]) -> list[MCOutput]:
        instances = self._as_read(instances)
        pairs = []
        for inst in instances:
            for i, c in enumerate(inst.continuations):
                ctx, cont = encode_pair(self.tokenizer, inst.context_for(i), c)
                check_fits(cont, self.max_len - 1, i)  # a prompt's first token has no log-prob in vLLM
                pairs.append((ctx, cont))
        lls = self.vllm.continuation_logliks(pairs, self.adapter)
        out, k = [], 0
        for inst in instances:
            n = len(inst.continuations)
            tokens = sum(min(len(ctx) + len(cont), self.max_len) for ctx, cont in pairs[k : k + n])
            out.append(MCOutput(lls[k : k + n], tokens))
            k += n
        return out

    def generate(self, instances: list[Instance]) -> list[GenOutput]:
        instances = self._as_read(instances)
        out: list[GenOutput | None] = [None] * len(instances)
        for (stops, max_new), members in generation_groups(instances).items():
            prompts = [prompt_tokens(self.tokenizer, instances[i].contexts[0], self.max_len - max_new) for i in members]
            params = self.vllm.sampling(max_new, stops)
            for i, p, o in zip(members, prompts, self.vllm.run(prompts, params, self.adapter)):
                ids = list(o.outputs[0].token_ids)
                out[i] = GenOutput(completion_text(self.tokenizer, ids, list(stops)), len(p) + len(ids))
        return out  # type: ignore[return-value]
