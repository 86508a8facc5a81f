"""The generic user-data tasks (mc_jsonl, gen_jsonl), the shared record plumbing, the registry."""

from __future__ import annotations

import json

import pytest

from muscle_ray.errors import BadRow, MuscleError
from muscle_ray.scoring.encode import cut_at_stop
from muscle_ray.tasks import Record, get_task, task_names


def _write(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(p)


def _parse_all(task, path):
    """(instances, {row: reason}) the way the scoring job sees a file."""
    good, bad = [], {}
    for record in task.records(path):
        try:
            good.append(task.parse(record))
        except BadRow as e:
            assert e.row == record.row
            bad[record.row] = e.reason
    return good, bad


def test_mc_jsonl_renders_and_reports_bad_rows(tmp_path):
    rows = [
        json.dumps({"id": "q-a", "context": "Question: 2+2?\nAnswer:", "choices": ["4", "22"], "label": 0}),
        json.dumps(
            {"context": "The sky is", "choices": ["blue", "green", "red"], "label": "2", "target_delimiter": ""}
        ),
        "",  # blank lines are not records
        '{"context": "x", "choices": ["a", "b"], "label": 0',  # truncated
        json.dumps({"context": "x", "choices": ["a", "b"]}),
        json.dumps({"context": "x", "choices": ["a", "b"], "label": 2}),
        json.dumps({"context": "x", "choices": [], "label": 0}),
        json.dumps({"context": "x", "choices": ["a", ""], "label": 0}),
        json.dumps({"context": 5, "choices": ["a"], "label": 0}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"context": "x", "choices": ["a", "b"], "label": True}),
    ]
    good, bad = _parse_all(get_task("mc_jsonl"), _write(tmp_path, rows))
    a, b = good
    assert (a.id, a.contexts, a.continuations, a.choice_chars, a.label, a.reference) == (
        "q-a",
        ["Question: 2+2?\nAnswer:"],
        [" 4", " 22"],
        [1, 2],
        0,
        "0",
    )
    assert (b.id, b.continuations, b.choice_chars, b.label) == ("1", ["blue", "green", "red"], [4, 5, 3], 2)
    assert b.context_for(1) == "The sky is"
    assert bad[3].startswith("invalid JSON")
    assert bad[4] == "missing field 'label'"
    assert bad[5] == "label 2 out of range for 2 options"
    assert bad[6] == "no options"
    assert bad[7] == "empty choice: option 1 is an empty string"
    assert bad[8] == "field 'context' must be a string, got int"
    assert "expected a JSON object" in bad[9]
    assert "must be an integer" in bad[10]
    assert get_task("mc_jsonl").training_pair(a) == ("Question: 2+2?\nAnswer:", " 4")


def test_records_keep_invalid_utf8_as_a_bad_row(tmp_path):
    p = tmp_path / "bytes.jsonl"
    p.write_bytes(
        b'{"context": "\xff", "choices": ["a"], "label": 0}\n{"context": "ok", "choices": ["a"], "label": 0}\r\n'
    )
    good, bad = _parse_all(get_task("mc_jsonl"), str(p))
    assert [i.contexts for i in good] == [["ok"]] and bad == {0: "not valid UTF-8"}


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(MuscleError, match="no such file"):
        list(get_task("mc_jsonl").records(str(tmp_path / "absent.jsonl")))


def test_gen_jsonl_exact_and_rouge(tmp_path):
    rows = [json.dumps({"prompt": "Capital of France?", "reference": "Paris"}), json.dumps({"id": 42, "prompt": "p"})]
    task = get_task("gen_jsonl")
    good, bad = _parse_all(task, _write(tmp_path, rows))
    (inst,) = good
    assert bad == {1: "missing field 'reference'"}
    assert (inst.id, inst.contexts, inst.stop, inst.max_new_tokens) == ("0", ["Capital of France?"], ["\n\n"], 256)
    assert task.metric == "exact"
    assert task.score_generation(inst, cut_at_stop(" Paris\n\nQuestion: next", inst.stop)) == (True, 1.0, " Paris")
    assert task.score_generation(inst, " Lyon") == (False, 0.0, " Lyon")
    assert task.training_pair(inst) == ("Capital of France?", "Paris")  # your text, no delimiter added

    rouge = get_task("gen_jsonl", metric="rouge1", stop="###", max_new_tokens="32")
    inst = rouge.parse(Record(0, (json.dumps({"prompt": "p", "reference": "the cat sat on the mat"}),)))
    assert (rouge.metric, inst.stop, inst.max_new_tokens) == ("rouge1", ["###"], 32)
    correct, score, pred = rouge.score_generation(inst, cut_at_stop("the cat sat###the mat", inst.stop))
    assert correct is None and pred == "the cat sat"
    assert score == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 3/3, R = 3/6


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"metric": "bleu"}, "metric"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_task_options_are_user_errors(options, fragment):
    with pytest.raises(MuscleError, match=f"task gen_jsonl: bad option.*{fragment}"):
        get_task("gen_jsonl", **options)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(MuscleError) as e:
        get_task("hellaswagg")
    assert "unknown task 'hellaswagg'" in str(e.value)
    for name in task_names():
        assert name in str(e.value)
    assert {"mc_jsonl", "gen_jsonl"} <= set(task_names())


def test_the_package_registers_every_task_its_modules_define():
    """A fresh `import muscle_ray.tasks` registers each task class defined in any module of the
    package: discovery, not an import list, finds them."""
    import importlib
    import inspect
    import pkgutil
    import subprocess
    import sys

    import muscle_ray.tasks as package
    from muscle_ray.tasks import Task

    defined = set()
    for module in pkgutil.iter_modules(package.__path__):
        mod = importlib.import_module(f"muscle_ray.tasks.{module.name}")
        defined |= {
            c.name
            for c in vars(mod).values()
            if inspect.isclass(c) and issubclass(c, Task) and c.__module__ == mod.__name__ and "name" in vars(c)
        }
    fresh = subprocess.run(
        [sys.executable, "-c", "import muscle_ray.tasks as t; print(' '.join(t.task_names()))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert set(fresh) == defined
    assert {
        "arc_easy",
        "arc_challenge",
        "dialogsum",
        "gen_jsonl",
        "gsm8k",
        "hellaswag",
        "mc_jsonl",
        "piqa",
        "winogrande",
    } <= defined


def test_a_dropped_in_module_registers_itself(tmp_path, monkeypatch):
    """One new module with an `@register`ed class is all a new task takes."""
    from muscle_ray.tasks import base, import_modules

    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the new task leaves with the test
    package = tmp_path / "my_tasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "shout.py").write_text(
        "from muscle_ray.tasks.base import register\n"
        "from muscle_ray.tasks.common import GenerativeTask, need\n\n\n"
        "@register\n"
        "class Shout(GenerativeTask):\n"
        "    name = 'shout'\n"
        "    metric = 'exact'\n\n"
        "    def instance(self, doc, row):\n"
        "        return self.generation(str(row), need(doc, 'text', str, row), need(doc, 'text', str, row).upper())\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_modules("my_tasks", [str(package)]) == ["my_tasks.shout"]
    task = get_task("shout")
    inst = task.parse(Record(0, (json.dumps({"text": "hi"}),)))
    assert (inst.reference, task.score_generation(inst, " HI")[:2]) == ("HI", (True, 1.0))
    assert "shout" in task_names()


def test_gen_jsonl_reads_training_files_as_they_are(tmp_path):
    """prompt/completion rows and chat conversations (JSON Lines or Parquet) score as they train."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    talk = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    rows = [
        {"id": "pc", "prompt": "2+2=", "completion": "4"},
        {"id": "chat", "messages": talk},
        {"id": "bad", "messages": talk[:2]},
    ]
    task = get_task("gen_jsonl")
    for path in (_write(tmp_path, [json.dumps(r) for r in rows]), str(tmp_path / "data.parquet")):
        if path.endswith(".parquet"):
            columns = {"prompt": None, "completion": None, "messages": None}  # a table has every column
            pq.write_table(pa.Table.from_pylist([{**columns, **r} for r in rows]), path)
        (pc, chat), bad = _parse_all(task, path)
        assert (pc.contexts, pc.reference, pc.messages) == (["2+2="], "4", None)
        assert (chat.id, chat.messages, chat.reference) == ("chat", talk[:2], "Paris")
        assert chat.contexts == ["Be brief.\n\nCapital of France?\n\n"]  # read without a chat template
        assert bad == {2: "the last message must be the assistant's answer"}
