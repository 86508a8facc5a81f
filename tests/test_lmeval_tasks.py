"""`lmeval:<task>`: lm-evaluation-harness's own tasks over local files, scored by muscle's job,
agree with lm-eval's `simple_evaluate` + HFLM on the same model and documents.

lm-eval's side reads the same local files through a small YAML that includes the stock task
and swaps its hub dataset for `json` files (nothing goes online); muscle's side overrides the
task's dataset itself (`muscle_ray/tasks/lmeval.py`), so the two paths are independent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from muscle_ray.errors import BadRow, MuscleError  # noqa: E402
from muscle_ray.scoring.config import ScoreConfig  # noqa: E402
from muscle_ray.tasks import Record, get_task  # noqa: E402

pytest.importorskip("lm_eval")

N_MC, N_GEN, SHOTS, GEN_TOKENS = 32, 4, 2, 16


def arc_hf_rows(shared_data: Path, n: int) -> list[dict]:
    """The first n ARC-Easy rows of the shared (llm-foundry) file, in the hub's allenai/ai2_arc columns."""
    rows = [json.loads(x) for x in (shared_data / "arc_easy/arc_easy_test.llmfoundry.jsonl").open().readlines()[:n]]
    return [
        {
            "id": str(i),
            "question": d["query"].removeprefix("Question: "),
            "choices": {"text": d["choices"], "label": list("ABCD")[: len(d["choices"])]},
            "answerKey": "ABCD"[d["gold"]],
        }
        for i, d in enumerate(rows)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def local(shared_data, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lmeval_data")
    return {
        "arc": write_jsonl(tmp / "arc.jsonl", arc_hf_rows(shared_data, N_MC)),
        "gsm8k": write_jsonl(
            tmp / "gsm8k.jsonl", [json.loads(x) for x in (shared_data / "gsm8k/test.jsonl").open().readlines()[:N_GEN]]
        ),
        "gsm8k_train": shared_data / "gsm8k/train_first1000.jsonl",
    }


def parsed(task, path, n=None) -> list:
    out = []
    for record in task.records(str(path)):
        if n is not None and len(out) == n:
            break
        out.append(task.parse(record))
    return out


# --- the family, its errors ---------------------------------------------------------------------


def test_the_prefix_names_an_lm_eval_task_and_refuses_what_muscle_cannot_score():
    task = get_task("lmeval:arc_easy")
    assert (task.name, task.kind, task.metric, task.default_path) == ("lmeval:arc_easy", "mc", "acc", "allenai/ai2_arc")
    assert get_task("lmeval:gsm8k").kind == "gen"
    for name, says in [
        ("lmeval:no_such_task", "has no task 'no_such_task'"),
        ("lmeval:ai2_arc", "an lm-eval group of 2 tasks; score its tasks one by one (lmeval:arc_challenge"),
        ("lmeval:lambada_openai", "output_type loglikelihood; muscle scores lm-eval's multiple_choice"),
        ("lmeval:", "name an lm-eval task after the colon"),
    ]:
        with pytest.raises(MuscleError, match=says.replace("(", r"\(")):
            get_task(name).kind
    with pytest.raises(MuscleError, match="task lmeval:arc_easy: bad option"):
        get_task("lmeval:arc_easy", shots=3)
    with pytest.raises(MuscleError, match="unknown task 'nope'; known tasks: .*lmeval:<task>"):
        get_task("nope")


def test_data_that_is_not_local_fails_in_one_line_naming_the_task(local, tmp_path):
    task = get_task("lmeval:arc_easy")
    cfg = ScoreConfig(versions=[{"base": "m"}], task=task.name, out=str(tmp_path))
    with pytest.raises(
        MuscleError,
        match=r"task lmeval:arc_easy: no input file; give --data PATH or --data-root "
        r"\(the task's file is allenai/ai2_arc\)",
    ):
        cfg.data_path(task.default_path)
    with pytest.raises(
        MuscleError,
        match="task lmeval:gsm8k: num_fewshot=5 takes examples from its 'train' split; "
        "give the task option fewshot_data=FILE",
    ):
        next(get_task("lmeval:gsm8k").records(str(local["gsm8k"])))
    with pytest.raises(MuscleError, match=r"data.txt: task lmeval:arc_easy reads a .jsonl, .json, .parquet, .csv"):
        next(task.records(str(tmp_path / "data.txt")))
    with pytest.raises(MuscleError, match="task lmeval:arc_easy: cannot read its data from"):
        next(task.records(str(write_jsonl(tmp_path / "odd.jsonl", [{"stem": "q"}]))))


# --- records: lm-eval's requests, parsed into Instances -------------------------------------------


def test_requests_are_lm_evals_and_match_the_built_in_task(local, shared_data):
    """lm-eval's arc_easy renders what muscle's own arc_easy renders from the original file."""
    ours = parsed(get_task("lmeval:arc_easy"), local["arc"])
    builtin = parsed(get_task("arc_easy"), shared_data / "arc_easy/arc_easy_test.llmfoundry.jsonl", N_MC)
    assert len(ours) == N_MC and [i.id for i in ours] == [str(k) for k in range(N_MC)]
    for a, b in zip(ours, builtin):
        assert (a.contexts, a.continuations, a.choice_chars, a.label, a.delimiter) == (
            b.contexts,
            b.continuations,
            b.choice_chars,
            b.label,
            b.delimiter,
        )
    assert get_task("lmeval:arc_easy").training_pair(ours[0]) == get_task("arc_easy").training_pair(builtin[0])


def test_a_local_copy_of_the_hub_dataset_under_data_root(local, tmp_path):
    """--data-root ROOT reads ROOT/allenai/ai2_arc as the hub repository, with its config and
    splits (few-shot examples from its train split, as lm-eval draws them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(x) for x in local["arc"].read_text().splitlines()]
    repo = tmp_path / "allenai/ai2_arc"
    (repo / "ARC-Easy").mkdir(parents=True)
    splits = {"train": rows[16:], "validation": rows[8:16], "test": rows[:8]}
    for split, part in splits.items():
        pq.write_table(pa.Table.from_pylist(part), repo / f"ARC-Easy/{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: ARC-Easy\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: ARC-Easy/{s}-*\n" for s in splits)
        + "---\n"
    )
    task = get_task("lmeval:arc_easy", num_fewshot=2)
    path = ScoreConfig(versions=[{"base": "m"}], task=task.name, data_root=str(tmp_path), out="o").data_path(
        task.default_path
    )
    insts = parsed(task, path)
    assert len(insts) == 8 and insts[0].contexts[0].count("Question: ") == 3
    train_questions = {r["question"] for r in splits["train"]}
    shots = [q.split("\nAnswer:")[0] for q in insts[0].contexts[0].split("Question: ")[1:-1]]
    assert all(s in train_questions for s in shots)


def test_generations_are_scored_by_lm_evals_filter_and_process_results(local):
    task = get_task("lmeval:gsm8k", num_fewshot=SHOTS, fewshot_data=str(local["gsm8k_train"]))
    inst = parsed(task, local["gsm8k"], 1)[0]
    assert inst.kind == "gen" and inst.contexts[0].count("Question:") == SHOTS + 1
    assert inst.stop == ["Question:", "</s>", "<|im_end|>"] and inst.max_new_tokens == 256
    assert inst.reference.endswith("#### 18")
    assert task.score_generation(inst, " 16 - 3 - 4 = 9 and 9 * 2 = 18.\n#### 18") == (True, 1.0, "18")
    assert task.score_generation(inst, " #### 1,8") == (True, 1.0, "1,8")  # "," is ignored, as lm-eval does
    assert task.score_generation(inst, " #### 17") == (False, 0.0, "17")
    assert task.score_generation(inst, " The answer is 18.") == (False, 0.0, "[invalid]")  # strict-match
    flexible = get_task("lmeval:gsm8k", num_fewshot=0, filter="flexible-extract")
    first = parsed(flexible, local["gsm8k"], 1)[0]
    assert flexible.score_generation(first, " The answer is 18.") == (True, 1.0, "18.")
    with pytest.raises(MuscleError, match="no filter 'best'; it has strict-match, flexible-extract"):
        next(get_task("lmeval:gsm8k", num_fewshot=0, filter="best").records(str(local["gsm8k"])))


def test_a_document_lm_eval_cannot_render_is_a_bad_row(local):
    task = get_task("lmeval:arc_easy")
    record = next(iter(task.records(str(local["arc"]))))
    item = json.loads(record.lines[0])
    broken = Record(
        5,
        (
            json.dumps(
                {"doc_id": 5, "doc": item["doc"], "error": "lm-eval could not build its requests: KeyError: 'question'"}
            ),
        ),
        "lmeval",
        record.extra,
    )
    with pytest.raises(BadRow, match="lm-eval could not build its requests"):
        task.parse(broken)


# --- against simple_evaluate ---------------------------------------------------------------------


def _lm_eval_yaml(tmp: Path, name: str, stock: str, files: dict[str, Path], extra: str = "") -> None:
    import lm_eval

    split = "test"
    data_files = "".join(f"    {k}: {v}\n" for k, v in files.items())
    (tmp / f"{name}.yaml").write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks' / stock}\ntask: {name}\ndataset_path: json\n"
        f"dataset_name: null\ndataset_kwargs:\n  data_files:\n{data_files}"
        f"training_split: {'train' if 'train' in files else 'null'}\nvalidation_split: null\ntest_split: {split}\n"
        f"{extra}"
    )


def simple_evaluate(model: Path, tmp: Path, task: str, limit: int, **kwargs) -> list[dict]:
    """lm-eval's per-document samples, by doc_id."""
    from lm_eval import simple_evaluate as evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = evaluate(
        model=HFLM(pretrained=str(model), batch_size=4, device="cpu"),
        tasks=[task],
        limit=limit,
        task_manager=TaskManager(include_path=str(tmp), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
        **kwargs,
    )
    return sorted(out["samples"][task], key=lambda s: s["doc_id"])


def run(cfg: dict, tmp: Path):
    from muscle_ray.config import validated
    from muscle_ray.results import read_results
    from muscle_ray.scoring.job import run_score

    (summary,) = run_score(validated(ScoreConfig, {**cfg, "out": str(tmp / "out")}, "score.yaml"), log=lambda *_: None)
    return read_results(summary.out).to_pandas().assign(doc=lambda t: t["id"].astype(int)).sort_values("doc")


@pytest.mark.slow
def test_lmeval_arc_easy_scores_like_simple_evaluate(ray_session, tiny_model, local, tmp_path):
    _lm_eval_yaml(tmp_path, "local_arc_easy", "arc/arc_easy.yaml", {"test": local["arc"]})
    theirs = simple_evaluate(tiny_model, tmp_path, "local_arc_easy", N_MC)
    ours = run(
        {
            "versions": [{"name": "tiny", "base": str(tiny_model)}],
            "task": "lmeval:arc_easy",
            "data": str(local["arc"]),
            "limit": N_MC,
            "batch_size": 4,
        },
        tmp_path,
    )
    assert len(ours) == len(theirs) == N_MC
    assert ours["correct"].tolist() == [s["acc"] == 1.0 for s in theirs]
    assert ours["correct_norm"].tolist() == [s["acc_norm"] == 1.0 for s in theirs]
    assert ours["correct"].mean() == pytest.approx(np.mean([s["acc"] for s in theirs]))
    np.testing.assert_allclose(
        np.concatenate(ours["choice_logliks"].tolist()), [r[0] for s in theirs for r in s["filtered_resps"]], atol=1e-4
    )
    assert ours["reference"].tolist() == [str(s["target"]) for s in theirs]


@pytest.mark.slow
def test_lmeval_gsm8k_generates_and_scores_like_simple_evaluate(ray_session, tiny_model, local, tmp_path):
    _lm_eval_yaml(
        tmp_path,
        "local_gsm8k",
        "gsm8k/gsm8k.yaml",
        {"test": local["gsm8k"], "train": local["gsm8k_train"]},
        f"num_fewshot: {SHOTS}\n",
    )
    theirs = simple_evaluate(tiny_model, tmp_path, "local_gsm8k", N_GEN, gen_kwargs={"max_gen_toks": GEN_TOKENS})
    strict = [s for s in theirs if s["filter"] == "strict-match"]
    ours = run(
        {
            "versions": [{"name": "tiny", "base": str(tiny_model)}],
            "task": "lmeval:gsm8k",
            "task_options": {
                "num_fewshot": SHOTS,
                "fewshot_data": str(local["gsm8k_train"]),
                "max_new_tokens": GEN_TOKENS,
            },
            "data": str(local["gsm8k"]),
        },
        tmp_path,
    )
    assert ours["generation"].tolist() == [s["resps"][0][0] for s in strict]
    assert ours["prediction"].tolist() == [s["filtered_resps"][0] for s in strict]
    assert ours["score"].tolist() == [s["exact_match"] for s in strict]
    assert any(ours["generation"])
