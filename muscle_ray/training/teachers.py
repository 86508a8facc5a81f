"""The two frozen teachers of MUSCLE (old task model v1, new task model v2), in three placements.

Every placement is a callable `teachers(batch) -> (old, new)` giving logits (batch, seq, vocab)
or `TopK`, so the training loop does not care where they run:

- `InlineTeachers`: inside the training worker. The new teacher is the student's own frozen
  base with the v2 task adapter switched in (a second, frozen PEFT adapter), so only the old
  base costs extra memory; under FSDP2 the old model is sharded like the student, each worker
  reading only its shards.
- `ColocatedTeachers`: one Ray actor per training worker, pinned to the worker's node, holding
  both frozen teachers (a `TeacherPair`) with their own device and dtype; answers travel
  through the object store, as full logits or top-k (+ tail mass, + label log-prob). Not sharded:
  the actors are outside the training workers' process group (bf16 halves them instead).
- `CachedTeachers`: read from columns that `build_teacher_cache` (a Ray Data batch job)
  precomputed beside the tokens: top-k log-probs at the training temperature, tail mass and
  the label log-prob at T = 1, so masks stay exact and only the KL support is coarsened.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from muscle_ray.models import ModelVersion, load_model
from muscle_ray.training.losses import TopK, topk_from_logits


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def sharded_model(version: ModelVersion, device, dtype, shard):
    """A frozen model whose weights are `shard`ed (FSDP2) and read shard by shard from the files."""
    from peft import PeftModel

    from muscle_ray.training.lora import load_sharded, skeleton

    model = skeleton(version.base, dtype, trust_remote_code=version.trust_remote_code)
    model.config.use_cache = False
    if version.adapter:
        model = PeftModel.from_pretrained(model, version.adapter)
    return _freeze(load_sharded(_freeze(model), version.base, device, shard))


class InlineTeachers:
    """`shard`, given (`loop.fsdp_shard`), shards the old model with FSDP2: every worker must then
    call the teachers in step, as it does the student."""

    def __init__(self, student, old: ModelVersion, new_adapter: str, device, dtype=None, shard=None):
        from muscle_ray.models import default_dtype
        from muscle_ray.training.lora import NEW_TEACHER

        self.student = student  # the unwrapped PeftModel (FSDP2 shards it in place)
        self.student.load_adapter(new_adapter, adapter_name=NEW_TEACHER, is_trainable=False)
        if shard is None:
            self.old = _freeze(load_model(old, device=device, dtype=dtype))
        else:
            dtype = dtype or default_dtype(torch.device(device))
            self.old = sharded_model(old, device, dtype, shard)

    @torch.no_grad()
    def __call__(self, batch):
        from muscle_ray.training.lora import NEW_TEACHER, active_adapter

        old = _forward(self.old, batch)
        if hasattr(self.old, "reshard"):  # FSDP2 keeps a root unsharded after forward: for backward
            self.old.reshard()
        with active_adapter(self.student, NEW_TEACHER):
            new = _forward(self.student, batch)
        return old, new


class TeacherPair:
    """Both frozen teachers in one process: used by the co-located actor and the cache job."""

    def __init__(self, old: ModelVersion, new: ModelVersion, device=None, dtype=None):
        self.old = _freeze(load_model(old, device=device, dtype=dtype))
        self.new = _freeze(load_model(new, device=device, dtype=dtype))
        self.device = next(self.old.parameters()).device
        self.autocast = dtype == torch.bfloat16  # asked for bf16 (`run.precision`): run as the student does

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @torch.no_grad()
    def answer(self, input_ids, attention_mask, labels, topk: int | None, temperature: float) -> dict:
        """numpy columns: full `old_logits`/`new_logits`, or top-k `old_ids`, `old_logprobs`,
        `old_tail`, `old_label_lp` (and new_*)."""
        batch = {
            "input_ids": torch.as_tensor(input_ids, device=self.device),
            "attention_mask": torch.as_tensor(attention_mask, device=self.device),
        }
        labels = torch.as_tensor(labels, device=self.device).clamp(min=0)
        out = {}
        for name, model in (("old", self.old), ("new", self.new)):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = _forward(model, batch).float()
            if topk is None:
                out[f"{name}_logits"] = logits.cpu().numpy()
                continue
            t = topk_from_logits(logits, topk, temperature, labels)
            out[f"{name}_ids"] = t.ids.cpu().numpy()
            out[f"{name}_logprobs"] = t.logprobs.cpu().numpy()
            out[f"{name}_tail"] = t.tail_logmass.cpu().numpy()
            assert t.label_logprob is not None  # labels were given
            out[f"{name}_label_lp"] = t.label_logprob.cpu().numpy()
        return out


def topk_from_columns(cols: dict, name: str, device=None) -> TopK:
    def t(key):
        return torch.as_tensor(np.asarray(cols[f"{name}_{key}"]), device=device)

    return TopK(t("ids").long(), t("logprobs").float(), t("tail").float(), t("label_lp").float())


def _teachers_from_columns(cols: dict, device):
    if "old_logits" in cols:
        return (torch.as_tensor(cols["old_logits"], device=device), torch.as_tensor(cols["new_logits"], device=device))
    return topk_from_columns(cols, "old", device), topk_from_columns(cols, "new", device)


class ColocatedTeachers:
    """Starts a `TeacherPair` actor on this worker's node; each batch is one remote call."""

    def __init__(
        self,
        old: ModelVersion,
        new: ModelVersion,
        topk: int | None,
        temperature: float,
        num_cpus: float = 0.25,
        num_gpus: float = 0.0,
        device=None,
        dtype=None,
    ):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        actor_cls = ray.remote(TeacherPair)
        self.actor: Any = actor_cls.options(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        ).remote(old, new, None, dtype)
        self.node = node
        self.topk, self.temperature, self.device = topk, temperature, device

    def __call__(self, batch):
        import ray

        cols = ray.get(
            self.actor.answer.remote(
                batch["input_ids"].cpu().numpy(),
                batch["attention_mask"].cpu().numpy(),
                batch["labels"].cpu().numpy(),
                self.topk,
                self.temperature,
            )
        )
        return _teachers_from_columns(cols, self.device or batch["input_ids"].device)

    def actor_node(self) -> str:
        import ray

        return ray.get(self.actor.node_id.remote())

    def close(self):
        import ray

        ray.kill(self.actor)


class CachedTeachers:
    """Teachers read from the batch's own precomputed columns."""

    def __call__(self, batch):
        return _teachers_from_columns(batch, batch["input_ids"].device)


class _CacheMapper:
    def __init__(self, old: ModelVersion, new: ModelVersion, topk: int, temperature: float):
        self.pair = TeacherPair(old, new)
        self.topk, self.temperature = topk, temperature

    def __call__(self, batch: dict) -> dict:
        from muscle_ray.training.data import trim_batch

        b = trim_batch({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
        cols = self.pair.answer(b["input_ids"], b["attention_mask"], b["labels"], self.topk, self.temperature)
        full = batch["input_ids"].shape[1]
        for k, v in cols.items():  # pad back to the dataset's fixed length
            pad = [(0, 0), (0, full - v.shape[1])] + [(0, 0)] * (v.ndim - 2)
            batch[k] = np.pad(v, pad)
        return batch


def build_teacher_cache(
    ds,
    old: ModelVersion,
    new: ModelVersion,
    topk: int,
    temperature: float,
    out_dir: str,
    num_cpus: float = 0.25,
    num_gpus: float = 0.0,
    batch_size: int = 16,
):
    """Ray Data job: tokens -> tokens + both teachers' top-k columns, written to Parquet; returns
    the Parquet-backed dataset training reads."""
    import ray

    ds.map_batches(
        _CacheMapper,
        fn_constructor_args=(old, new, topk, temperature),
        batch_size=batch_size,
        concurrency=1,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        batch_format="numpy",
    ).write_parquet(out_dir)
    return ray.data.read_parquet(out_dir)
