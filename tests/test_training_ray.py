"""End to end on Ray Train (slow): a two-worker FSDP2 compat run on CPU that loses a worker
mid-run, resumes from its last checkpoint, finishes, and exports a loadable PEFT adapter and
its snapshots; then the same run name restarts from storage; adapter snapshots every K steps on
one worker; and `muscle train-adapter` (two DDP workers) from a YAML file."""

import json
import os
import random
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow


def kill_once(marker: Path, at_step: int):
    """A training-loop step hook (run_training's `progress`) for a fault drill: it notes in
    `marker` the step each worker process starts from, and the first time step `at_step` is
    done it kills the rank-0 worker without cleanup."""
    started = []

    def hook(step: int, total: int) -> None:
        if not started:  # the loop's first call: the step it starts from
            started.append(step)
            with marker.open("a") as f:
                f.write(f"started at step {step}\n")
        if step == at_step and "killed" not in marker.read_text():
            # Ray Train collects reports when it polls the workers (every 2 s): wait, as a real
            # crash long after the last checkpoint would, so that checkpoint is not lost.
            time.sleep(5)
            with marker.open("a") as f:
                f.write(f"killed at step {step}\n")
            os._exit(1)

    return hook


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for _ in range(40):
            x, y = rng.randint(1, 9), rng.randint(1, 9)
            f.write(
                json.dumps({"prompt": f"ann has {x} figs. bob has {y} figs. figs in all?", "completion": f" {x + y}."})
                + "\n"
            )
    return path


def _lora_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_fsdp2_compat_run_survives_a_killed_worker_and_restarts_by_name(
    ray_session, tmp_path, train_file, tiny_model, tiny_model_b, tiny_adapter
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from muscle_ray.config import validated
    from muscle_ray.training.config import CompatTrainConfig
    from muscle_ray.training.job import run_training
    from muscle_ray.zoo.llama import random_lora_dir

    new_adapter = random_lora_dir(tiny_model_b, tmp_path / "new_task", seed=5)
    marker = tmp_path / "killed.txt"
    raw = {
        "base": str(tiny_model_b),
        "out": str(tmp_path / "compat"),
        "data": {"path": str(train_file), "max_length": 40, "val_fraction": 0.2},
        "optim": {"micro_batch_size": 4, "epochs": 2, "lr": 5e-3, "warmup_steps": 1},
        "run": {
            "name": "fsdp-drill",
            "storage_path": str(tmp_path / "ray"),
            "num_workers": 2,
            "strategy": "fsdp",
            "cpus_per_worker": 0.25,
            "max_failures": 1,
            "eval_every_steps": 2,
            "snapshot_every_steps": 2,
        },
        "compat": {
            "old": {"base": str(tiny_model), "adapter": str(tiny_adapter)},
            "new_adapter": str(new_adapter),
            "mask": "muscle",
            "teachers": "inline",
        },
    }
    cfg = validated(CompatTrainConfig, raw)
    manifest = run_training(cfg, progress=kill_once(marker, at_step=3))

    # The worker died once at step 3 and the replacement resumed from the step-2 checkpoint.
    assert marker.read_text().splitlines() == ["started at step 0", "killed at step 3", "started at step 2"]
    assert manifest["best_metrics"]["val_loss"] > 0 and manifest["mask"] == "muscle"
    out = tmp_path / "compat"
    assert json.loads((out / "muscle_manifest.json").read_text())["base"]["config_sha256"]
    # Standard PEFT layout, same keys as the v2 task adapter it started from, weights moved.
    trained, start = _lora_weights(out), _lora_weights(new_adapter)
    assert set(trained) == set(start)
    assert any(not torch.allclose(trained[k], start[k]) for k in trained)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_b), str(out))
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()

    # Snapshots every 2 steps, each after the evaluation at its step; the one at step 2 was written
    # before the kill and kept by the resumed run (it wrote its run directory's file no more).
    snaps = manifest["snapshots"]
    assert [e["step"] for e in snaps] == [2, 4, 6, 8] and all(e["val_loss"] > 0 for e in snaps)
    assert snaps == json.loads((out / "snapshots" / "snapshots.json").read_text())
    kept = Path(manifest["ray_run"]["path"]) / "snapshots" / "step-000002" / "adapter_model.safetensors"
    assert kept.stat().st_mtime < marker.stat().st_mtime  # the marker's last line: "started at step 2"
    assert set(_lora_weights(out / "snapshots" / "step-000008")) == set(trained)
    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_b), str(out / "snapshots" / "step-000004")
    )

    # Same name, same storage: Ray Train restores the run; it is already complete, so no new steps.
    again = run_training(cfg)
    assert again["best_metrics"]["step"] == manifest["best_metrics"]["step"]
    assert again["snapshots"] == snaps


def test_snapshots_every_k_steps_load_in_peft_and_the_last_is_the_export(ray_session, tmp_path, train_file, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from muscle_ray.config import validated
    from muscle_ray.training.config import AdapterTrainConfig
    from muscle_ray.training.job import run_training
    from muscle_ray.training.snapshots import list_snapshots

    raw = {
        "base": str(tiny_model),
        "out": str(tmp_path / "task"),
        "data": {"path": str(train_file), "max_length": 40},
        "lora": {"r": 4, "alpha": 8},
        "optim": {"micro_batch_size": 4, "max_steps": 5, "lr": 1e-2},
        "run": {
            "name": "snaps",
            "storage_path": str(tmp_path / "ray"),
            "cpus_per_worker": 0.25,
            "snapshot_every_steps": 2,
        },
    }
    manifest = run_training(validated(AdapterTrainConfig, raw))
    out = tmp_path / "task"
    # Every 2 steps and at the last; only the last has an evaluation (one checkpoint: no selection).
    assert [(e["step"], e["path"], e["val_loss"]) for e in manifest["snapshots"]] == [
        (2, "step-000002", None),
        (4, "step-000004", None),
        (5, "step-000005", manifest["best_metrics"]["val_loss"]),
    ]
    snaps = list_snapshots(out)
    assert [s for s, _ in snaps] == [2, 4, 5]
    weights = [_lora_weights(d) for _, d in snaps]
    for a, b in zip(weights, weights[1:]):
        assert set(a) == set(b) and any(not torch.equal(a[k], b[k]) for k in a)
    final = _lora_weights(out)
    assert set(weights[-1]) == set(final) and all(torch.equal(weights[-1][k], final[k]) for k in final)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = [
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(d))(input_ids=x).logits
            for _, d in snaps
        ]
    assert all(torch.isfinite(lg).all() for lg in logits) and not torch.allclose(logits[0], logits[-1])


def test_train_adapter_command_from_yaml_with_ddp(ray_session, tmp_path, train_file, tiny_model):
    from muscle_ray.cli import main

    cfg = {
        "base": str(tiny_model),
        "out": str(tmp_path / "task"),
        "data": {"path": str(train_file), "max_length": 40, "loss_on": "completion"},
        "lora": {"r": 4, "alpha": 8},
        "optim": {"micro_batch_size": 8, "max_steps": 3, "epochs": 5, "lr": 1e-2},
        "run": {
            "name": "task",
            "storage_path": str(tmp_path / "ray"),
            "cpus_per_worker": 0.25,
            "num_workers": 2,
            "strategy": "ddp",
        },
    }
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train-adapter", "--config", str(path), "--set", "optim.schedule=cosine"]) == 0
    manifest = json.loads((tmp_path / "task" / "muscle_manifest.json").read_text())
    assert manifest["kind"] == "task_adapter" and manifest["best_metrics"]["step"] == 3
    assert json.loads((tmp_path / "task" / "adapter_config.json").read_text())["r"] == 4
