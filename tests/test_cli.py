"""The command layer: one registry, `--config` + `--set` on every command that reads settings,
one error line (exit 2) naming the file and the field, `--version`, `muscle tasks`."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from muscle_ray.cli import COMMANDS, main
from muscle_ray.config import load_config, parse_overrides, read_yaml, with_overrides
from muscle_ray.errors import MuscleError

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"muscle {version('muscle-ray')}"


def test_tasks_lists_every_registered_task_with_kind_and_doc(capsys):
    from muscle_ray.tasks import get_task, task_names

    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == task_names()
    for line in lines:
        name, kind, metric, doc = line.split(None, 3)
        assert (kind, metric) == (get_task(name).kind, get_task(name).metric) and doc[0].isupper()
    assert any(line.startswith("hellaswag") and "HellaSwag" in line for line in lines)


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["nonsense"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _flips_config(tmp_path: Path) -> Path:
    path = tmp_path / "flips.yaml"
    path.write_text(yaml.safe_dump({"old": "old.parquet", "new": "new.parquet"}))
    return path


def _demo_config(tmp_path: Path) -> Path:
    from muscle_ray.demo import SCORING

    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({"out": str(tmp_path / "demo"), "tasks": list(SCORING)[:1]}))
    return path


def _update_config(tmp_path: Path) -> Path:
    path = tmp_path / "update.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "old": "models/v1",
                "new": "models/v2",
                "tasks": [{"task": "mc_jsonl", "data": "test.jsonl", "train": "train.jsonl"}],
            }
        )
    )
    return path


# (command, config file, a --set that names a bad field, the dotted field the error must name)
BAD_SETS = [
    ("score", lambda tmp: REPO / "jobs/configs/score.yaml", "batch_size=0", "batch_size"),
    ("score", lambda tmp: REPO / "jobs/configs/score.yaml", "versions.1.adapterr=x", "versions[1].adapterr"),
    ("train-adapter", lambda tmp: REPO / "jobs/configs/train_adapter.yaml", "optim.lrr=1", "optim.lrr"),
    ("train-compat", lambda tmp: REPO / "jobs/configs/train_compat.yaml", "compat.mask=nope", "compat.mask"),
    ("flips", _flips_config, "epsilon=-1", "epsilon"),
    ("serve", lambda tmp: REPO / "serve/config.yaml", "limits.max_tokens=-1", "limits.max_tokens"),
    ("demo", _demo_config, "score_batch_size=0", "score_batch_size"),
    ("update", _update_config, "scoring.batch_size=0", "scoring.batch_size"),
    ("plan", lambda tmp: REPO / "jobs/configs/train_compat.yaml", "compat.temperature=0", "compat.temperature"),
]


def test_every_command_that_reads_settings_takes_config_and_set():
    assert {name for name, *_ in BAD_SETS} == set(COMMANDS) - {"tasks"}


@pytest.mark.parametrize("command, config, setting, field", BAD_SETS, ids=[f"{c}-{f}" for c, _, _, f in BAD_SETS])
def test_a_bad_set_is_one_line_naming_file_and_field(command, config, setting, field, tmp_path, capsys):
    path = config(tmp_path)
    assert main([command, "--config", str(path), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"muscle {command}: error: {path}") and err.count("\n") == 1, err
    assert f"field '{field}'" in err, err


def test_set_needs_key_and_value(capsys):
    assert main(["train-adapter", "--config", str(REPO / "jobs/configs/train_adapter.yaml"), "--set", "optim.lr"]) == 2
    assert "--set 'optim.lr': expected KEY=VALUE" in capsys.readouterr().err


def test_without_a_file_the_error_names_the_command_line(capsys, tmp_path):
    assert main(["train-compat", "--set", "base=m", "--out", str(tmp_path / "o"), "--data", "d.jsonl"]) == 2
    assert "muscle train-compat: error: command line: field 'compat': Field required" in capsys.readouterr().err


def test_file_then_set_then_flags():
    """Later wins: the YAML file, then --set, then the command's own flags."""
    import argparse

    from muscle_ray.cli import score

    parser = argparse.ArgumentParser()
    score.add_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            str(REPO / "jobs/configs/score.yaml"),
            "--set",
            "workers=3",
            "--set",
            "versions.0.name=old",
            "--set",
            "task_options.max_new_tokens=9",
            "--workers",
            "1,4",
            "--task-option",
            "stop=[';']",
            "--set",
            "limit=5",
        ]
    )
    cfg = score.config_from_args(args)
    assert cfg.workers == (1, 4) and cfg.limit == 5 and cfg.batch_size == 32  # flag, --set, file
    assert cfg.versions[0].name == "old" and len(cfg.versions) == 4
    assert cfg.task_options == {"metric": "exact", "stop": [";"], "max_new_tokens": 9}  # merged, not replaced


def test_flips_reads_its_options_from_a_file_too(tmp_path, capsys):
    """`muscle flips --config` with --set, on real Parquet result sets."""

    def write(path, correct):
        n = len(correct)
        pq.write_table(
            pa.table(
                {
                    "id": [str(i) for i in range(n)],
                    "task": ["t"] * n,
                    "correct": correct,
                    "score": [float(c) for c in correct],
                    "prediction": ["0"] * n,
                    "reference": ["0"] * n,
                }
            ),
            path,
        )
        return str(path)

    cfg = tmp_path / "flips.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "old": write(tmp_path / "o.parquet", [True, True, False, True]),
                "new": write(tmp_path / "n.parquet", [True, False, True, True]),
                "bootstrap": 50,
            }
        )
    )
    assert main(["flips", "--config", str(cfg), "--set", "format=json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["nfr"] == pytest.approx(0.25) and summary["pfr"] == pytest.approx(0.25)


def test_flips_never_imports_ray(tmp_path):
    old = tmp_path / "old.jsonl"
    old.write_text('{"id": "a", "task": "t", "correct": true, "score": 1.0, "prediction": "x", "reference": "x"}\n')
    code = (
        "import sys; from muscle_ray.cli import main; rc = main(['flips', sys.argv[1], sys.argv[1], '--json']); "
        "assert rc == 0; assert 'ray' not in sys.modules, 'ray was imported'"
    )
    res = subprocess.run([sys.executable, "-c", code, str(old)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# --- muscle_ray.config: the one path from a file and overrides to a model ------------------------


def test_overrides_reach_into_nested_mappings_and_lists():
    raw = {"a": {"b": 1}, "items": [{"x": 1}, {"x": 2}], "empty": None}
    out = with_overrides(raw, parse_overrides(["a.c=[1, 2]", "items.1.x=null", "empty.k=true", "new.deep=2e-3"]))
    assert out == {
        "a": {"b": 1, "c": [1, 2]},
        "items": [{"x": 1}, {"x": None}],
        "empty": {"k": True},
        "new": {"deep": 0.002},
    }
    assert raw["items"][1]["x"] == 2  # the input is left as it was
    with pytest.raises(MuscleError, match=r"cannot set 'a\.b\.c': 'a\.b' is a int, not a mapping"):
        with_overrides(raw, {"a.b.c": 1})
    with pytest.raises(MuscleError, match="no item 5 in a list of 2"):
        with_overrides(raw, {"items.5.x": 1})


def test_yaml_problems_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [unclosed\n")
    with pytest.raises(MuscleError, match=r"bad.yaml: not valid YAML at line \d"):
        read_yaml(bad)
    bad.write_text("- a list\n")
    with pytest.raises(MuscleError, match="bad.yaml: a config is a mapping of fields, not a list"):
        read_yaml(bad)
    with pytest.raises(MuscleError, match="missing.yaml: config file not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_load_config_counts_further_problems(tmp_path):
    from muscle_ray.scoring.config import ScoreConfig

    path = tmp_path / "s.yaml"
    path.write_text("task: t\n")
    with pytest.raises(MuscleError) as e:
        load_config(ScoreConfig, path, {"limit": 0})
    assert str(e.value) == f"{path}: field 'versions': Field required (and 2 more)"


# --- the fair fight's options on the command line ----------------------------------------------


def test_train_compat_points_selection_for_compatibility_to_muscle_update(capsys):
    """Selecting a snapshot for compatibility needs v1/v2 scored on validation data: the
    update pipeline's work, which train-compat names in one line instead of doing half of it."""
    config = str(REPO / "jobs/configs/train_compat.yaml")
    assert main(["train-compat", "--config", config, "--select", "compat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("muscle train-compat: error: --select compat") and err.count("\n") == 1, err
    assert "muscle update --config FILE --set select=compat" in err


def test_train_takes_a_snapshot_interval():
    import argparse

    from muscle_ray.cli import train
    from muscle_ray.training.config import CompatTrainConfig

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--config", str(REPO / "jobs/configs/train_compat.yaml"), "--snapshot-every", "25"])
    cfg = load_config(CompatTrainConfig, args.config, {"run.snapshot_every_steps": args.snapshot_every})
    assert cfg.run.snapshot_every_steps == 25


def test_demo_reads_adapter_and_base_seeds(tmp_path, capsys):
    import argparse

    from muscle_ray.cli import demo
    from muscle_ray.demo import SCORING

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)

    def cfg(*flags):
        return demo.config_from_args(parser.parse_args(["--config", str(_demo_config(tmp_path)), *flags]))

    default = cfg()
    assert (default.adapter_seeds, default.base_seeds) == ([1], [])  # the overlap, on the zoo's own bases
    assert SCORING[cfg("--ablation").ablation_task][0] == "mc_jsonl"  # no TASK: the multiple-choice task
    given = cfg("--adapter-seeds", "none", "--base-seeds", "3:5,1:2")
    assert (given.adapter_seeds, given.base_seeds) == ([], [(3, 5), (1, 2)])
    zoo = given.zoo_for((1, 2))
    assert (zoo.v1.seed, zoo.v2.seed) == (1, 2) and zoo.v1.steps == given.zoo.v1.steps
    with pytest.raises(SystemExit):
        parser.parse_args(["--base-seeds", "3-5"])
    assert "expected V1SEED:V2SEED pairs" in capsys.readouterr().err
    path = _demo_config(tmp_path)
    assert main(["demo", "--config", str(path), "--adapter-seeds", "0"]) == 2  # the first seed's own
    assert "adapter_seeds [0]: each must differ" in capsys.readouterr().err
    assert main(["demo", "--config", str(path), "--set", "variants=[nope]"]) == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err
