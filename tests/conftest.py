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
