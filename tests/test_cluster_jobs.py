"""End to end on a real local cluster: `ray start --head` with token auth, then the scoring and
the compat-training jobs submitted through the job server with the example configs as they are.

The jobs run in Ray's unpacked copy of the repo (working_dir), and read a demo-shaped tree of
tiny models through MUSCLE_WORKSPACE, exactly as cluster/README.md tells users to submit them.
The cluster is stopped by killing the process tree this test started (never `ray stop`, which
stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv whose python the jobs must run
EXCLUDES = [".git", ".venv", ".venv-*", "runs", "bench/out", ".hypothesis", ".pytest_cache"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class Head:
    address: str  # the job server (dashboard) URL
    token: str
    env: dict  # what a user's shell needs for `ray job submit` (RAY_AUTH_MODE, RAY_AUTH_TOKEN)
    log: Path

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})


def _stop_tree(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM `ray start --block` and everything under it (GCS, raylet, workers), then SIGKILL."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    proc.wait(timeout=5)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A one-node cluster on this machine, token auth on, its own temp dir and free ports."""
    import requests

    token = secrets.token_hex(16)
    temp_dir = tempfile.mkdtemp(prefix="mrc", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dash, agent, agent_grpc, client_port, metrics, rt_agent = _free_ports(7)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HF_HUB_OFFLINE="1"
    )
    log = tmp_path_factory.mktemp("ray_head") / "ray_start.log"
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--num-cpus",
        "2",
        "--port",
        str(gcs),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--dashboard-agent-listen-port",
        str(agent),
        "--dashboard-agent-grpc-port",
        str(agent_grpc),
        "--ray-client-server-port",
        str(client_port),
        "--metrics-export-port",
        str(metrics),
        "--runtime-env-agent-port",
        str(rt_agent),
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
    ]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=temp_dir, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"http://127.0.0.1:{dash}", token, env, log)
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                h.client().list_jobs()
                break
            except Exception:
                if time.time() > deadline:
                    raise RuntimeError(f"job server not up in 240 s:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)
        # The job server refuses a request without the token (401) and with a wrong one (403).
        assert requests.get(f"{h.address}/api/jobs/", timeout=10).status_code == 401
        assert (
            requests.get(f"{h.address}/api/jobs/", headers={"Authorization": "Bearer nope"}, timeout=10).status_code
            == 403
        )
        yield h
    finally:
        _stop_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model, tiny_model_b):
    """runs/demo laid out as the demo writes it (zoo/{v1,v2}, zoo/data/pet_em, adapters/pet_em/*)."""
    from muscle_ray.zoo.llama import random_lora_dir

    ws = tmp_path_factory.mktemp("ws")
    zoo, ad = ws / "runs/demo/zoo", ws / "runs/demo/adapters/pet_em"
    shutil.copytree(tiny_model, zoo / "v1")
    shutil.copytree(tiny_model_b, zoo / "v2")
    random_lora_dir(zoo / "v1", ad / "v1", seed=1, r=8)
    for seed, name in ((2, "v2"), (3, "compat"), (4, "control")):
        random_lora_dir(zoo / "v2", ad / name, seed=seed, r=8)
    data = zoo / "data/pet_em"
    data.mkdir(parents=True)
    rows = [(f"{a} plus {b} is", f" {a + b}") for a in range(9) for b in range(6)]

    def write(name, recs):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in recs))

    write(
        "test.jsonl", [{"id": f"test-{i}", "prompt": p, "reference": c.strip()} for i, (p, c) in enumerate(rows[:12])]
    )
    write(
        "val.jsonl", [{"id": f"val-{i}", "prompt": p, "reference": c.strip()} for i, (p, c) in enumerate(rows[12:20])]
    )
    write("val_pairs.jsonl", [{"prompt": p, "completion": c + "."} for p, c in rows[12:20]])
    write("train_pairs.jsonl", [{"prompt": p, "completion": c + "."} for p, c in rows[20:]])
    return ws


def _runtime_env(ws: Path) -> dict:
    return {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": {"MUSCLE_WORKSPACE": str(ws)}}


def _wait(head: Head, job_id: str, timeout: float = 400.0) -> str:
    from ray.job_submission import JobStatus

    client, deadline = head.client(), time.time() + timeout
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.time() > deadline:
            client.stop_job(job_id)
            break
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-6000:]}"
    return logs


def test_score_job_via_ray_job_submit_cli(head, workspace):
    """The documented command: `ray job submit --working-dir . -- python jobs/score.py --config ...`."""
    import pyarrow.parquet as pq

    from muscle_ray.results import read_results

    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.address,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps({k: v for k, v in _runtime_env(workspace).items() if k != "working_dir"}),
        "--",
        "python",
        "jobs/score.py",
        "--config",
        "jobs/configs/score.yaml",
    ]
    res = subprocess.run(cmd, env=head.env, cwd=REPO, capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, f"ray job submit failed ({res.returncode}):\n{res.stdout[-6000:]}\n{res.stderr[-3000:]}"
    out = workspace / "runs/jobs/score/pet_em"
    summary = json.loads((out / "summary.json").read_text())
    assert [s["version"] for s in summary] == ["v1", "v2", "compat", "control"]
    for name in ("v1", "v2", "compat", "control"):
        table = read_results(out / name / "gen_jsonl")
        assert table.num_rows == 12 and table.column("id").to_pylist()[0] == "test-0"
    assert pq.read_table(out / "v1/gen_jsonl/errors.parquet").num_rows == 0


def test_compat_job_via_sdk_writes_adapter_to_uri(head, workspace, tmp_path):
    """train_compat.yaml as it is, but data, output and Ray Train storage as file:// URIs (what a
    cluster job reads from and writes to object storage) and 3 steps instead of 200."""
    dest = tmp_path / "exported" / "compat"
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    shutil.copy(workspace / "runs/demo/zoo/data/pet_em/train_pairs.jsonl", bucket / "pairs.jsonl")
    job_id = head.client().submit_job(
        entrypoint=f"python jobs/train_compat.py --config jobs/configs/train_compat.yaml --out file://{dest} "
        f"--data file://{bucket}/pairs.jsonl "
        f"--set run.storage_path=file://{bucket}/ray "
        "--set optim.max_steps=3 --set run.eval_every_steps=3 --set optim.micro_batch_size=8",
        runtime_env=_runtime_env(workspace),
    )
    logs = _wait(head, job_id)
    assert (dest / "adapter_config.json").is_file() and any(dest.glob("adapter_model.*")), logs[-3000:]
    manifest = json.loads((dest / "muscle_manifest.json").read_text())
    assert manifest["kind"] == "compat" and manifest["mask"] == "muscle"
    assert manifest["new_adapter"] == str(workspace / "runs/demo/adapters/pet_em/v2")
    assert manifest["data"] == f"file://{bucket}/pairs.jsonl"  # what was given, not the staged copy
    # Ray Train wrote its run directory (checkpoints) to the storage URI itself.
    assert any((bucket / "ray/pet_em-compat-job").rglob("checkpoint_*")), logs[-3000:]
    assert manifest["ray_run"]["storage_path"] == f"file://{bucket}/ray"


def test_score_job_reads_and_writes_uris_and_resumes_from_the_remote_shards(head, workspace, tmp_path):
    """data and out as file:// URIs; the second run fetches the finished shards and scores nothing."""
    from muscle_ray.results import read_results

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    shutil.copy(workspace / "runs/demo/zoo/data/pet_em/test.jsonl", bucket / "test.jsonl")
    run = (
        f"python jobs/score.py --config jobs/configs/score.yaml --data file://{bucket}/test.jsonl "
        f"--out file://{bucket}/results --version v2=runs/demo/zoo/v2:runs/demo/adapters/pet_em/v2 --limit 6"
    )
    job_id = head.client().submit_job(entrypoint=f"{run} && {run}", runtime_env=_runtime_env(workspace))
    logs = _wait(head, job_id)
    assert read_results(bucket / "results/v2/gen_jsonl").num_rows == 6
    log = (bucket / "results" / "logs" / "ray.log").read_text()  # the console keeps the job's lines there
    assert "resuming: 1/1 shards already done" in log, logs[-3000:]
    summary = json.loads((bucket / "results/summary.json").read_text())
    assert [(s["version"], s["scored"], s["resumed_shards"]) for s in summary] == [("v2", 0, 1)]
