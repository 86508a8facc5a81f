"""`muscle plan`: parameter counts from config.json, per-worker memory, FSDP placement, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muscle_ray.errors import MuscleError
from muscle_ray.plan import ADAM_BYTES, Arch, parse_bytes, placement, plan_training

# The demo zoo's base (muscle_ray/zoo/build.py defaults) and a Llama-3-8B shape.
ZOO = dict(
    model_type="llama",
    vocab_size=700,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=256,
    tie_word_embeddings=False,
)
LLAMA_8B = dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    tie_word_embeddings=False,
)


def model_dir(root: Path, name: str, config: dict) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    return d


def hf_count(config: dict) -> int:
    """What transformers instantiates (on the meta device: no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    return sum(p.numel() for p in model.parameters())


def test_zoo_params_by_hand_and_by_transformers(tmp_path):
    p = Arch.from_dir(model_dir(tmp_path, "zoo", ZOO)).params()
    # head_dim 16, 2 KV heads: k and v are 64 -> 32
    assert p["embeddings"] == 700 * 64 == p["lm_head"]
    assert p["attention"] == 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64)
    assert p["mlp"] == 2 * 3 * 64 * 256
    assert p["norms"] == (2 * 2 + 1) * 64
    assert p["total"] == 212_800 == hf_count(ZOO)


def test_llama_8b_params_by_hand(tmp_path):
    p = Arch.from_dir(model_dir(tmp_path, "8b", LLAMA_8B)).params()
    h, kv, i, v, n = 4096, 8 * 128, 14336, 128256, 32
    assert p["attention"] == n * (2 * h * h + 2 * h * kv)
    assert p["mlp"] == n * 3 * h * i
    assert p["total"] == 2 * v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i) + (2 * n + 1) * h == 8_030_261_248


@pytest.mark.parametrize(
    "config",
    [
        # tied embeddings, and Qwen2's biases on q, k, v (not o)
        dict(ZOO, model_type="qwen2", tie_word_embeddings=True),
        # an explicit head_dim that is not hidden / heads
        dict(ZOO, model_type="mistral", head_dim=32),
        # Llama's optional biases; no num_key_value_heads: one per head
        {**{k: v for k, v in ZOO.items() if k != "num_key_value_heads"}, "attention_bias": True, "mlp_bias": True},
    ],
    ids=["qwen2-tied", "mistral-head-dim", "llama-biases"],
)
def test_params_match_transformers(config):
    assert Arch.from_config(config).params()["total"] == hf_count(config)


def test_lora_params_match_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**ZOO))
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    arch = Arch.from_config(ZOO)
    assert arch.lora_params(16, "all-linear") == trainable == 2 * 16 * (128 + 96 + 96 + 128 + 3 * 320)
    assert arch.lora_params(16, ["q_proj", "v_proj"]) == 2 * 16 * (128 + 96)
    with pytest.raises(MuscleError, match="lm_head"):
        arch.lora_params(16, ["q_proj", "lm_head"])


def train_config(tmp_path: Path, arch: dict, **fields):
    from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig

    base = model_dir(tmp_path, "v2", arch)
    raw = {"base": str(base), "out": str(tmp_path / "out"), "data": {"path": "train.jsonl", "max_length": 128}}
    raw |= fields
    if "compat" in fields:
        model_dir(tmp_path, "v1", arch)
        return CompatTrainConfig.model_validate(raw)
    return AdapterTrainConfig.model_validate(raw)


def parts(plan) -> dict[str, int]:
    return {p.name: p.bytes for p in plan.parts}


def test_task_adapter_plan_by_hand(tmp_path):
    run = {"use_gpu": True, "activation_checkpointing": False}
    cfg = train_config(tmp_path, LLAMA_8B, lora={"r": 16}, optim={"micro_batch_size": 2}, run=run)
    plan = plan_training(cfg, dtype="bf16")
    assert plan.settings["checkpointing"] is False
    got = parts(plan)
    tokens, h, i, kv, heads, layers = 2 * 128, 4096, 14336, 1024, 32, 32
    assert got["student base weights"] == 8_030_261_248 * 2
    assert got["LoRA + AdamW (fp32)"] == Arch.from_config(LLAMA_8B).lora_params(16, "all-linear") * ADAM_BYTES
    per_token = 6 * h + 4 * i + 2 * kv + heads + 7 * 16
    assert got["activations / micro-batch"] == layers * per_token * tokens * 2
    assert got["logits + CE"] == 3 * tokens * 128256 * 4
    assert "CPU heap slack (glibc)" not in got  # a GPU run
    assert plan.total == sum(got.values())
    checkpointed = plan_training(cfg, dtype="bf16", checkpointing=True)  # the flag overrides the config
    assert checkpointed.settings["checkpointing_from"] == "--checkpointing"
    assert parts(checkpointed)["activations / micro-batch"] == (layers * h + per_token) * tokens * 2


def test_dtype_from_run_precision_and_the_flag_overrides(tmp_path):
    """run.precision is the plan's default: bf16 without --dtype is the --dtype bf16 plan, teachers
    included (the loop loads them bf16 too, even on a CPU); --dtype fp32 overrides it."""
    compat = compat_fields(tmp_path)
    bf16 = train_config(tmp_path, ZOO, run={"precision": "bf16"}, **compat)
    fp32 = train_config(tmp_path, ZOO, **compat)
    plan = plan_training(bf16)
    assert plan.settings["dtype"] == "bf16" and plan.settings["dtype_from"] == "config run.precision"
    assert parts(plan) == parts(plan_training(fp32, dtype="bf16"))
    assert parts(plan)["student base weights"] == 212_800 * 2
    assert (
        parts(plan)["teacher weights (v1 + adapters)"]
        == 212_800 * 2 + Arch.from_config(ZOO).lora_params(8, "all-linear") * 4
    )
    forced = plan_training(bf16, dtype="fp32")
    assert forced.settings["dtype"] == "fp32" and forced.settings["dtype_from"] == "--dtype"
    assert parts(forced) == parts(plan_training(fp32, dtype="fp32"))
    assert parts(forced)["student base weights"] == 212_800 * 4
    # run.precision fp32 on a GPU: the student fp32, the teachers the device's default bf16, as the loop loads them
    gpu = parts(plan_training(train_config(tmp_path, ZOO, run={"use_gpu": True}, **compat)))
    assert gpu["student base weights"] == 212_800 * 4
    assert (
        gpu["teacher weights (v1 + adapters)"] == 212_800 * 2 + Arch.from_config(ZOO).lora_params(8, "all-linear") * 4
    )


# Just under 500M parameters (498,959,360), so LoRA's rank decides "auto" (the loop counts the
# student's parameters, LoRA included): 499,524,608 with r = 1, 500,089,856 with r = 2.
NEAR_500M = dict(
    model_type="llama",
    vocab_size=47000,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    intermediate_size=4096,
    tie_word_embeddings=False,
)


def test_auto_checkpointing_resolves_as_the_training_loop(tmp_path):
    """`run.activation_checkpointing: auto` (the default) from config.json alone, decided by the
    loop's `use_checkpointing` on the same count as the student skeleton the loop builds."""
    import torch

    from muscle_ray.training.lora import build_student, n_params, use_checkpointing

    assert Arch.from_config(NEAR_500M).params()["total"] == 498_959_360 == hf_count(NEAR_500M)
    for r, on in ((1, False), (2, True)):
        cfg = train_config(tmp_path, NEAR_500M, lora={"r": r})
        plan = plan_training(cfg)
        assert plan.settings["checkpointing"] is on
        assert plan.settings["checkpointing_from"].startswith("config run.activation_checkpointing: auto")
        student = build_student(cfg.base, cfg.lora, None, dtype=torch.bfloat16, weights=False)
        assert use_checkpointing("auto", student) is on
        assert plan.settings["checkpointing_from"].endswith(f"auto, {n_params(student) / 1e6:,.1f}M params")
        assert parts(plan) == parts(plan_training(cfg, checkpointing=on))
        assert plan_training(cfg, checkpointing=False).settings["checkpointing_from"] == "--no-checkpointing"
    big = train_config(tmp_path, LLAMA_8B)
    assert plan_training(big).settings["checkpointing"] is True
    explicit = train_config(tmp_path, LLAMA_8B, run={"activation_checkpointing": False})
    assert plan_training(explicit).settings == plan_training(big, checkpointing=False).settings | {
        "checkpointing_from": "config run.activation_checkpointing"
    }


def test_two_fsdp_workers_halve_the_sharded_parts(tmp_path):
    cfg = train_config(tmp_path, LLAMA_8B, lora={"r": 16})
    one, two = plan_training(cfg, workers=1), plan_training(cfg, workers=2)
    assert two.settings["strategy"] == "fsdp" and one.settings["strategy"] == "plain"
    sharded = [p.name for p in two.parts if p.sharded]
    assert sharded == ["student base weights", "LoRA + AdamW (fp32)"]
    for name in sharded:
        assert parts(two)[name] == -(-parts(one)[name] // 2)
    for name in ("activations / micro-batch", "logits + CE", "runtime"):
        assert parts(two)[name] == parts(one)[name]
    # what FSDP2 gathers: half of the root's params (the other half is this worker's shard) + 2 blocks, fp32
    p = Arch.from_config(LLAMA_8B).params()
    root = p["embeddings"] + p["lm_head"] + 4096
    block = (p["attention"] + p["mlp"]) // 32 + 2 * 4096
    assert parts(two)["FSDP gathered (root + 2 blocks)"] == (root - root // 2 + 2 * block) * 4
    ddp = train_config(tmp_path, LLAMA_8B, run={"strategy": "ddp", "num_workers": 2})
    assert not any(p.sharded for p in plan_training(ddp).parts)


def compat_fields(tmp_path, **extra):
    return {"compat": {"old": {"base": str(tmp_path / "v1")}, "new_adapter": str(tmp_path / "a2"), **extra}}


def test_compat_plan_counts_the_teachers(tmp_path):
    adapter = tmp_path / "a2"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj", "v_proj"]}))
    cfg = train_config(tmp_path, ZOO, lora={"r": 16}, optim={"micro_batch_size": 2}, **compat_fields(tmp_path))
    got = parts(plan_training(cfg))
    arch = Arch.from_config(ZOO)
    # the student continues the v2 adapter (init: from_new), so its rank and targets are the adapter's
    assert got["LoRA + AdamW (fp32)"] == arch.lora_params(4, ["q_proj", "v_proj"]) * ADAM_BYTES
    # v1 base (fp32 on a CPU) and the frozen v2 adapter inside the student
    assert got["teacher weights (v1 + adapters)"] == 212_800 * 4 + arch.lora_params(4, ["q_proj", "v_proj"]) * 4
    assert got["teacher logits / micro-batch"] == 2 * 128 * 700 * (4 + 4)
    offloaded = parts(plan_training(cfg, teacher="offloaded"))
    assert offloaded["teacher weights"] == 0 and offloaded["teacher logits / micro-batch"] == 2 * 256 * (12 * 64 + 8)
    colocated = train_config(
        tmp_path, ZOO, optim={"micro_batch_size": 2}, **compat_fields(tmp_path, teachers="colocated")
    )
    plan = plan_training(colocated)  # no topk: both teachers' full logits come through the object store
    assert plan.settings["teacher"] == "offloaded" and parts(plan)["teacher logits / micro-batch"] == 2 * 256 * 700 * 4


def test_placement_is_the_fewest_workers_that_fit(tmp_path):
    cfg = train_config(
        tmp_path, LLAMA_8B, optim={"micro_batch_size": 4}, run={"use_gpu": True}, **compat_fields(tmp_path)
    )
    memory, kw = parse_bytes("24GiB"), dict(dtype="bf16", seq_len=2048)
    fit = placement(cfg, memory, **kw)
    assert fit["fits"] and fit["workers"] > 1
    n = fit["workers"]
    chosen = plan_training(cfg, workers=n, checkpointing=fit["checkpointing"], teacher=fit["teacher"], **kw)
    assert chosen.total == fit["per_worker"] <= memory
    for ckpt in (False, True):
        for teacher in ("inline", "sharded", "offloaded"):
            fewer = plan_training(cfg, workers=n - 1, checkpointing=ckpt, teacher=teacher, fsdp=True, **kw)
            assert fewer.total > memory
    # 80 GiB holds it on one device once the teacher is offloaded (its logits come from the cache)
    assert placement(cfg, parse_bytes("80GiB"), checkpointing=False, **kw) | {"per_worker": 0} == {
        "fits": True,
        "workers": 1,
        "checkpointing": False,
        "teacher": "offloaded",
        "per_worker": 0,
    }
    # or with the teacher inline under the config's checkpointing (auto: on for 8B)
    assert placement(cfg, parse_bytes("80GiB"), **kw) | {"per_worker": 0} == {
        "fits": True,
        "workers": 1,
        "checkpointing": True,
        "teacher": "inline",
        "per_worker": 0,
    }
    assert not placement(cfg, parse_bytes("1GiB"), max_workers=4, **kw)["fits"]


def test_parse_bytes():
    assert parse_bytes("80GiB") == parse_bytes("80G") == 80 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1.5T") == int(1.5 * 2**40)
    assert parse_bytes("1000") == 1000
    with pytest.raises(MuscleError, match="80 gigs"):
        parse_bytes("80 gigs")


def test_unknown_architecture_is_named(tmp_path):
    d = model_dir(tmp_path, "gpt2", {"model_type": "gpt2", "n_embd": 64})
    with pytest.raises(MuscleError, match=r"config.json: model_type 'gpt2'"):
        Arch.from_dir(d)
    with pytest.raises(MuscleError, match="no config.json"):
        Arch.from_dir(tmp_path)


def test_cli_table_and_json(tmp_path, capsys):
    from muscle_ray.cli import main

    model_dir(tmp_path, "v1", ZOO)
    model_dir(tmp_path, "v2", ZOO)
    config = tmp_path / "compat.yaml"
    config.write_text(
        f"base: {tmp_path / 'v2'}\nout: {tmp_path / 'out'}\ndata: {{path: train.jsonl}}\n"
        f"compat: {{old: {{base: {tmp_path / 'v1'}}}, new_adapter: {tmp_path / 'a2'}}}\n"
    )
    assert main(["plan", "--config", str(config), "--json", "--workers", "2", "--device-memory", "80GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["kind"] == "train-compat" and out["plan"]["settings"]["strategy"] == "fsdp"
    assert out["plan"]["total"] == sum(p["bytes"] for p in out["plan"]["parts"])
    assert out["placement"]["fits"] and out["placement"]["workers"] == 1
    assert main(["plan", "--config", str(config), "--set", "optim.micro_batch_size=2", "--checkpointing"]) == 0
    text = capsys.readouterr().out
    assert "teacher weights (v1 + adapters)" in text and "micro-batch 2 x 256 tokens" in text
    assert "212,800 params" in text and "activation checkpointing (--checkpointing)" in text
    assert "1 worker (config run.num_workers), plain, fp32 (config run.precision) on cpu" in text
    assert main(["plan", "--config", str(config), "--set", "run.precision=bf16", "--workers", "2"]) == 0
    text = capsys.readouterr().out
    assert "2 workers (--workers), fsdp, bf16 (config run.precision) on cpu" in text
    assert "no activation checkpointing (config run.activation_checkpointing: auto, 0.3M params)" in text
    assert main(["plan", "--config", str(config), "--set", "run.precision=bf16", "--dtype", "fp32"]) == 0
    assert "fp32 (--dtype) on cpu" in capsys.readouterr().out

    score = tmp_path / "score.yaml"
    score.write_text(f"task: gen_jsonl\nout: o\nbatch_size: 4\nversions: [{{name: v1, base: {tmp_path / 'v1'}}}]\n")
    assert main(["plan", "--config", str(score), "--device-memory", "1GiB"]) == 0
    text = capsys.readouterr().out
    assert "muscle plan: score of v1" in text and "KV cache" in text and "actor(s) per device" in text

    (tmp_path / "v1" / "config.json").unlink()
    assert main(["plan", "--config", str(score)]) == 2
    assert f"muscle plan: error: {tmp_path / 'v1'}: no config.json there" in capsys.readouterr().err
