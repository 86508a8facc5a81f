"""The three teacher placements give one loss; gradients reach only the student's LoRA."""

import numpy as np
import pytest
import torch

from muscle_ray.models import ModelVersion, load_model
from muscle_ray.training.losses import compat_loss

TEMP = 2.0


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_model_b, tiny_adapter, tmp_path_factory):
    """Old = tiny_model + tiny_adapter; new = tiny_model_b + its own task adapter; one batch."""
    from transformers import AutoTokenizer

    from muscle_ray.training.data import tokenize_pair
    from muscle_ray.zoo.llama import random_lora_dir

    new_adapter = random_lora_dir(tiny_model_b, tmp_path_factory.mktemp("new") / "adapter", seed=3)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [
        tokenize_pair(tok, f"ann has {i} figs. bob has {i + 2} figs.", f" {2 * i + 2}.", 24, "all") for i in range(4)
    ]
    batch = {k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]}
    old = ModelVersion(str(tiny_model), str(tiny_adapter), name="old")
    new = ModelVersion(str(tiny_model_b), str(new_adapter), name="new")
    return old, new, batch


def _student(new):
    from muscle_ray.training.config import LoraSettings
    from muscle_ray.training.lora import build_student

    torch.manual_seed(0)
    return build_student(new.base, LoraSettings(), new.adapter)  # compat init: copy of v2 adapter


def test_inline_teachers_are_the_two_task_models(setup):
    from muscle_ray.training.teachers import InlineTeachers

    old, new, batch = setup
    student = _student(new)
    teachers = InlineTeachers(student, old, new.adapter, device="cpu")
    t_old, t_new = teachers(batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        assert torch.allclose(t_old, load_model(old, "cpu")(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
        assert torch.allclose(t_new, load_model(new, "cpu")(input_ids=ids, attention_mask=mask).logits, atol=1e-5)


def test_gradient_reaches_only_the_student_lora(setup):
    from muscle_ray.training.teachers import InlineTeachers

    old, new, batch = setup
    student = _student(new).train()
    teachers = InlineTeachers(student, old, new.adapter, device="cpu")
    t_old, t_new = teachers(batch)
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = compat_loss(logits, t_old, t_new, batch["labels"], mask="old", temperature=TEMP)
    loss.backward()
    with_grad = {n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".default." in n and "lora_" in n for n in with_grad)
    assert all(p.grad is None for n, p in student.named_parameters() if "teacher_new" in n or "lora_" not in n)
    assert all(p.grad is None and not p.requires_grad for p in teachers.old.parameters())


@pytest.mark.slow
def test_three_placements_give_the_same_loss(setup, tmp_path, ray_session):
    import ray

    from muscle_ray.training.data import trim_batch
    from muscle_ray.training.teachers import CachedTeachers, ColocatedTeachers, InlineTeachers, build_teacher_cache

    old, new, batch = setup
    student = _student(new).eval()
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    y = batch["labels"]
    losses = {}
    inline = InlineTeachers(_student(new), old, new.adapter, device="cpu")
    losses["inline"] = compat_loss(s_logits, *inline(batch), y, temperature=TEMP, return_stats=True)
    full = ColocatedTeachers(old, new, topk=None, temperature=TEMP, num_cpus=0.1)
    assert full.actor_node() == ray.get_runtime_context().get_node_id()
    losses["colocated"] = compat_loss(s_logits, *full(batch), y, temperature=TEMP, return_stats=True)
    full.close()
    k = 32
    top = ColocatedTeachers(old, new, topk=k, temperature=TEMP, num_cpus=0.1)
    losses["colocated_topk"] = compat_loss(s_logits, *top(batch), y, temperature=TEMP, return_stats=True)
    top.close()
    ds = ray.data.from_items([{k_: v[i].numpy() for k_, v in batch.items()} for i in range(len(y))])
    cached = build_teacher_cache(
        ds, old, new, topk=k, temperature=TEMP, out_dir=str(tmp_path / "cache"), num_cpus=0.1, batch_size=2
    )
    rows = cached.take_all()
    order = [
        next(j for j, r in enumerate(rows) if (r["input_ids"] == batch["input_ids"][i].numpy()).all())
        for i in range(len(y))
    ]
    cols = trim_batch({c: torch.as_tensor(np.stack([rows[j][c] for j in order])) for c in rows[0]})
    losses["cached"] = compat_loss(
        s_logits[:, : cols["labels"].shape[1]],
        *CachedTeachers()(cols),
        cols["labels"],
        temperature=TEMP,
        return_stats=True,
    )
    (l_in, st_in), (l_co, _) = losses["inline"], losses["colocated"]
    (l_tk, st_tk), (l_ca, st_ca) = losses["colocated_topk"], losses["cached"]
    assert torch.equal(l_in, l_co) or torch.allclose(l_in, l_co, rtol=1e-6, atol=1e-7)  # full logits: same
    assert torch.allclose(l_tk, l_ca, rtol=1e-5, atol=1e-7)  # same top-k, two placements: same
    # Top-k vs full: masks identical (label log-prob kept), KL a lower bound (coarser support).
    assert st_tk["share_old"] == st_in["share_old"] == st_ca["share_old"]
    assert float(l_tk) <= float(l_in) + 1e-6 and float(l_tk) > 0
