"""Training pieces without Ray: config validation, data, the student, adapter export."""

import json
import subprocess
import sys

import pytest
import torch

from muscle_ray.config import load_config, validated
from muscle_ray.errors import MuscleError
from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig
from muscle_ray.training.data import IGNORE, read_pairs, tokenize_pair, trim_batch


def _raw(tiny_model, tmp_path, **extra):
    return {"base": str(tiny_model), "out": str(tmp_path / "out"), "data": {"path": str(tmp_path / "d.jsonl")}, **extra}


def test_config_names_the_bad_field(tmp_path, tiny_model):
    with pytest.raises(MuscleError, match="optim.lr"):
        validated(AdapterTrainConfig, _raw(tiny_model, tmp_path, optim={"lr": -1}))
    with pytest.raises(MuscleError, match="nonsense"):
        validated(AdapterTrainConfig, _raw(tiny_model, tmp_path, nonsense=1))
    with pytest.raises(MuscleError, match="run.snapshot_every_steps"):
        validated(AdapterTrainConfig, _raw(tiny_model, tmp_path, run={"snapshot_every_steps": 0}))
    with pytest.raises(MuscleError, match="compat"):
        validated(CompatTrainConfig, _raw(tiny_model, tmp_path))
    compat = {"old": {"base": "x"}, "new_adapter": "y", "teachers": "cached"}
    with pytest.raises(MuscleError, match="topk"):
        validated(CompatTrainConfig, _raw(tiny_model, tmp_path, compat=compat))
    with pytest.raises(MuscleError, match="compat.mask"):
        validated(CompatTrainConfig, _raw(tiny_model, tmp_path, compat={**compat, "topk": 4, "mask": "wrong"}))


def test_shipped_yaml_configs_validate_and_override(tmp_path):
    cfg = load_config(CompatTrainConfig, "jobs/configs/train_compat.yaml", {"compat.mask": "ce", "optim.lr": 0.01})
    assert cfg.compat.mask == "ce" and cfg.optim.lr == 0.01 and cfg.compat.init == "from_new"
    assert load_config(AdapterTrainConfig, "jobs/configs/train_adapter.yaml").lora.target_modules == "all-linear"
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(MuscleError, match="bad.yaml"):
        load_config(AdapterTrainConfig, bad)


def test_read_pairs_names_file_and_row(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(MuscleError, match="row 2: field 'completion'"):
        read_pairs(str(p))
    p.write_text('{"prompt": "a", "completion": "b"}\n')
    assert read_pairs(str(p)) == [{"prompt": "a", "completion": "b"}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x"], "completion": ["y"]}), tmp_path / "d.parquet")
    assert read_pairs(str(tmp_path / "d.parquet"))[0]["completion"] == "y"
    with pytest.raises(MuscleError, match="not found"):
        read_pairs(str(tmp_path / "missing.jsonl"))


def test_read_pairs_from_a_builtin_task(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"prompt": "2+2?", "reference": " 4"}) + "\n")
    assert read_pairs(str(p), task="gen_jsonl") == [{"prompt": "2+2?", "completion": " 4"}]


def test_labels_are_shifted_and_completion_only_masks_prompt(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    row = tokenize_pair(tok, "ann has 3 figs.", " 7.", 40, "all")
    n = int(row["attention_mask"].sum())
    assert (row["labels"][: n - 1] == row["input_ids"][1:n]).all()
    assert row["input_ids"][n - 1] == tok.eos_token_id and (row["labels"][n - 1 :] == IGNORE).all()
    comp = tokenize_pair(tok, "ann has 3 figs.", " 7.", 40, "completion")
    n_prompt = len(tok("ann has 3 figs.")["input_ids"])
    assert (comp["labels"][: n_prompt - 1] == IGNORE).all()
    assert (comp["labels"][n_prompt - 1 : n - 1] == row["labels"][n_prompt - 1 : n - 1]).all()
    b = trim_batch({k: torch.as_tensor(v)[None] for k, v in row.items()})
    assert b["input_ids"].shape[1] == n


@pytest.mark.parametrize("prompt, completion", [("ann has 3 figs. ", "7."), ("ann has 3 figs.", " 7.")])
def test_trained_completion_tokens_are_the_scored_continuation_tokens(tiny_model, prompt, completion):
    """At the seam, training sees the tokens scoring scores (lm-eval's joint encoding), also
    when the prompt ends with the space that tokenisers glue to the next word."""
    from transformers import AutoTokenizer

    from muscle_ray.scoring.encode import encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_model)
    context, continuation = encode_pair(tok, prompt, completion)
    row = tokenize_pair(tok, prompt, completion, 40, "completion")
    trained = [int(t) for t in row["labels"] if t != IGNORE]
    assert trained == continuation + [tok.eos_token_id]
    n = int(row["attention_mask"].sum())
    assert row["input_ids"][:n].tolist() == context + continuation + [tok.eos_token_id]
    if prompt.endswith(" "):  # tokenised apart, the space would be a prompt token of its own
        assert tok(completion, add_special_tokens=False)["input_ids"] != continuation


def test_student_adapter_switching_and_export(tmp_path, tiny_model, tiny_adapter):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from muscle_ray.models import ModelVersion, load_model
    from muscle_ray.training.config import LoraSettings
    from muscle_ray.training.lora import NEW_TEACHER, active_adapter, base_fingerprint, build_student, save_adapter

    student = build_student(str(tiny_model), LoraSettings(r=2), None)
    student.load_adapter(str(tiny_adapter), adapter_name=NEW_TEACHER, is_trainable=False)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    x = torch.tensor([[5, 6, 7, 8]])
    ref = load_model(ModelVersion(str(tiny_model), str(tiny_adapter)), device="cpu")(input_ids=x).logits
    with torch.no_grad(), active_adapter(student, NEW_TEACHER):
        got = student(input_ids=x).logits
    assert torch.allclose(got, ref, atol=1e-5)
    assert flags == {n: p.requires_grad for n, p in student.named_parameters()}  # nothing (un)frozen
    assert all(("lora" in n and ".default." in n) == f for n, f in flags.items())

    with torch.no_grad():  # make the fresh adapter non-trivial, then export and reload it
        for n, p in student.named_parameters():
            if ".default." in n:
                p.add_(0.01)
    out = save_adapter(student, student.state_dict(), tmp_path / "a")
    keys = set(safe_open(str(out / "adapter_model.safetensors"), "pt").keys())
    assert keys and all(".default." not in k and NEW_TEACHER not in k for k in keys)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, student.eval()(input_ids=x).logits, atol=1e-5)
    fp = base_fingerprint(tiny_model)
    assert len(fp["config_sha256"]) == 64 and fp["weights"]


def test_cli_reports_bad_config_as_exit_2(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("base: x\nout: y\n")
    proc = subprocess.run(
        [sys.executable, "-m", "muscle_ray.cli", "train-adapter", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "field 'data'" in proc.stderr


def test_compat_ce_control_is_plain_cross_entropy(tmp_path, tiny_model):
    """`mask: ce` loads no teachers and trains with the task loss: the fair control."""
    from muscle_ray.training.config import LoraSettings
    from muscle_ray.training.loop import batch_loss, make_teachers
    from muscle_ray.training.lora import build_student
    from muscle_ray.training.losses import ce_loss

    compat = {"old": {"base": "x"}, "new_adapter": "y", "mask": "ce"}
    cfg = validated(CompatTrainConfig, _raw(tiny_model, tmp_path, compat=compat))
    student = build_student(str(tiny_model), LoraSettings(r=2), None)
    assert make_teachers(cfg, student, "cpu") is None
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([[6, 7, 8, 9, -100]])}
    loss, stats = batch_loss(student, None, batch, cfg)
    assert torch.allclose(loss, ce_loss(student(input_ids=ids).logits, batch["labels"]))
    assert stats["tokens"] == 4


def test_warmup_then_schedule(tmp_path, tiny_model):
    from muscle_ray.training.loop import make_scheduler

    for kind, last in (("linear", 0.0), ("cosine", 0.0), ("constant", 1.0)):
        cfg = validated(AdapterTrainConfig, _raw(tiny_model, tmp_path, optim={"warmup_steps": 2, "schedule": kind}))
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, cfg, total_steps=6)
        lrs = [sched.get_last_lr()[0]]
        for _ in range(6):
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
        assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] == pytest.approx(last)


@pytest.mark.parametrize("uri", [False, True])
def test_snapshot_index_resume_and_publish(tmp_path, uri):
    from muscle_ray.training.snapshots import keep_until, list_snapshots, publish, read_index, record

    run_dir = tmp_path / "ray" / "snapshots"
    location = run_dir.as_uri() if uri else str(run_dir)  # a URI run directory too (file:// here)
    assert read_index(location) == [] and publish(location, tmp_path / "out") == []

    def weights(text):
        return lambda d: (d / "adapter_model.safetensors").write_text(text)

    for step, val in ((4, 0.5), (2, None), (6, None), (4, 0.25)):  # out of order; step 4 written again
        record(location, step, val, weights(f"w{step}"))
    assert read_index(location) == [
        {"step": 2, "path": "step-000002", "val_loss": None},
        {"step": 4, "path": "step-000004", "val_loss": 0.25},
        {"step": 6, "path": "step-000006", "val_loss": None},
    ]
    keep_until(location, 4)  # resumed from the step-4 checkpoint: step 6 is written again later
    assert [e["step"] for e in read_index(location)] == [2, 4]

    out = tmp_path / "out"
    (out / "snapshots" / "step-000009").mkdir(parents=True)  # an earlier run's, replaced
    assert [e["step"] for e in publish(location, out)] == [2, 4]
    assert list_snapshots(out) == [(2, out / "snapshots" / "step-000002"), (4, out / "snapshots" / "step-000004")]
    assert (out / "snapshots" / "step-000004" / "adapter_model.safetensors").read_text() == "w4"
    assert not (out / "snapshots" / "step-000009").exists() and not list(out.glob("snapshots/*.tmp"))
    assert publish(None, out) == [] and list_snapshots(out) == []  # a run without snapshots removes stale ones

    (run_dir / "snapshots.json").write_text("{not json")
    with pytest.raises(MuscleError, match="snapshots.json"):
        read_index(location)


def test_snapshotter_writes_due_steps_with_the_val_loss_of_their_step(tmp_path, tiny_model):
    """Without Ray: the loop's call order on one worker (due after a step; written before the next
    optimizer step, or by the evaluation at that step); a resumed run keeps what it had."""
    from safetensors.torch import load_file

    from muscle_ray.training.config import LoraSettings
    from muscle_ray.training.loop import Snapshotter
    from muscle_ray.training.lora import build_student
    from muscle_ray.training.snapshots import list_snapshots, publish, read_index

    student = build_student(str(tiny_model), LoraSettings(r=2), None)
    location = str(tmp_path / "run" / "snapshots")
    snap = Snapshotter(location, 2, student, student, rank=0, start_step=0)
    name, lora = next((n, p) for n, p in student.named_parameters() if p.requires_grad)
    at = {}
    for step in range(1, 6):
        snap.write()  # before the optimizer step
        with torch.no_grad():
            lora.add_(1.0)
        at[step] = lora.detach().clone()
        snap.due(step, last=step == 5)
        if step in (4, 5):  # an evaluation at this step
            snap.write(val_loss=float(step))
    assert [(e["step"], e["val_loss"]) for e in read_index(location)] == [(2, None), (4, 4.0), (5, 5.0)]
    publish(location, tmp_path / "out")
    for step, d in list_snapshots(tmp_path / "out"):
        saved = load_file(str(d / "adapter_model.safetensors"))[name.replace(".default", "")]  # PEFT's key
        assert torch.equal(saved, at[step]), step

    resumed = Snapshotter(location, 2, student, student, rank=0, start_step=4)
    assert [e["step"] for e in read_index(location)] == [2, 4]
    resumed.due(4, last=False)
    resumed.write()
    assert read_index(location)[-1]["val_loss"] == 4.0  # not written again
