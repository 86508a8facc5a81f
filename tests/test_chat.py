"""Chat models: one rendering (muscle_ray.chat) for scoring and training, and the same requests,
log-likelihoods and generations as lm-eval's `--apply_chat_template` with HFLM.

The chat model is tiny_model with a ChatML-like template (conftest.tiny_chat_model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from muscle_ray.chat import plain_text, render_prompt, render_turn, split_messages  # noqa: E402
from muscle_ray.errors import BadRow, MuscleError  # noqa: E402
from muscle_ray.models import ModelVersion  # noqa: E402
from muscle_ray.scoring.encode import chat_instance, encode_pair  # noqa: E402
from muscle_ray.scoring.hf import HFScorer  # noqa: E402
from muscle_ray.tasks import Record, get_task  # noqa: E402
from muscle_ray.training.data import IGNORE, read_pairs, tokenize_pair  # noqa: E402

N = 6
CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "Of Italy?"},
    {"role": "assistant", "content": "Rome"},
]


@pytest.fixture(scope="module")
def tok(tiny_chat_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


def test_a_prompt_is_one_user_turn_and_a_conversation_is_rendered_as_it_is(tok):
    assert (
        render_prompt(tok, "Question: 2+2?\nAnswer:")
        == "<|im_start|>user\nQuestion: 2+2?\nAnswer:<|im_end|>\n<|im_start|>assistant\n"
    )
    before, answer = split_messages(CONVERSATION)
    assert answer == "Rome" and before == CONVERSATION[:-1]
    head, turn = render_turn(tok, before, answer)
    assert head == render_prompt(tok, before) and head.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert head.endswith("<|im_start|>user\nOf Italy?<|im_end|>\n<|im_start|>assistant\n")
    assert turn == "Rome<|im_end|>\n"
    assert plain_text(before) == "Answer in one word.\n\nCapital of France?\n\nParis\n\nOf Italy?\n\n"


def test_a_model_without_a_chat_template_is_named(tiny_model):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(MuscleError, match=f"{tiny_model}: chat_template is on but the tokenizer has no chat template"):
        render_prompt(plain, "hi")
    with pytest.raises(MuscleError, match="has no chat template"):
        HFScorer(ModelVersion(str(tiny_model)), chat_template=True)


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        ([{"role": "user", "content": "hi"}], "the last message must be the assistant's answer"),
        ([{"role": "assistant", "content": "hi"}], "no turn comes before it"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "messages[0] must be"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "messages[0] must be"),
    ],
)
def test_bad_conversations_say_why(messages, reason):
    with pytest.raises(BadRow, match=reason.replace("[", r"\[").replace("]", r"\]")):
        split_messages(messages, row=3)


# --- training: the assistant turn only ---------------------------------------------------------


def test_training_renders_the_pair_and_trains_on_the_assistant_turn_only(tok):
    row = tokenize_pair(tok, "Question: 2+2?\nAnswer:", " 4", 128, "all", chat_template=True)
    n = int(row["attention_mask"].sum())
    head, turn = render_turn(tok, "Question: 2+2?\nAnswer:", "4")  # the delimiter is not the answer's
    context, continuation = encode_pair(tok, head, turn)  # scoring's split of the same text
    assert row["input_ids"][:n].tolist() == context + continuation  # the template's end of turn, no EOS
    assert tok.decode(row["input_ids"][:n]) == head + turn
    trained = [int(t) for t in row["labels"] if t != IGNORE]
    assert trained == continuation and tok.decode(trained).endswith("4<|im_end|>\n")

    convo = tokenize_pair(tok, CONVERSATION[:-1], "Rome", 256, "all", chat_template=True)
    trained = [int(t) for t in convo["labels"] if t != IGNORE]
    assert tok.decode(trained).strip() == "Rome<|im_end|>"  # earlier answers ("Paris") carry no loss

    plain = tokenize_pair(tok, CONVERSATION[:-1], "Rome", 256, "completion")  # no template: plain text + EOS
    n = int(plain["attention_mask"].sum())
    assert tok.decode(plain["input_ids"][:n]) == plain_text(CONVERSATION[:-1]) + "Rome" + tok.eos_token


def test_training_data_reads_conversations_and_names_bad_rows(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert read_pairs(str(p)) == [
        {"prompt": CONVERSATION[:-1], "completion": "Rome"},
        {"prompt": "a", "completion": "b"},
    ]
    p.write_text(
        json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"messages": CONVERSATION[:2]}) + "\n"
    )
    with pytest.raises(MuscleError, match=f"{p}: row 2: the last message must be the assistant's answer"):
        read_pairs(str(p))


def test_training_rows_of_a_chat_model_and_a_refusal_naming_a_plain_one(tmp_path, tiny_chat_model, tiny_model):
    from muscle_ray.training.config import DataConfig
    from muscle_ray.training.data import tokenize_pairs

    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    data = DataConfig(path=str(p), chat_template=True, max_length=256)
    (row,) = tokenize_pairs(read_pairs(data.path), str(tiny_chat_model), data)
    assert (row["labels"] != IGNORE).sum() > 0
    with pytest.raises(MuscleError, match=f"{tiny_model}: chat_template is on but the tokenizer has no chat template"):
        tokenize_pairs(read_pairs(data.path), str(tiny_model), data)


def test_training_config_fields(tmp_path, tiny_model):
    from muscle_ray.config import validated
    from muscle_ray.training.config import AdapterTrainConfig, DataConfig

    cfg = validated(
        AdapterTrainConfig,
        {"base": str(tiny_model), "out": str(tmp_path / "a"), "data": {"path": "x.jsonl", "chat_template": True}},
        "t.yaml",
    )
    assert cfg.data.chat_template is True
    assert DataConfig(task="gsm8k", data_root="/d").path == "/d/gsm8k/train_first1000.jsonl"
    with pytest.raises(ValueError, match="gen_jsonl names no training split; give path"):
        DataConfig(task="gen_jsonl", data_root="/d")
    with pytest.raises(ValueError, match="path\n  Field required"):
        DataConfig(task="gsm8k")


# --- scoring: what lm-eval's --apply_chat_template feeds HFLM ----------------------------------


def _yaml(tmp: Path, name: str, stock: str, split: str, data: Path, extra: str = "") -> None:
    import lm_eval

    (tmp / f"{name}.yaml").write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks' / stock}\ntask: {name}\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    {split}: {data}\n"
        f"training_split: null\nvalidation_split: {split if split == 'validation' else 'null'}\n"
        f"test_split: {split if split == 'test' else 'null'}\nfewshot_split: null\n{extra}"
    )


@pytest.fixture(scope="module")
def lm_chat(tiny_chat_model, shared_data, tmp_path_factory):
    """(HFLM, {task: lm-eval's requests built with apply_chat_template}) over the shared data."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("lmeval_chat")
    arc = [json.loads(x) for x in (shared_data / "arc_easy/arc_easy_test.llmfoundry.jsonl").open().readlines()[:N]]
    (tmp / "arc.jsonl").write_text(
        "".join(
            json.dumps(
                {
                    "id": str(i),
                    "question": d["query"].removeprefix("Question: "),
                    "choices": {"text": d["choices"], "label": list("ABCD")},
                    "answerKey": "ABCD"[d["gold"]],
                }
            )
            + "\n"
            for i, d in enumerate(arc)
        )
    )
    _yaml(tmp, "chat_arc", "arc/arc_easy.yaml", "test", tmp / "arc.jsonl")
    _yaml(
        tmp,
        "chat_gsm8k",
        "gsm8k/gsm8k.yaml",
        "test",
        shared_data / "gsm8k/test.jsonl",
        "num_fewshot: 0\ngeneration_kwargs:\n  until: ['Question:', '</s>', '<|im_end|>']\n  do_sample: false\n"
        "  max_gen_toks: 12\n",
    )
    lm = HFLM(pretrained=str(tiny_chat_model), batch_size=4, device="cpu")
    tasks = TaskManager(include_path=str(tmp), include_defaults=False).load(["chat_arc", "chat_gsm8k"])["tasks"]
    for t in tasks.values():
        t.build_all_requests(
            limit=N,
            rank=0,
            world_size=1,
            apply_chat_template=True,
            chat_template=lm.apply_chat_template,
            tokenizer_name=lm.tokenizer_name,
        )
    return lm, tasks


def _ours(name: str, path: Path, **options) -> list:
    task = get_task(name, **options)
    return [task.parse(r) for r, _ in zip(task.records(str(path)), range(N))]


def test_chat_multiple_choice_equals_lm_evals_apply_chat_template(lm_chat, tiny_chat_model, shared_data):
    lm, tasks = lm_chat
    ours = _ours("arc_easy", shared_data / "arc_easy/arc_easy_test.llmfoundry.jsonl")
    theirs = sorted(tasks["chat_arc"].instances, key=lambda r: (r.doc_id, r.idx))
    scorer = HFScorer(ModelVersion(str(tiny_chat_model)), batch_size=4, chat_template=True)
    read = [chat_instance(scorer.tokenizer, i) for i in ours]
    assert [(i.context_for(k), c) for i in read for k, c in enumerate(i.continuations)] == [
        tuple(r.arguments) for r in theirs
    ]
    assert read[0].contexts[0].startswith("<|im_start|>user\nQuestion: ") and read[0].continuations[0][0] != " "
    want = [ll for ll, _ in lm.loglikelihood(theirs, disable_tqdm=True)]
    got = [ll for out in scorer.loglikelihoods(ours) for ll in out.logliks]
    np.testing.assert_allclose(got, want, atol=1e-4)
    plain = HFScorer(ModelVersion(str(tiny_chat_model)), batch_size=4).loglikelihoods(ours[:1])[0].logliks
    assert not np.allclose(plain, got[: len(plain)])  # the template changed what was scored


def test_chat_generation_equals_lm_evals_apply_chat_template(lm_chat, tiny_chat_model, shared_data):
    lm, tasks = lm_chat
    ours = _ours("gsm8k", shared_data / "gsm8k/test.jsonl", max_new_tokens=12)[:3]
    theirs = sorted(tasks["chat_gsm8k"].instances, key=lambda r: r.doc_id)[:3]
    scorer = HFScorer(ModelVersion(str(tiny_chat_model)), batch_size=4, chat_template=True)
    assert [chat_instance(scorer.tokenizer, i).contexts[0] for i in ours] == [r.arguments[0] for r in theirs]
    assert [o.text for o in scorer.generate(ours)] == lm.generate_until(theirs, disable_tqdm=True)


def test_a_conversation_is_scored_through_the_template(tiny_chat_model, tmp_path):
    task = get_task("gen_jsonl")
    inst = task.parse(Record(0, (json.dumps({"id": "c", "messages": CONVERSATION}),)))
    assert (inst.messages, inst.reference) == (CONVERSATION[:-1], "Rome")
    assert inst.contexts == [plain_text(CONVERSATION[:-1])]
    assert task.training_pair(inst) == (CONVERSATION[:-1], "Rome")
    scorer = HFScorer(ModelVersion(str(tiny_chat_model)), chat_template=True)
    assert chat_instance(scorer.tokenizer, inst).contexts == [render_prompt(scorer.tokenizer, CONVERSATION[:-1])]
    (out,) = scorer.generate([inst])
    (again,) = HFScorer(ModelVersion(str(tiny_chat_model))).generate(
        [
            task.parse(
                Record(
                    0,
                    (json.dumps({"prompt": render_prompt(scorer.tokenizer, CONVERSATION[:-1]), "reference": "Rome"}),),
                )
            )
        ]
    )
    assert out.text == again.text  # the rendered prompt, generated from


def test_score_job_refuses_chat_without_a_template_before_starting_ray(tiny_model, tmp_path):
    from muscle_ray.config import validated
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.scoring.job import run_score

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "p", "reference": "r"}) + "\n")
    cfg = validated(
        ScoreConfig,
        {
            "versions": [{"base": str(tiny_model)}],
            "task": "gen_jsonl",
            "data": str(data),
            "out": str(tmp_path / "o"),
            "chat_template": True,
        },
        "score.yaml",
    )
    with pytest.raises(MuscleError, match="has no chat template"):
        run_score(cfg, log=lambda *_: None)


@pytest.mark.slow
def test_score_job_reads_conversations_through_the_template(ray_session, tiny_chat_model, tmp_path):
    """The Ray job passes chat_template to its actors: the same generations as in-process."""
    from muscle_ray.config import validated
    from muscle_ray.results import read_results
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.scoring.job import run_score

    rows = [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": f"Question: {i}+{i}?"},
                {"role": "assistant", "content": str(2 * i)},
            ],
        }
        for i in range(5)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = validated(
        ScoreConfig,
        {
            "versions": [{"name": "chat", "base": str(tiny_chat_model)}],
            "task": "gen_jsonl",
            "task_options": {"max_new_tokens": 8},
            "data": str(data),
            "out": str(tmp_path / "o"),
            "chat_template": True,
        },
        "score.yaml",
    )
    (summary,) = run_score(cfg, log=lambda *_: None)
    table = read_results(summary.out).to_pandas().sort_values("id")
    task = get_task("gen_jsonl", max_new_tokens=8)
    insts = [task.parse(Record(i, (json.dumps(r),))) for i, r in enumerate(rows)]
    want = [o.text for o in HFScorer(ModelVersion(str(tiny_chat_model)), chat_template=True).generate(insts)]
    assert table["generation"].tolist() == want and table["reference"].tolist() == ["0", "2", "4", "6", "8"]
