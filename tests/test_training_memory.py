"""Training memory: bf16 bases with fp32 LoRA, activation checkpointing, FSDP2 sharded loading.

Fast: the options validate; a 1B skeleton holds no weights; losses upcast bf16 logits; a bf16
student keeps fp32 LoRA weights, gradients and AdamW state; checkpointing recomputes each block
and leaves the compat losses as they were; bf16 + checkpointing tracks fp32 over 10 compat steps;
the co-located teachers run in bf16; a world-size-1 FSDP2 student and v1 teacher read shard by
shard equal the plain ones.
Slow: two gloo workers (torch.multiprocessing) train the compat adapter under FSDP2 with each
holding half of the student's and of the v1 teacher's parameter bytes, on the single-process
loss trajectory (fp32, and bf16 + checkpointing).
"""

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fsdp_helpers import (
    check_sharded_run,
    compat_raw,
    process_group,
    random_batches,
    single_process,
    train,
    two_fsdp_workers,
)

from muscle_ray.config import validated
from muscle_ray.errors import MuscleError
from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig

STEPS = 10
BATCH, SEQ = 4, 24
# bf16 + checkpointing against fp32, per step: |loss_bf16 - loss_fp32| <= BF16_RTOL * loss_fp32.
# Measured on the tiny zoo Llama: at most 2.2 % over 10 compat steps (the KL of near-identical
# models is small, bf16 keeps 8 mantissa bits); a LoRA that did not train would be ~27 % off.
BF16_RTOL = 0.05
# Checkpointing alone recomputes the same fp32 ops: the losses were bit-identical here.
CKPT_RTOL = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _llama_dir(out: Path, tokenizer, seed: int, tie: bool = False, **shape) -> Path:
    """A random Llama saved as an HF directory (`tie`: lm_head shares the embeddings, as SmolLM2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        **shape,
    }
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
        **shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _batches(vocab: int, n: int, seed: int = 0) -> list[dict]:
    return random_batches(vocab, n, BATCH, SEQ, seed)


@pytest.fixture(scope="module")
def compat_models(tmp_path_factory, tiny_model, tiny_model_b, tiny_adapter):
    """(v1, v1 adapter, v2, v2 adapter) of the tiny zoo Llama."""
    from muscle_ray.zoo.llama import random_lora_dir

    a2 = random_lora_dir(tiny_model_b, tmp_path_factory.mktemp("mem") / "a2", seed=3)
    return tiny_model, tiny_adapter, tiny_model_b, a2


def _vocab(model_dir) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def test_precision_and_checkpointing_options(tmp_path, tiny_model):
    raw = {"base": str(tiny_model), "out": "o", "data": {"path": "d.jsonl"}}
    run = validated(AdapterTrainConfig, raw).run
    assert run.precision == "fp32" and run.activation_checkpointing == "auto"  # defaults: as before
    run = validated(AdapterTrainConfig, {**raw, "run": {"precision": "bf16", "activation_checkpointing": True}}).run
    assert run.precision == "bf16" and run.activation_checkpointing is True
    with pytest.raises(MuscleError, match="run.precision"):
        validated(AdapterTrainConfig, {**raw, "run": {"precision": "fp16"}})
    with pytest.raises(MuscleError, match="run.activation_checkpointing"):
        validated(AdapterTrainConfig, {**raw, "run": {"activation_checkpointing": "sometimes"}})


def test_skeleton_of_a_0p8b_model_holds_no_weights_and_turns_checkpointing_on(tmp_path, tiny_model):
    """From config.json alone: 0.84B parameters, LoRA real and fp32, the base ~0 bytes; auto
    checkpointing on for it and off for the tiny zoo model."""
    from transformers import LlamaConfig

    from muscle_ray.training.config import LoraSettings
    from muscle_ray.training.lora import build_student, n_params, use_checkpointing

    LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        tie_word_embeddings=False,
    ).save_pretrained(tmp_path)
    student = build_student(str(tmp_path), LoraSettings(r=8), None, dtype=torch.bfloat16, weights=False)
    base = [p for p in student.parameters() if not p.requires_grad]
    lora = [p for p in student.parameters() if p.requires_grad]
    assert n_params(student) > 800_000_000 and use_checkpointing("auto", student)
    assert sum(p.untyped_storage().nbytes() for p in base) <= 2 * len(base)  # one bf16 element each
    assert {p.dtype for p in base} == {torch.bfloat16} and {p.dtype for p in lora} == {torch.float32}
    assert sum(p.numel() for p in lora) * 4 == sum(p.untyped_storage().nbytes() for p in lora)  # real
    tiny = build_student(str(tiny_model), LoraSettings(r=2), None)
    assert not use_checkpointing("auto", tiny) and use_checkpointing(True, tiny)


def test_losses_upcast_bf16_logits():
    """The losses compute in fp32 from bf16 logits: the same values as from the upcast logits."""
    from muscle_ray.training.losses import ce_loss, compat_loss

    g = torch.Generator().manual_seed(0)
    s, o, n = (torch.randn(2, 6, 50, generator=g).bfloat16() for _ in range(3))
    y = torch.randint(0, 50, (2, 6), generator=g)
    for mask in ("muscle", "sequence_likelihood"):
        low = compat_loss(s, o, n, y, mask=mask, ce_weight=0.3, chunk_tokens=5)
        assert low.dtype == torch.float32
        assert torch.equal(
            low, compat_loss(s.float(), o.float(), n.float(), y, mask=mask, ce_weight=0.3, chunk_tokens=5)
        )
    assert torch.equal(ce_loss(s, y), ce_loss(s.float(), y))


def test_bf16_student_keeps_fp32_lora_gradients_and_optimizer_state(tmp_path, tiny_model):
    from muscle_ray.training.loop import batch_loss, build_model

    raw = {"base": str(tiny_model), "out": "o", "data": {"path": "d"}, "lora": {"r": 2}, "run": {"precision": "bf16"}}
    cfg = validated(AdapterTrainConfig, raw)
    student, _, model = build_model(cfg, torch.device("cpu"), world=1)
    frozen = {p.dtype for p in student.parameters() if not p.requires_grad}
    params = [p for p in student.parameters() if p.requires_grad]
    assert frozen == {torch.bfloat16} and {p.dtype for p in params} == {torch.float32}
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = _batches(_vocab(tiny_model), 1)[0]
    loss, _ = batch_loss(model, None, batch, cfg)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    opt.step()
    states = [v for s in opt.state.values() for v in s.values() if v.dim()]
    assert states and {v.dtype for v in states} == {torch.float32}


def test_colocated_teacher_pair_in_bf16(compat_models):
    """The co-located actor's models in bf16 (`run.precision: bf16`): bf16 bases, fp32 answers
    within bf16 rounding of fp32's (the tiny random models' logits are within +-0.6; measured
    max difference 0.058)."""
    from muscle_ray.models import ModelVersion
    from muscle_ray.training.teachers import TeacherPair

    v1, a1, v2, a2 = compat_models
    b = _batches(_vocab(v1), 1)[0]
    cols = [b["input_ids"].numpy(), b["attention_mask"].numpy(), b["labels"].numpy(), None, 2.0]
    old, new = ModelVersion(str(v1), str(a1)), ModelVersion(str(v2), str(a2))
    pairs = {d: TeacherPair(old, new, "cpu", d) for d in (None, torch.bfloat16)}
    low_pair = pairs[torch.bfloat16]
    assert {p.dtype for n, p in low_pair.old.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    full, low = (pairs[d].answer(*cols) for d in pairs)
    for k in ("old_logits", "new_logits"):
        assert low[k].dtype == full[k].dtype == "float32"
        assert 0 < abs(low[k] - full[k]).max() < 0.1


@contextmanager
def _block_calls(model):
    """Counts decoder-block forward calls (a checkpointed block starts again in backward; the
    recompute stops once it has what backward needs, so post-forward hooks may not run)."""
    from muscle_ray.training.lora import decoder_blocks

    calls = []
    hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in decoder_blocks(model)]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def test_checkpointing_recomputes_blocks_and_keeps_the_losses(compat_models):
    from muscle_ray.training.loop import batch_loss, build_model

    batches = _batches(_vocab(compat_models[0]), STEPS)
    runs = {}
    for ckpt in (False, True):
        cfg = validated(CompatTrainConfig, compat_raw(*compat_models, activation_checkpointing=ckpt))
        runs[ckpt] = train(cfg, batches)["losses"]
        student, teachers, model = build_model(cfg, torch.device("cpu"), world=1)
        loss, _ = batch_loss(model, teachers, batches[0], cfg)
        with _block_calls(student) as calls:
            loss.backward()
        assert len(calls) == (2 if ckpt else 0)  # the tiny model's 2 blocks, run again in backward
    assert runs[True][-1] < runs[True][0]  # it trains
    assert runs[True] == pytest.approx(runs[False], rel=CKPT_RTOL)


def test_bf16_with_checkpointing_tracks_fp32(compat_models):
    batches = _batches(_vocab(compat_models[0]), STEPS)
    fp32 = train(validated(CompatTrainConfig, compat_raw(*compat_models)), batches)
    low_raw = compat_raw(*compat_models, precision="bf16", activation_checkpointing=True)
    bf16 = train(validated(CompatTrainConfig, low_raw), batches)
    assert bf16["lora_dtypes"] == bf16["opt_dtypes"] == ["torch.float32"]
    assert bf16["teacher_bytes"] < 0.6 * fp32["teacher_bytes"]  # bf16 base, fp32 v1 adapter
    assert fp32["losses"][-1] < 0.9 * fp32["losses"][0]  # it trains
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=BF16_RTOL)


def test_sharded_loading_equals_the_plain_models(tmp_path, compat_models, tiny_model):
    """World size 1 under FSDP2: student (fresh LoRA and a copy of an adapter, fp32 and bf16, tied
    embeddings too) and v1 teacher read shard by shard give the plain models' logits exactly."""
    from transformers import AutoTokenizer

    from muscle_ray.models import ModelVersion, load_model
    from muscle_ray.training.config import LoraSettings
    from muscle_ray.training.loop import fsdp_shard
    from muscle_ray.training.lora import build_student, load_sharded
    from muscle_ray.training.teachers import InlineTeachers

    v1, a1, v2, a2 = compat_models
    tied = _llama_dir(tmp_path / "tied", AutoTokenizer.from_pretrained(tiny_model), seed=5, tie=True)
    x = {"input_ids": torch.tensor([[5, 6, 7, 8, 9, 10]])}
    x["attention_mask"] = torch.ones_like(x["input_ids"])
    with process_group(), torch.no_grad():
        for base, init in ((v2, None), (v2, a2), (tied, None)):
            for dtype in (torch.float32, torch.bfloat16):
                models = []
                for weights in (True, False):
                    torch.manual_seed(0)
                    m = build_student(str(base), LoraSettings(r=2), init and str(init), dtype=dtype, weights=weights)
                    models.append(m if weights else load_sharded(m, str(base), "cpu", fsdp_shard))
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    plain, sharded = (m(**x).logits for m in models)
                assert type(models[1].base_model.model.model.layers[0]).__name__.startswith("FSDP")
                assert torch.equal(plain, sharded), (base, init, dtype)
        old = ModelVersion(str(v1), str(a1))
        student = load_sharded(
            build_student(str(v2), LoraSettings(r=2), None, weights=False), str(v2), "cpu", fsdp_shard
        )
        teachers = InlineTeachers(student, old, str(a2), "cpu", shard=fsdp_shard)
        assert torch.equal(teachers(x)[0], load_model(old, "cpu")(**x).logits)


@pytest.mark.slow
def test_fsdp2_two_workers_hold_half_and_follow_the_single_process_run(tmp_path, tiny_model):
    """Two gloo workers, FSDP2: each holds ~1/2 of the student's and of the v1 teacher's parameter
    bytes, and the loss trajectory is the single process's, in fp32 and in bf16 + checkpointing
    (asserted to 1e-5 and 1e-3; a 4-layer variant gave bit-identical losses), bf16's within
    BF16_RTOL of fp32. A 3.4M-parameter Llama, tied embeddings on v2; on a loaded machine the
    gloo collectives dominate the time."""
    from transformers import AutoTokenizer

    from muscle_ray.zoo.llama import random_lora_dir

    tok = AutoTokenizer.from_pretrained(tiny_model)
    shape = {"hidden_size": 384, "num_hidden_layers": 2, "intermediate_size": 1024}  # few blocks: few collectives
    v1 = _llama_dir(tmp_path / "v1", tok, seed=0, **shape)
    v2 = _llama_dir(tmp_path / "v2", tok, seed=1, tie=True, **shape)
    a1, a2 = random_lora_dir(v1, tmp_path / "a1", seed=0), random_lora_dir(v2, tmp_path / "a2", seed=1)
    steps = 4
    batches = _batches(len(tok), steps, seed=1)
    raws = {
        "fp32": compat_raw(v1, a1, v2, a2, strategy="fsdp", num_workers=2),
        "bf16": compat_raw(
            v1, a1, v2, a2, strategy="fsdp", num_workers=2, precision="bf16", activation_checkpointing=True
        ),
    }
    ranks = two_fsdp_workers(raws, batches, tmp_path)
    torch.set_num_threads(1)
    check_sharded_run(ranks, single_process(raws, batches), BF16_RTOL)
