"""Small Llama-style causal LMs from a config, saved as ordinary HF model directories."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class LlamaSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    max_position_embeddings: int = 512

    def config(self, tokenizer):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
            **asdict(self),
        )


def init_model(spec: LlamaSpec, tokenizer, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(spec.config(tokenizer)).float().eval()


def save_model_dir(model, tokenizer, out: str | Path) -> Path:
    """An HF model directory (config.json, model.safetensors, tokenizer files)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def random_model_dir(out: str | Path, spec: LlamaSpec = LlamaSpec(), seed: int = 0, tokenizer=None) -> Path:
    """Random-weight model: enough for agreement and plumbing tests."""
    from muscle_ray.zoo.tokenizer import SAMPLE_TEXT, build_tokenizer

    tokenizer = tokenizer or build_tokenizer(SAMPLE_TEXT, vocab_size=384)
    return save_model_dir(init_model(spec, tokenizer, seed), tokenizer, out)


def random_lora_dir(base: str | Path, out: str | Path, seed: int = 0, r: int = 4) -> Path:
    """A PEFT LoRA adapter with non-zero random weights (so it changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(str(out))
    return Path(out)
