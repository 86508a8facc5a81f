"""Driver side of a training job: datasets (and teacher cache), the TorchTrainer, the export."""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from pathlib import Path

from muscle_ray.errors import MuscleError
from muscle_ray.models import ModelVersion, check_same_tokenizer
from muscle_ray.training.config import TrainConfig
from muscle_ray.training.lora import base_fingerprint, write_manifest
from muscle_ray.training.snapshots import SNAPSHOTS, publish


def _check_inputs(cfg: TrainConfig) -> None:
    ModelVersion(cfg.base)
    c = cfg.compat
    if c is None:
        return
    old = ModelVersion(c.old.base, c.old.adapter, name="old")
    new = ModelVersion(cfg.base, c.new_adapter, name="new")
    check_same_tokenizer([old, new])


def prepare_datasets(cfg: TrainConfig, work_dir: str | Path | None = None):
    """`data.Datasets`: (train, val) Ray Datasets and their sizes, with the teacher columns added
    when teachers are cached; streamed data is tokenized into `work_dir`."""
    from muscle_ray.training.data import build_datasets

    data = build_datasets(cfg.data, cfg.base, work_dir)
    train, val = data.train, data.val
    c = cfg.compat
    if c is not None and c.teachers == "cached" and c.mask != "ce":
        from muscle_ray.training.teachers import build_teacher_cache

        cache = Path(c.cache_dir or Path(cfg.out) / "teacher_cache").resolve()
        shutil.rmtree(cache, ignore_errors=True)
        old = ModelVersion(c.old.base, c.old.adapter, name="old")
        new = ModelVersion(cfg.base, c.new_adapter, name="new")
        assert c.topk is not None  # CompatSettings requires it for cached teachers
        topk: int = c.topk

        def cached(ds, split: str):
            return build_teacher_cache(
                ds,
                old,
                new,
                topk,
                c.temperature,
                out_dir=str(cache / split),
                num_cpus=c.teacher_cpus,
                num_gpus=c.teacher_gpus,
                batch_size=cfg.optim.micro_batch_size,
            )

        train, val = cached(train, "train"), cached(val, "val")
    return data._replace(train=train, val=val)


def _storage(path: str) -> str:
    """Ray Train takes a URI (s3://, gs://, file://) for its run directory as it is; a local
    path is made absolute so workers on this machine agree on it."""
    from muscle_ray.locations import is_uri

    return path if is_uri(path) else str(Path(path).resolve())


def _scratch(storage: str, name: str) -> Path:
    """A new directory's path for streamed training data's chunks, made only when data is
    streamed and removed after the fit: beside the run's directory when that is local (room for
    big data), else in the temp directory."""
    from muscle_ray.locations import is_uri

    where = Path(tempfile.gettempdir()) if is_uri(storage) else Path(storage)
    return where / f".{name}.data-{uuid.uuid4().hex[:12]}"


def _ingest(streamed: bool):
    """Ray Train's ingest settings: streamed datasets are read by tasks whose blocks may finish
    out of order, so they keep file order (every run sees the rows as the in-memory path does)."""
    if not streamed:
        return None
    from ray.train import DataConfig as IngestConfig

    options = IngestConfig.default_ingest_options()
    options.preserve_order = True
    return IngestConfig(execution_options=options)


def run_training(cfg: TrainConfig, threads_per_worker: int = 1, progress=None) -> dict:
    """Fit with Ray Train, export the best checkpoint's adapter to cfg.out (and any snapshots to
    cfg.out/snapshots/); returns the manifest.

    `progress(step, total)`, if given, is called by the rank-0 worker after each optimizer step
    (a `muscle_ray.console.Progress`: it must be picklable and cheap).
    """
    from muscle_ray.runtime import init_ray

    _check_inputs(cfg)
    init_ray()
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # the loop logs each step
    run = cfg.run
    storage = _storage(run.storage_path)
    work = _scratch(storage, run.name)
    try:
        return _fit(cfg, storage, work, threads_per_worker, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fit(cfg: TrainConfig, storage: str, work: Path, threads_per_worker: int, progress) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from muscle_ray.training.loop import train_loop_per_worker

    data = prepare_datasets(cfg, work)
    n_train = data.n_train
    if n_train < cfg.run.num_workers * cfg.optim.micro_batch_size:
        raise MuscleError(f"{cfg.data.path}: {n_train} training rows, fewer than num_workers x micro_batch_size")
    run = cfg.run
    # Snapshots go to the run's directory, which every worker's node sees and a resumed run finds.
    snapshots = f"{storage}/{run.name}/{SNAPSHOTS}" if run.snapshot_every_steps else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(),
            "n_train": n_train,
            "threads": threads_per_worker,
            "progress": progress,
            "snapshots": snapshots,
        },
        scaling_config=ScalingConfig(
            num_workers=run.num_workers, use_gpu=run.use_gpu, resources_per_worker={"CPU": run.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if run.use_gpu else "gloo"),
        datasets={"train": data.train, "val": data.val},
        dataset_config=_ingest(data.streamed),
        run_config=RunConfig(
            name=run.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=run.num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
            ),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    best = [(ck, m) for ck, m in (result.best_checkpoints or []) if "val_loss" in m]
    if not best:
        raise MuscleError(f"run {run.name}: finished without a checkpoint")
    ckpt, metrics = min(best, key=lambda cm: cm[1]["val_loss"])
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with ckpt.as_directory() as d:
        for f in (Path(d) / "adapter").iterdir():
            shutil.copy2(f, out / f.name)
    snapshot_index = publish(snapshots, out)
    c = cfg.compat
    manifest = {
        "kind": "compat" if c else "task_adapter",
        "base": base_fingerprint(cfg.base),
        "old_base": base_fingerprint(c.old.base) if c else None,
        "old_adapter": c.old.adapter if c else None,
        "new_adapter": c.new_adapter if c else None,
        "task": cfg.data.task,
        "data": cfg.data.path,
        "mask": c.mask if c else "ce",
        "best_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
        "snapshots": snapshot_index,
        "ray_run": {"name": run.name, "storage_path": storage, "path": result.path},
        "config": json.loads(cfg.model_dump_json()),
    }
    write_manifest(out, **manifest)
    return manifest
