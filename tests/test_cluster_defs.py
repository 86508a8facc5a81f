"""The cluster definitions and job configs are checked, not just shipped.

Every YAML in cluster/ must carry what its tool requires (the launcher's schema; KubeRay's head
and worker groups, replica bounds, rayStartParams, entrypoints), and everything a file names
(job scripts, job configs, the serve import path, volumes) must exist. Every config in
jobs/configs/ validates against its pydantic class and mirrors how the demo trains and scores.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CONFIGS = REPO / "jobs" / "configs"
IMAGE_ROOT = "/app/"  # cluster/Dockerfile puts the repo there
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # jobs/configs/update.yaml names hub ids: no network here


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_docs() -> list[tuple[str, dict]]:
    return [(str(p.relative_to(REPO)), d) for p in sorted(CLUSTER.rglob("*.yaml")) for d in _docs(p)]


def _kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in _all_docs() if d.get("kind") == kind]


def _ray_cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {
        "RayCluster": lambda: spec,
        "RayJob": lambda: spec["rayClusterSpec"],
        "RayService": lambda: spec["rayClusterConfig"],
    }[doc["kind"]]()


def _repo_path(path: str) -> Path:
    return REPO / (path[len(IMAGE_ROOT) :] if path.startswith(IMAGE_ROOT) else path)


def load_job_config(path: Path):
    """The config class of a jobs/configs file, by its name: demo*, score*, train_adapter*, train_compat*, update*."""
    from muscle_ray.config import load_config
    from muscle_ray.demo import DemoConfig
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.training.config import AdapterTrainConfig, CompatTrainConfig
    from muscle_ray.update import UpdateConfig

    for prefix, model in (
        ("demo", DemoConfig),
        ("score", ScoreConfig),
        ("train_adapter", AdapterTrainConfig),
        ("train_compat", CompatTrainConfig),
        ("update", UpdateConfig),
    ):
        if path.name.startswith(prefix):
            return load_config(model, path)
    raise AssertionError(
        f"{path}: no config class for this name (demo*, score*, train_adapter*, train_compat*, update*)"
    )


# --- cluster/ as a whole -------------------------------------------------------------------


def test_cluster_dir_has_every_definition_the_readme_names():
    kinds = {d.get("kind") for _, d in _all_docs()}
    assert {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim"} <= kinds
    readme = (CLUSTER / "README.md").read_text()
    for p in sorted(CLUSTER.rglob("*.yaml")):
        assert str(p.relative_to(REPO)) in readme, f"cluster/README.md does not say when to use {p.name}"
    for f, d in _all_docs():
        if "kind" in d:
            assert d["apiVersion"] == ("v1" if d["kind"] == "PersistentVolumeClaim" else "ray.io/v1"), f


# --- the cluster launcher --------------------------------------------------------------------


def test_launcher_yaml_passes_rays_schema_and_autoscales_cpu_and_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _docs(CLUSTER / "launcher.yaml")[0]
    cfg = prepare_config(raw)
    validate_config(cfg)  # Ray's own JSON schema for `ray up`
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["node_config"]["InstanceType"]
    workers = {n: t for n, t in types.items() if n != raw["head_node_type"]}
    assert {"cpu_worker", "gpu_worker"} <= set(workers)
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert workers["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert raw["idle_timeout_minutes"] > 0
    assert sum(t["max_workers"] for t in workers.values()) >= raw["max_workers"] > 0
    # The project is synced to every node and installed there.
    assert raw["file_mounts"]["/home/ubuntu/muscle-ray"] == "."
    assert any("pip install" in c and "-e ~/muscle-ray" in c for c in raw["setup_commands"])
    assert (REPO / "pyproject.toml").is_file()
    # Every node starts Ray in token mode with the shipped token.
    assert raw["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    head_start = " ".join(raw["head_start_ray_commands"])
    worker_start = " ".join(raw["worker_start_ray_commands"])
    assert "ray start --head" in head_start and "--autoscaling-config" in head_start
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_start
    for cmd in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in cmd and "MUSCLE_WORKSPACE=" in cmd


# --- KubeRay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_kuberay_cluster_specs_have_head_and_autoscaled_worker_groups(kind):
    docs = _kind(kind)
    assert docs, f"no {kind} in cluster/"
    claims = {d["metadata"]["name"] for _, d in _kind("PersistentVolumeClaim")}
    for f, doc in docs:
        spec = _ray_cluster_spec(doc)
        assert spec["rayVersion"] == "2.60.0", f
        assert spec["enableInTreeAutoscaling"] is True, f
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0, f
        assert spec["authOptions"] == {"mode": "token"}, f
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict), f
        pods = [("head", head["template"]["spec"])]
        groups = spec["workerGroupSpecs"]
        assert groups, f
        for g in groups:
            assert g["groupName"] and isinstance(g["rayStartParams"], dict), f
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], (f, g["groupName"])
            assert g["maxReplicas"] > 0, (f, g["groupName"])
            pods.append((g["groupName"], g["template"]["spec"]))
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert ("nvidia.com/gpu" in limits) == (g["groupName"] == "gpu"), (f, g["groupName"])
        if kind == "RayCluster":
            assert {g["groupName"] for g in groups} == {"cpu", "gpu"}, f
        for name, pod in pods:
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                assert c["image"].startswith("muscle-ray:"), (f, name)
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("MUSCLE_WORKSPACE") == "/data/muscle", (f, name)
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes, (f, name, m)
                    assert volumes[m["name"]]["persistentVolumeClaim"]["claimName"] in claims, (f, name)


def test_rayjob_entrypoints_name_scripts_and_configs_that_exist_and_validate():
    from muscle_ray.scoring.config import ScoreConfig
    from muscle_ray.training.config import TrainConfig
    from muscle_ray.update import UpdateConfig

    seen = {}
    for f, doc in _kind("RayJob"):
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] == "python", f
        script = _repo_path(argv[1])
        assert script.is_file() and script.parent.name == "jobs", (f, argv[1])
        config = _repo_path(argv[argv.index("--config") + 1])
        assert config.is_file(), (f, config)
        cfg = load_job_config(config)
        seen[script.name] = cfg
        assert doc["spec"]["shutdownAfterJobFinishes"] is True, f
    assert set(seen) == {"score.py", "train_compat.py", "update.py"}
    assert isinstance(seen["score.py"], ScoreConfig) and seen["score.py"].gpus_per_worker >= 1
    assert isinstance(seen["train_compat.py"], TrainConfig) and seen["train_compat.py"].compat is not None
    assert isinstance(seen["update.py"], UpdateConfig) and seen["update.py"].tasks


def test_rayservice_runs_the_serving_app_of_serve_config_yaml():
    """serveConfigV2 = serve/config.yaml's application, its paths on the shared volume."""
    from muscle_ray.serving.config import validate_app_config

    serve_config = REPO / "serve" / "config.yaml"
    if not serve_config.is_file():
        pytest.skip("serve/config.yaml is not in this checkout (the serving app lands separately)")
    ((f, doc),) = _kind("RayService")
    (mine,) = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    (theirs,) = yaml.safe_load(serve_config.read_text())["applications"]
    assert mine["import_path"] == theirs["import_path"], f
    module, attr = mine["import_path"].split(":")
    source = REPO / (module.replace(".", "/") + ".py")
    assert f"def {attr}(" in source.read_text(), f"{source} defines no {attr}"
    validate_app_config(mine["args"], source=f)  # the app's own config class

    def on_volume(p):
        return p if p is None else "/data/muscle/" + p

    assert {k: (b["path"], b["models"]) for k, b in mine["args"]["bases"].items()} == {
        k: (on_volume(b["path"]), {n: on_volume(a) for n, a in b["models"].items()})
        for k, b in theirs["args"]["bases"].items()
    }
    assert mine["args"]["shadow"]["out"] == on_volume(theirs["args"]["shadow"]["out"])
    assert [d["name"] for d in mine["deployments"]] == [d["name"] for d in theirs["deployments"]]
    for d in mine["deployments"]:
        gpus = d["ray_actor_options"].get("num_gpus", 0)
        assert gpus == (1 if d["name"].startswith("model_") else 0), d["name"]
        assert d["autoscaling_config"]["min_replicas"] < d["autoscaling_config"]["max_replicas"], d["name"]


# --- jobs/configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_validates_and_writes_outside_the_demo(path):
    cfg = load_job_config(path)
    if path.name == "demo.yaml":  # the one job that writes runs/demo, with the demo's defaults
        from muscle_ray.demo import DemoConfig

        assert cfg == DemoConfig(), "jobs/configs/demo.yaml should spell out what `make demo` runs"
        return
    out = Path(cfg.out)
    assert out.parts[:2] == ("runs", "jobs"), f"{path.name}: out {cfg.out} would clobber the demo's products"
    storage = getattr(getattr(cfg, "run", None), "storage_path", "runs/jobs/ray")
    assert Path(storage).parts[:2] == ("runs", "jobs"), path.name


def test_score_configs_mirror_how_the_demo_scores_pet_em():
    from muscle_ray.demo import SCORING
    from muscle_ray.scoring.placement import Resources, place

    task, options, _ = SCORING["pet_em"]
    for name in ("score.yaml", "score_gpu.yaml"):
        cfg = load_job_config(CONFIGS / name)
        assert (cfg.task, cfg.task_options) == (task, options), name
        assert cfg.data == "runs/demo/zoo/data/pet_em/test.jsonl"
        assert {v.name: (v.base, v.adapter) for v in cfg.versions} == {
            "v1": ("runs/demo/zoo/v1", "runs/demo/adapters/pet_em/v1"),
            "v2": ("runs/demo/zoo/v2", "runs/demo/adapters/pet_em/v2"),
            "compat": ("runs/demo/zoo/v2", "runs/demo/adapters/pet_em/compat"),
            "control": ("runs/demo/zoo/v2", "runs/demo/adapters/pet_em/control"),
        }
        cluster = Resources(cpus=8, gpus=4, node_cpus=2, nodes=4, joined=True)  # fields left unset: auto
        lo, hi = place(cfg, cluster).workers
        assert lo < hi, f"{name}: the pool should autoscale on a cluster"


def test_train_configs_are_the_demo_recipes_plus_paths():
    """One copy of the recipe: the examples name it and add only where things are, so the job
    trains with the demo's numbers (they come from the same file, not a second copy)."""
    from muscle_ray.demo import DemoConfig

    for name, kind, recipe in (
        ("train_adapter.yaml", "adapter", "task_adapter"),
        ("train_compat.yaml", "compat", "compat"),
    ):
        raw = yaml.safe_load((CONFIGS / name).read_text())
        assert raw.pop("recipe") == recipe, name
        paths = {
            "base",
            "out",
            "data.path",
            "data.val_path",
            "run.name",
            "run.storage_path",
            "compat.old.base",
            "compat.old.adapter",
            "compat.new_adapter",
        }
        assert set(_leaves(raw)) <= paths, f"{name} restates recipe fields: {set(_leaves(raw)) - paths}"
        cfg = load_job_config(CONFIGS / name)
        demo = DemoConfig().train_config(kind, {k: v for k, v in raw.items() if k != "run"})  # as the demo trains
        assert (cfg.data.max_length, cfg.data.loss_on, cfg.lora, cfg.optim, cfg.compat) == (
            demo.data.max_length,
            demo.data.loss_on,
            demo.lora,
            demo.optim,
            demo.compat,
        ), name
        assert cfg.run.model_dump(exclude={"name", "storage_path"}) == demo.run.model_dump(
            exclude={"name", "storage_path"}
        ), name
        assert cfg.base == "runs/demo/zoo/v2"
        assert (cfg.data.path, cfg.data.val_path) == (
            "runs/demo/zoo/data/pet_em/train_pairs.jsonl",
            "runs/demo/zoo/data/pet_em/val_pairs.jsonl",
        )


def _leaves(raw: dict, prefix: str = "") -> list[str]:
    return [
        leaf
        for k, v in raw.items()
        for leaf in (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])
    ]


def test_every_job_has_an_example_config():
    jobs = {p.stem for p in (REPO / "jobs").glob("*.py") if not p.name.startswith("_")}
    assert jobs == {"demo", "score", "train_adapter", "train_compat", "update"}
    assert all((CONFIGS / f"{job}.yaml").is_file() for job in jobs)
