"""Built-in tasks on the real shared files: counts, known rows, labels, ids, bad rows, scoring."""

from __future__ import annotations

import collections
import json

import pytest

from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.scoring.encode import cut_at_stop
from muscle_ray.tasks import Record, get_task
from muscle_ray.tasks.gsm8k import extract_answer
from muscle_ray.tasks.hellaswag import LLAMACPP


def load(name: str, path, **options):
    """All instances of a file, failing on any bad row (the shared files are clean)."""
    task = get_task(name, **options)
    return [task.parse(record) for record in task.records(str(path))]


def labels(instances) -> dict[int, int]:
    return dict(sorted(collections.Counter(i.label for i in instances).items()))


def parse_line(name: str, line: str, **options):
    return get_task(name, **options).parse(Record(0, (line,)))


def parse_error(name: str, record: str | Record, **options) -> str:
    """The reason a record (a JSON line, as row 7, or a Record at row 7) is a bad row."""
    with pytest.raises(BadRow) as e:
        get_task(name, **options).parse(Record(7, (record,)) if isinstance(record, str) else record)
    assert e.value.row == 7
    return e.value.reason


# --- counts and label balance, as documented in each SOURCE.md -----------------------------


@pytest.mark.parametrize(
    "name, path, count, label_counts",
    [
        ("hellaswag", None, 1000, {0: 267, 1: 228, 2: 266, 3: 239}),
        ("hellaswag", "hellaswag/val_first2000.llamacpp.txt", 2000, {0: 521, 1: 469, 2: 521, 3: 489}),
        ("piqa", None, 1838, {0: 910, 1: 928}),
        ("winogrande", None, 1267, {0: 628, 1: 639}),
        ("arc_easy", None, 2376, {0: 565, 1: 592, 2: 634, 3: 585}),
        ("gsm8k", None, 1319, {None: 1319}),
        ("dialogsum", None, 500, {None: 500}),
    ],
)
def test_real_files_load_completely(shared_data, name, path, count, label_counts):
    task = get_task(name)
    insts = load(name, shared_data / (path or task.default_path))
    assert len(insts) == count and labels(insts) == label_counts
    assert len({i.id for i in insts}) == count  # ids are unique
    assert all(i.task == name and i.kind == task.kind for i in insts)
    if task.kind == "mc":
        assert all(
            i.reference == str(i.label) and i.choice_chars == [len(c) - 1 for c in i.continuations]
            for i in insts
            if len(i.contexts) == 1
        )


# --- known rows ------------------------------------------------------------------------------


def test_hellaswag_known_rows(shared_data):
    insts = {i.id: i for i in load("hellaswag", shared_data / "hellaswag/val_sample1000.jsonl")}
    pole = insts["20022"]  # ids are the records' `ind`
    assert pole.contexts == [
        "Pole vault: Pole vault is a sport where you run with a pole and stop and swing your body. A few women"
    ]  # ctx_b capitalised, as lm-eval does
    assert pole.continuations[3] == " are in the gym practicing to do this pole vault, trying to do their best."
    assert pole.label == 3
    wikihow = insts["670"]  # WikiHow markup removed
    assert wikihow.contexts[0].startswith("Sports and Fitness: How to bowl the leg spinner's variations. To bowl")
    assert "[" not in wikihow.contexts[0] and wikihow.continuations[0].startswith("  If you're outside")


def test_hellaswag_llamacpp_text_agrees_with_jsonl(shared_data):
    """Item k of the text file is val row k: same endings and gold as the jsonl record with
    val_index k; the context differs only by lm-eval's capitalisation of ctx_b."""
    d = shared_data / "hellaswag"
    text = load("hellaswag", d / "val_first2000.llamacpp.txt")
    assert (text[0].id, text[0].label, text[0].contexts) == (
        "0",
        3,
        ["Roof shingle removal: A man is sitting on a roof. he"],
    )
    val_index = [int(x) for x in (d / "val_sample1000.val_index.txt").read_text().split()]
    shared = [(j, text[k]) for j, k in zip(load("hellaswag", d / "val_sample1000.jsonl"), val_index) if k < 2000]
    assert len(shared) == 707
    for j, t in shared:
        assert (t.continuations, t.label) == (j.continuations, j.label)
        assert t.contexts[0].lower() == j.contexts[0].lower()


def test_piqa_labels_from_the_file_beside(shared_data, tmp_path):
    insts = load("piqa", shared_data / "piqa/valid.jsonl")
    dresser = insts[1]
    assert dresser.contexts == ["Question: dresser\nAnswer:"]
    assert dresser.continuations == [" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "]
    assert (dresser.id, dresser.label, insts[0].label) == ("1", 1, 0)

    # a labels file named explicitly; a misaligned one is refused
    lines = (shared_data / "piqa/valid.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    data = tmp_path / "dev.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "gold.lst").write_text("1\n0\n1\n")
    assert [i.label for i in load("piqa", data, labels=str(tmp_path / "gold.lst"))] == [1, 0, 1]
    (tmp_path / "dev-labels.lst").write_text("1\n0\n")
    with pytest.raises(MuscleError, match="2 labels for 3 rows"):
        load("piqa", data)
    with pytest.raises(MuscleError, match="no such labels file"):
        load("piqa", data, labels=str(tmp_path / "absent.lst"))


def test_piqa_without_labels_file_uses_a_label_field(tmp_path):
    data = tmp_path / "export.jsonl"
    data.write_text(
        json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": 1})
        + "\n"
        + json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
        + "\n"
    )
    task = get_task("piqa")
    first, second = task.records(str(data))
    assert task.parse(first).label == 1
    with pytest.raises(BadRow, match="missing field 'label'.*labels file"):
        task.parse(second)


def test_winogrande_both_layouts(shared_data):
    first = load("winogrande", shared_data / "winogrande/winogrande_dev.llmfoundry.jsonl")[0]
    assert first.contexts == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert first.continuations == [" always got the easier cases."] * 2 and first.label == 1
    task = get_task("winogrande")
    original = parse_line(
        "winogrande",
        json.dumps(
            {
                "qID": "3D5G8J4N5CI2K40F4RZLF9OG2CKVTH-2",
                "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
                "option1": "Sarah",
                "option2": "Maria",
                "answer": "2",
            }
        ),
    )
    assert (original.contexts, original.continuations, original.label) == (first.contexts, first.continuations, 1)
    assert original.id == "3D5G8J4N5CI2K40F4RZLF9OG2CKVTH-2" and original.choice_chars == [51, 51]
    assert task.training_pair(original) == (
        "Sarah was a much better surgeon than Maria so Maria",
        " always got the easier cases.",
    )
    no_blank = {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}
    assert parse_error("winogrande", json.dumps(no_blank)) == "field 'sentence' has no blank '_'"
    no_options = {"context_options": [], "continuation": "x", "gold": 0}
    assert parse_error("winogrande", json.dumps(no_options)) == "no options"


def test_arc_three_layouts(shared_data):
    first = load("arc_easy", shared_data / "arc_easy/arc_easy_test.llmfoundry.jsonl")[0]
    assert first.contexts == [
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    ]
    assert first.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems." and first.label == 0
    ai2 = {
        "id": "Mercury_7",
        "question": {
            "stem": "Which is a gas?",
            "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}, {"text": "rock", "label": "C"}],
        },
        "answerKey": "B",
    }
    hf = {
        "id": "Mercury_7",
        "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    }
    for doc in (ai2, hf):
        inst = parse_line("arc_easy", json.dumps(doc))
        assert (inst.id, inst.contexts, inst.continuations, inst.label) == (
            "Mercury_7",
            ["Question: Which is a gas?\nAnswer:"],
            [" ice", " steam", " rock"],
            1,
        )
    assert parse_error("arc_easy", json.dumps({**ai2, "answerKey": "E"})).startswith("answerKey 'E' is not one of")
    assert (
        parse_error("arc_easy", json.dumps({"query": "Question: q", "choices": ["a", "b"], "gold": 4}))
        == "label 4 out of range for 2 options"
    )
    assert parse_line("arc_challenge", json.dumps(ai2)).task == "arc_challenge"


# --- gsm8k ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "generation, extracted",
    [
        (" 9 * 2 = 18\n#### 18", "18"),
        ("#### -3", "-3"),
        ("#### 1,600.", "1,600."),
        ("#### 18 then #### 19", "18"),
        ("The answer is 18.", "[invalid]"),
        ("####18", "[invalid]"),
        ("#### $18", "[invalid]"),
        ("", "[invalid]"),
    ],
)
def test_gsm8k_strict_match_extraction(generation, extracted):
    assert extract_answer(generation) == extracted


def test_gsm8k_scoring_on_real_rows(shared_data):
    task = get_task("gsm8k")
    insts = load("gsm8k", shared_data / "gsm8k/test.jsonl")
    janet, comma = insts[0], insts[146]  # answers "#### 18", "#### 2,125"
    assert janet.contexts[0].startswith("Question: Janet’s ducks lay 16 eggs")
    assert janet.contexts[0].endswith("\nAnswer:")
    assert janet.stop == ["Question:", "</s>", "<|im_end|>"] and janet.max_new_tokens == 256

    def score(inst, generation):
        """As a scorer returns it: the generation cut at the instance's stop strings, once."""
        return task.score_generation(inst, cut_at_stop(generation, inst.stop))

    assert score(janet, " 16-3-4=9, 9*2=18\n#### 18\n\nQuestion: next one #### 5") == (
        True,
        1.0,
        " 16-3-4=9, 9*2=18\n#### 18\n\n",
    )
    assert score(janet, " #### 18.")[:2] == (True, 1.0)  # trailing "." ignored
    assert score(janet, " The answer is 18.")[:2] == (False, 0.0)  # strict: needs "####"
    assert score(janet, "Question: #### 18")[:2] == (False, 0.0)  # stopped before it
    assert score(comma, " #### 2125")[:2] == (True, 1.0)  # "," ignored on both sides
    assert score(comma, " #### 2,125")[:2] == (True, 1.0)
    uncut = " #### 18\n\nQuestion: #### 5"
    assert task.score_generation(janet, uncut)[2] == uncut  # the task never cuts a second time
    assert task.training_pair(janet) == (janet.contexts[0], " " + janet.reference)


def test_gsm8k_fewshot_prefix(shared_data):
    train = shared_data / "gsm8k/train_first1000.jsonl"
    shot = json.loads(train.read_text(encoding="utf-8").splitlines()[0])
    inst = load("gsm8k", shared_data / "gsm8k/test.jsonl", num_fewshot=1, fewshot_path=str(train))[0]
    assert inst.contexts[0].startswith(f"Question: {shot['question']}\nAnswer: {shot['answer']}\n\nQuestion: Janet")
    with pytest.raises(MuscleError, match="needs fewshot_path"):
        get_task("gsm8k", num_fewshot=5)
    with pytest.raises(MuscleError, match="only 1000 examples"):
        get_task("gsm8k", num_fewshot=1001, fewshot_path=str(train))


# --- dialogsum -----------------------------------------------------------------------------


def test_dialogsum_prompt_and_rouge1(shared_data):
    path = shared_data / "dialogsum/dialogsum.test.jsonl"
    task = get_task("dialogsum")
    first = load("dialogsum", path)[0]
    assert first.id == "test_0" and task.metric == "rouge1"
    assert first.contexts[0].startswith(
        "Dialogue: #Person1#: Ms. Dawson, I need you to take a dictation for me.\n#Person2#:"
    )
    assert first.contexts[0].endswith("\nSummary:")
    assert first.stop == ["Dialogue:", "Summary:", "</s>", "\n\n"]
    assert first.reference.startswith("Ms. Dawson helps #Person1# to write a memo")

    cut = cut_at_stop(" " + first.reference + "\n\nDialogue: #Person1#: more", first.stop)  # as the scorers return it
    correct, score, pred = task.score_generation(first, cut)
    assert (correct, score, pred) == (None, pytest.approx(1.0), " " + first.reference)
    _, partial, _ = task.score_generation(first, " Ms. Dawson writes a memo about Instant Messaging.")
    _, unrelated, _ = task.score_generation(first, " The weather was sunny at the beach.")
    assert 1.0 > partial > unrelated >= 0.0

    other = load("dialogsum", path, reference="summary2")[0]
    assert other.reference.startswith("In order to prevent employees from wasting time")
    assert task.training_pair(first) == (first.contexts[0], " " + first.reference)
    dev = json.dumps({"fname": "dev_0", "dialogue": "d", "summary": "s"})  # train/dev: one summary
    assert parse_line("dialogsum", dev).reference == "s"
    assert parse_line("dialogsum", dev, reference="summary").reference == "s"
    assert parse_error("dialogsum", dev, reference="summary1") == "missing field 'summary1'"


# --- bad rows in the built-in formats -------------------------------------------------------


@pytest.mark.parametrize(
    "name, raw, reason",
    [
        (
            "hellaswag",
            '{"ind": 1, "activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x"], "label": 1}',
            "label 1 out of range for 1 options",
        ),
        (
            "hellaswag",
            '{"ind": 1, "activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": [], "label": 0}',
            "no options",
        ),
        (
            "hellaswag",
            '{"ind": 1, "activity_label": "a", "ctx_b": "c", "endings": ["x"], "label": 0}',
            "missing field 'ctx_a'",
        ),
        (
            "hellaswag",
            '{"ind": 1, "activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": ["x", "[step]"], "label": 0}',
            "empty choice: option 1 is an empty string",
        ),
        ("hellaswag", Record(7, ("A: b", "0", "x"), LLAMACPP), "incomplete item: 3 of 6 lines"),
        ("piqa", Record(7, ('{"goal": "g", "sol1": "a"}',), extra={"label": "0"}), "missing field 'sol2'"),
        (
            "piqa",
            Record(7, ('{"goal": "g", "sol1": "a", "sol2": "b"}',), extra={"label": "2"}),
            "label 2 out of range for 2 options",
        ),
        (
            "piqa",
            Record(7, ('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}',), extra={"label": "x"}),
            "field 'label' must be an integer, got 'x'",
        ),  # the labels file wins over the record's own field
        ("gsm8k", '{"question": "q"}', "missing field 'answer'"),
        ("dialogsum", '{"fname": "t", "dialogue": 3, "summary1": "s"}', "field 'dialogue' must be a string, got int"),
    ],
)
def test_bad_rows_name_the_reason(name, raw, reason):
    assert parse_error(name, raw) == reason


def test_hellaswag_text_file_with_a_truncated_last_item(shared_data, tmp_path):
    lines = (shared_data / "hellaswag/val_first2000.llamacpp.txt").read_text(encoding="utf-8").splitlines()[:9]
    path = tmp_path / "cut.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = get_task("hellaswag")
    first, second = task.records(str(path))
    assert (first.row, second.row) == (0, 1) and task.parse(first).label == 3
    assert second.lines == tuple(lines[6:9]) and second.text == "\n".join(lines[6:9])
    with pytest.raises(BadRow, match="incomplete item: 3 of 6 lines"):
        task.parse(second)


# --- training splits -------------------------------------------------------------------------


def _first_rows(path, n=3) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()[:n]]


def _write(path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _train_files(shared_data, root) -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """task -> (a train file in the release's layout under `root`, the pairs it must give),
    made from the shared eval rows (only GSM8K's train split is in the shared data)."""
    arc = _first_rows(shared_data / "arc_easy/arc_easy_test.llmfoundry.jsonl")
    ai2 = [
        {
            "id": f"Mercury_{i}",
            "question": {
                "stem": d["query"].removeprefix("Question: "),
                "choices": [{"text": t, "label": "ABCD"[k]} for k, t in enumerate(d["choices"])],
            },
            "answerKey": "ABCD"[d["gold"]],
        }
        for i, d in enumerate(arc)
    ]
    piqa = _first_rows(shared_data / "piqa/valid.jsonl")
    piqa_labels = (shared_data / "piqa/valid-labels.lst").read_text().split()[:3]
    wino = _first_rows(shared_data / "winogrande/winogrande_dev.llmfoundry.jsonl")
    wino_original = []
    for i, d in enumerate(wino):
        a, b = d["context_options"]
        cut = next(k for k in range(len(a)) if a[k] != b[k])
        before = a[: a.rfind(" ", 0, cut) + 1]
        wino_original.append(
            {
                "qID": f"q{i}",
                "sentence": before + "_ " + d["continuation"],
                "option1": a[len(before) :],
                "option2": b[len(before) :],
                "answer": str(d["gold"] + 1),
            }
        )
    hella = _first_rows(shared_data / "hellaswag/val_sample1000.jsonl")
    dialog = [
        {"fname": f"train_{i}", "dialogue": d["dialogue"], "summary": d["summary1"], "topic": d["topic1"]}
        for i, d in enumerate(_first_rows(shared_data / "dialogsum/dialogsum.test.jsonl"))
    ]
    (root / "piqa").mkdir(parents=True, exist_ok=True)
    (root / "piqa/train-labels.lst").write_text("\n".join(piqa_labels) + "\n")
    return {
        "arc_easy": (
            _write(root / "arc_easy/ARC-Easy-Train.jsonl", ai2),
            [(d["query"] + "\nAnswer:", " " + d["choices"][d["gold"]]) for d in arc],
        ),
        "piqa": (
            _write(root / "piqa/train.jsonl", piqa),
            [(f"Question: {d['goal']}\nAnswer:", " " + d[f"sol{int(lab) + 1}"]) for d, lab in zip(piqa, piqa_labels)],
        ),
        "winogrande": (
            _write(root / "winogrande/train_xl.jsonl", wino_original),
            [(d["context_options"][d["gold"]], " " + d["continuation"]) for d in wino],
        ),
        "hellaswag": (
            _write(root / "hellaswag/hellaswag_train.jsonl", hella),
            [
                (i.contexts[0], i.continuations[i.label])
                for i in load("hellaswag", shared_data / "hellaswag/val_sample1000.jsonl")[:3]
            ],
        ),
        "dialogsum": (
            _write(root / "dialogsum/dialogsum.train.jsonl", dialog),
            [(f"Dialogue: {d['dialogue']}\nSummary:", " " + d["summary"]) for d in dialog],
        ),
    }


@pytest.mark.parametrize("name", ["arc_easy", "piqa", "winogrande", "hellaswag", "dialogsum"])
def test_training_split_in_the_release_layout(shared_data, tmp_path, name):
    """`data: {task: NAME, path: <train file>}`, or `{task: NAME, data_root: ROOT}` for the
    task's own training_path there, gives the gold answers as (prompt, completion) pairs."""
    from muscle_ray.training.config import DataConfig
    from muscle_ray.training.data import read_pairs

    path, want = _train_files(shared_data, tmp_path)[name]
    pairs = [(p["prompt"], p["completion"]) for p in read_pairs(path, task=name)]
    assert pairs == want
    assert DataConfig(task=name, data_root=str(tmp_path)).path == path  # the task's training_path under the root


def test_gsm8k_training_split_from_the_shared_data(shared_data):
    from muscle_ray.training.config import DataConfig
    from muscle_ray.training.data import read_pairs

    data = DataConfig(task="gsm8k", data_root=str(shared_data))
    pairs = read_pairs(data.path, task=data.task)
    first = json.loads((shared_data / "gsm8k/train_first1000.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert len(pairs) == 1000
    assert pairs[0] == {"prompt": f"Question: {first['question']}\nAnswer:", "completion": " " + first["answer"]}


def test_training_split_from_a_hugging_face_parquet_shard(shared_data, tmp_path):
    """ARC's hub train shard (Parquet, `choices: {text, label}`) reads like its JSON Lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from muscle_ray.training.data import read_pairs

    arc = _first_rows(shared_data / "arc_easy/arc_easy_test.llmfoundry.jsonl")
    rows = [
        {
            "id": f"x{i}",
            "question": d["query"].removeprefix("Question: "),
            "choices": {"text": d["choices"], "label": list("ABCD")},
            "answerKey": "ABCD"[d["gold"]],
        }
        for i, d in enumerate(arc)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train-00000-of-00001.parquet")
    pairs = read_pairs(str(tmp_path / "train-00000-of-00001.parquet"), task="arc_easy")
    assert [p["completion"] for p in pairs] == [" " + d["choices"][d["gold"]] for d in arc]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "answerKey": "Z"}) + "\n")
    with pytest.raises(MuscleError, match=f"{bad}: row 1: answerKey 'Z' is not one of the choice labels"):
        read_pairs(str(bad), task="arc_easy")
