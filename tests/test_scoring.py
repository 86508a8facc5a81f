"""The HF backend agrees with lm-evaluation-harness's HFLM, instance by instance.

Fast: in-process, tiny random models (agreement does not need a trained model).
"""

from __future__ import annotations

import numpy as np
import pytest

from muscle_ray.cli import main
from muscle_ray.config import load_config, validated
from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion
from muscle_ray.scoring.config import ScoreConfig
from muscle_ray.scoring.encode import cut_at_stop, encode_pair, pack_question
from muscle_ray.scoring.hf import HFScorer
from muscle_ray.tasks.base import Instance


def mc(id, contexts, continuations, label=0):
    return Instance(
        id=id,
        task="t",
        kind="mc",
        contexts=contexts,
        continuations=continuations,
        choice_chars=[len(c) for c in continuations],
        label=label,
        reference=str(label),
    )


MC = [
    mc("shared", ["The quick brown fox jumps"], [" over the lazy dog.", " a man", " 12 apples", " she sells 16 eggs"]),
    mc("trailing-space", ["Question: How many apples are left? Answer: "], ["12", "9 apples", "#### 18"], 1),
    mc("per-option-context", ["The trophy fits the man", "The suitcase fits the man"], [" because it is small."] * 2),
    mc("disjoint-contexts", ["A man", "Twist the lid"], [" is sitting on a roof."] * 2, 1),
    mc("empty-context", [""], ["The dog", "A cat sat", "0 1 2"], 2),
    mc("one-token-options", ["0 1 2 3 4 5"], [" 6", " 7", " 8"], 0),
]
GEN = [
    Instance(id=f"g{i}", task="t", kind="gen", contexts=[p], stop=stop, max_new_tokens=n)
    for i, (p, stop, n) in enumerate(
        [
            ("Question: How many apples are left? Answer:", ["\n\n"], 12),
            ("The quick brown fox", ["e", "o"], 16),
            ("#Person1#: Hello, how are you?", ["\n"], 5),
            ("She sells", [" "], 20),
        ]
    )
]


@pytest.fixture(scope="module")
def lm(tiny_model):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model), batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def scorer(tiny_model):
    return HFScorer(ModelVersion(str(tiny_model)), batch_size=4, device="cpu")


def lm_eval_logliks(lm, instances):
    from lm_eval.api.instance import Instance as LmInstance

    reqs = [
        LmInstance(request_type="loglikelihood", doc={}, arguments=(inst.context_for(i), c), idx=i)
        for inst in instances
        for i, c in enumerate(inst.continuations)
    ]
    flat = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    out, k = [], 0
    for inst in instances:
        out.append(flat[k : k + len(inst.continuations)])
        k += len(inst.continuations)
    return out


def test_mc_logliks_and_predictions_match_lm_eval(scorer, lm):
    ours = [o.logliks for o in scorer.loglikelihoods(MC)]
    ref = lm_eval_logliks(lm, MC)
    for inst, a, b in zip(MC, ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=inst.id)
        assert int(np.argmax(a)) == int(np.argmax(b)), inst.id


def test_context_is_encoded_once_per_question(scorer):
    """The packed sequence holds the shared context once: shorter than lm-eval's per-option inputs."""
    inst = MC[0]
    q = pack_question(scorer.tokenizer, inst, scorer.max_len)
    ctx, _ = encode_pair(scorer.tokenizer, inst.contexts[0], inst.continuations[0])
    per_option = sum(len(sum(encode_pair(scorer.tokenizer, inst.contexts[0], c), [])) - 1 for c in inst.continuations)
    assert q.tokens[: len(ctx)] == ctx and q.branch[: len(ctx)] == [0] * len(ctx)
    assert q.branch.count(0) == len(ctx)  # the context appears once, not once per option
    assert len(q) == per_option - (len(inst.continuations) - 1) * len(ctx)


def test_too_long_inputs_are_left_truncated_like_lm_eval(scorer, lm):
    long_ctx = " ".join(["The quick brown fox jumps over the lazy dog."] * 80)  # > 512 positions
    inst = mc("long", [long_ctx], [" A man is sitting.", " 12 apples"])
    assert len(encode_pair(scorer.tokenizer, long_ctx, "")[0]) > scorer.max_len
    np.testing.assert_allclose(scorer.loglikelihoods([inst])[0].logliks, lm_eval_logliks(lm, [inst])[0], atol=1e-4)


def test_batch_size_does_not_change_predictions(tiny_model):
    a = HFScorer(ModelVersion(str(tiny_model)), batch_size=1).loglikelihoods(MC)
    b = HFScorer(ModelVersion(str(tiny_model)), batch_size=len(MC)).loglikelihoods(MC)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.logliks, y.logliks, atol=1e-5)
        assert np.argmax(x.logliks) == np.argmax(y.logliks)


def test_greedy_generation_matches_lm_eval(scorer, lm):
    from lm_eval.api.instance import Instance as LmInstance

    reqs = [
        LmInstance(
            request_type="generate_until",
            doc={},
            idx=0,
            arguments=(g.contexts[0], {"until": list(g.stop), "max_gen_toks": g.max_new_tokens, "do_sample": False}),
        )
        for g in GEN
    ]
    ref = lm.generate_until(reqs, disable_tqdm=True)
    ours = [o.text for o in scorer.generate(GEN)]
    assert ours == ref
    assert not any(s in t for g, t in zip(GEN, ours) for s in g.stop)
    assert any(t for t in ours)


def test_stop_strings_cut_once_before_the_earliest():
    """OpenAI's and vLLM's `stop`: the text before the earliest stop string, which is left out,
    whatever the list order; backends cut here and tasks score the text as it comes."""
    assert cut_at_stop("x = 1.\nNext", ["\n", "."]) == cut_at_stop("x = 1.\nNext", [".", "\n"]) == "x = 1"
    assert cut_at_stop("abc", ["", "z"]) == "abc"


def test_adapter_changes_scores(tiny_model, tiny_adapter, scorer):
    with_adapter = HFScorer(ModelVersion(str(tiny_model), adapter=str(tiny_adapter)), batch_size=4)
    a = [o.logliks for o in scorer.loglikelihoods(MC[:2])]
    b = [o.logliks for o in with_adapter.loglikelihoods(MC[:2])]
    assert not np.allclose(a[0], b[0], atol=1e-3)


def test_vllm_backend_says_how_to_install(tiny_model, tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    from muscle_ray.scoring.backend import make_scorer

    with pytest.raises(MuscleError, match=r"pip install muscle-ray\[vllm\]"):
        make_scorer("vllm", ModelVersion(str(tiny_model)), batch_size=4)
    # the job checks on the driver, before any actor starts: a one-line error, exit code 2
    assert (
        main(
            [
                "score",
                "--model",
                str(tiny_model),
                "--task",
                "mc_jsonl",
                "--data",
                __file__,
                "--out",
                str(tmp_path / "out"),
                "--backend",
                "vllm",
            ]
        )
        == 2
    )


def test_vllm_lora_rank_is_a_size_vllm_accepts(tmp_path):
    """The largest adapter's rank rounded up to a power of two, at least 8 (vllm not needed)."""
    import json

    from muscle_ray.vllm_support import max_lora_rank

    def adapter(name, r):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": r}))
        return str(tmp_path / name)

    assert max_lora_rank([adapter("a", 4)]) == 8
    assert max_lora_rank([adapter("b", 8), adapter("c", 12)]) == 16
    assert max_lora_rank([adapter("d", 64)]) == 64


def test_generation_does_not_depend_on_batch_size(tiny_model):
    many = GEN + [
        Instance(id=f"x{i}", task="t", kind="gen", contexts=["0 1 2" + " 3" * i], stop=["9"], max_new_tokens=6)
        for i in range(5)
    ]
    a = [o.text for o in HFScorer(ModelVersion(str(tiny_model)), batch_size=1).generate(many)]
    b = [o.text for o in HFScorer(ModelVersion(str(tiny_model)), batch_size=8).generate(many)]
    assert a == b


def test_config_errors_are_one_line(tmp_path, tiny_model):
    with pytest.raises(MuscleError, match="workers"):
        validated(ScoreConfig, dict(versions=[{"base": "x"}], task="mc_jsonl", out="o", workers="3,1"))
    with pytest.raises(MuscleError, match="duplicate name"):
        validated(
            ScoreConfig, dict(versions=[{"name": "a", "base": "x"}, {"name": "a", "base": "y"}], task="t", out="o")
        )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"task: mc_jsonl\nout: {tmp_path}/o\nworkers: [1, 2]\nversions:\n  - {{name: old, base: {tiny_model}}}\n"
    )
    assert load_config(ScoreConfig, cfg, {"batch_size": 3}).workers == (1, 2)
    assert main(["score", "--config", str(cfg), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert (
        main(["score", "--model", str(tmp_path), "--task", "mc_jsonl", "--data", "x", "--out", str(tmp_path / "o")])
        == 2
    )


@pytest.mark.parametrize("name", ["hellaswag", "piqa", "winogrande", "arc_easy", "gsm8k", "dialogsum"])
def test_real_task_instances_score_like_lm_eval(name, shared_data, scorer, lm):
    """The built-in tasks' first records from the real files, scored by both."""
    import dataclasses
    from itertools import islice

    from lm_eval.api.instance import Instance as LmInstance

    from muscle_ray.tasks import get_task

    task = get_task(name)
    insts = [task.parse(rec) for rec in islice(task.records(str(shared_data / task.default_path)), 3)]
    if task.kind == "mc":
        ours = [o.logliks for o in scorer.loglikelihoods(insts)]
        for inst, a, b in zip(insts, ours, lm_eval_logliks(lm, insts)):
            np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"{name} {inst.id}")
            assert np.argmax(a) == np.argmax(b)
        return
    insts = [dataclasses.replace(i, max_new_tokens=6) for i in insts[:2]]  # a random model: short is enough
    reqs = [
        LmInstance(
            request_type="generate_until",
            doc={},
            idx=0,
            arguments=(i.contexts[0], {"until": list(i.stop), "max_gen_toks": i.max_new_tokens, "do_sample": False}),
        )
        for i in insts
    ]
    assert [o.text for o in scorer.generate(insts)] == lm.generate_until(reqs, disable_tqdm=True)
