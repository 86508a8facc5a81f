"""Our prompts are lm-evaluation-harness's prompts: checked against lm-eval 0.4.13 itself.

For each task, lm-eval's STOCK task YAML is included by a small YAML that only swaps the
Hugging Face dataset for a local JSON file (so nothing goes online). The local file holds the
first N documents of the real shared file, mapped to the schema lm-eval's YAML expects
(WinoGrande and ARC are llm-foundry re-formats here; PIQA's labels live in a separate file).
lm-eval then builds its requests (`build_all_requests`), and every (context, continuation)
pair, gold index and acc_norm length must equal what our task renders from the real file.
"""

from __future__ import annotations

import json
import os
from itertools import groupby
from os.path import commonprefix
from pathlib import Path

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

from muscle_ray.scoring.encode import cut_at_stop  # noqa: E402
from muscle_ray.tasks import Record, get_task  # noqa: E402

N = 200
FEWSHOT = 3


def _first(path: Path, n: int = N) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _winogrande_original(d: dict) -> dict:
    """llm-foundry row -> original {sentence, option1, option2, answer}: any split point at
    which both contexts share the text before the blank gives lm-eval the same rendering."""
    a, b = d["context_options"]
    before = commonprefix([a, b])
    return {
        "sentence": before + "_ " + d["continuation"],
        "option1": a[len(before) :],
        "option2": b[len(before) :],
        "answer": str(d["gold"] + 1),
    }


def _arc_hf(d: dict, row: int) -> dict:
    """llm-foundry row -> Hugging Face allenai/ai2_arc row."""
    letters = "ABCDE"[: len(d["choices"])]
    return {
        "id": str(row),
        "question": d["query"].removeprefix("Question: "),
        "choices": {"text": d["choices"], "label": list(letters)},
        "answerKey": letters[d["gold"]],
    }


def _local_docs(data: Path) -> dict[str, tuple[str, list[dict]]]:
    """task -> (stock yaml relative to lm_eval/tasks, docs in the schema lm-eval expects)."""
    labels = (data / "piqa/valid-labels.lst").read_text().split()
    return {
        "hellaswag": (
            "hellaswag/hellaswag.yaml",
            [{**d, "label": str(d["label"])} for d in _first(data / "hellaswag/val_sample1000.jsonl")],
        ),
        "piqa": (
            "piqa/piqa.yaml",
            [{**d, "label": int(lab)} for d, lab in zip(_first(data / "piqa/valid.jsonl"), labels)],
        ),
        "winogrande": (
            "winogrande/default.yaml",
            [_winogrande_original(d) for d in _first(data / "winogrande/winogrande_dev.llmfoundry.jsonl")],
        ),
        "arc_easy": (
            "arc/arc_easy.yaml",
            [_arc_hf(d, i) for i, d in enumerate(_first(data / "arc_easy/arc_easy_test.llmfoundry.jsonl"))],
        ),
        "gsm8k": ("gsm8k/gsm8k.yaml", _first(data / "gsm8k/test.jsonl")),
    }


def _yaml(name: str, stock: Path, split: str, files: dict[str, Path], cache: Path, extra: str = "") -> str:
    data_files = "".join(f"    {k}: {v}\n" for k, v in files.items())
    train = "train" if "train" in files else "null"
    return (
        f"include: {stock}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n{data_files}  cache_dir: {cache}\n"
        f"training_split: {train}\nvalidation_split: {'validation' if split == 'validation' else 'null'}\n"
        f"test_split: {'test' if split == 'test' else 'null'}\n{extra}"
    )


@pytest.fixture(scope="module")
def lmeval(shared_data, tmp_path_factory):
    """{our task name (+ variant): lm-eval task with its requests built}."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    stock_root = Path(lm_eval.__file__).parent / "tasks"
    tmp = tmp_path_factory.mktemp("lmeval")
    names, train = {}, shared_data / "gsm8k/train_first1000.jsonl"
    for task, (stock, docs) in _local_docs(shared_data).items():
        split = "test" if task == "gsm8k" else "validation"
        local = tmp / f"{task}.jsonl"
        local.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        files = {split: local, **({"train": train} if task == "gsm8k" else {})}  # gsm8k.yaml has a fewshot_split
        (tmp / f"muscle_{task}.yaml").write_text(
            _yaml(
                f"muscle_{task}",
                stock_root / stock,
                split,
                files,
                tmp / "cache",
                "num_fewshot: 0\n" if task == "gsm8k" else "",
            )
        )
        names[task] = f"muscle_{task}"
    # gsm8k with few-shot examples: lm-eval's first_n sampler over the same train file
    (tmp / "muscle_gsm8k_fewshot.yaml").write_text(
        _yaml(
            "muscle_gsm8k_fewshot",
            stock_root / "gsm8k/gsm8k.yaml",
            "test",
            {"test": tmp / "gsm8k.jsonl", "train": train},
            tmp / "cache",
            f"num_fewshot: {FEWSHOT}\nfewshot_config:\n  sampler: first_n\n",
        )
    )
    names["gsm8k_fewshot"] = "muscle_gsm8k_fewshot"

    loaded = TaskManager(include_path=str(tmp), include_defaults=False).load(list(names.values()))["tasks"]
    out = {}
    for ours, theirs in names.items():
        t = loaded[theirs]
        t.build_all_requests(limit=N, rank=0, world_size=1)
        out[ours] = t
    return out


def _ours(task_name: str, data: Path, **options) -> list:
    task = get_task(task_name, **options)
    out = []
    for record in task.records(str(data / task.default_path)):
        if record.row >= N:
            break
        out.append(task.parse(record))
    return out


@pytest.mark.parametrize("name", ["hellaswag", "piqa", "winogrande", "arc_easy"])
def test_multiple_choice_requests_equal_lmevals(name, lmeval, shared_data):
    theirs = lmeval[name]
    ours = _ours(name, shared_data)
    requests = sorted(theirs.instances, key=lambda r: (r.doc_id, r.idx))
    per_doc = [list(g) for _, g in groupby(requests, key=lambda r: r.doc_id)]
    assert len(per_doc) == len(ours) == N
    for inst, reqs in zip(ours, per_doc):
        doc = reqs[0].doc
        pairs = [(inst.context_for(i), inst.continuations[i]) for i in range(len(inst.continuations))]
        assert pairs == [r.arguments for r in reqs], f"{name} row {reqs[0].doc_id}"
        gold = theirs.doc_to_text(doc) if theirs.multiple_input else theirs.doc_to_target(doc)
        assert inst.label == int(gold)
        assert inst.choice_chars == [len(c) for c in theirs.doc_to_choice(doc)]


@pytest.mark.parametrize(
    "variant, options",
    [
        ("gsm8k", {}),
        ("gsm8k_fewshot", {"num_fewshot": FEWSHOT, "fewshot_path": "gsm8k/train_first1000.jsonl"}),
    ],
)
def test_gsm8k_requests_equal_lmevals(variant, options, lmeval, shared_data):
    if "fewshot_path" in options:
        options = {**options, "fewshot_path": str(shared_data / options["fewshot_path"])}
    ours = _ours("gsm8k", shared_data, **options)
    requests = sorted(lmeval[variant].instances, key=lambda r: r.doc_id)
    assert len(requests) == len(ours) == N
    for inst, req in zip(ours, requests):
        context, gen_kwargs = req.arguments
        assert inst.contexts == [context], f"gsm8k row {req.doc_id}"
        assert inst.stop == gen_kwargs["until"]
    assert ours[0].contexts[0].count("Question:") == 1 + (FEWSHOT if options else 0)


def test_gsm8k_scoring_equals_lmevals_filter_and_metric(lmeval):
    """Our strict-match + exact_match against lm-eval's own RegexFilter and exact_match."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    theirs = lmeval["gsm8k"]
    ours = get_task("gsm8k")
    cfg = next(m for m in theirs.config.metric_list if m["metric"] == "exact_match")
    kwargs = {k: cfg[k] for k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    strict = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)")
    generations = [
        " She makes 9 * 2 = $18.\n#### 18",
        " #### $18",
        " #### 18.",
        " #### 1,8",
        "#### -3",
        " #### 18 and #### 19",
        " The answer is 18.",
        " ####18",
        " #### 18\n\nQuestion: x",
        " #### 18.00",
        " #### 0.5",
        "",
        " #### 1.8",
    ]
    for doc in theirs.eval_docs.select(range(5)):
        inst = ours.parse(Record(0, (json.dumps(doc),)))
        for gen in generations + [" " + doc["answer"]]:
            cut = gen.split("Question:")[0]  # lm-eval's generate_until stops there
            (pred,) = strict.apply([[cut]], [doc])[0]
            want = exact_match_hf_evaluate([pred], [theirs.doc_to_target(doc)], **kwargs)["exact_match"]
            correct, score, _ = ours.score_generation(inst, cut_at_stop(gen, inst.stop))  # a scorer's cut
            assert (correct, score) == (bool(want), float(want)), (gen, doc["answer"][-12:])
