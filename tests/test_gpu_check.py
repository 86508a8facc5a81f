"""bench/gpu_check.py, the accelerator smoke check, runs end to end on a CPU with --size tiny."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_tiny_passes_every_check(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "2", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    by_check = {r["check"]: r for r in report["results"]}
    assert report["ok"] and set(by_check) == {"env", "scoring", "task", "compat", "fsdp"}
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["check"] for r in lines] == ["env", "scoring", "task", "compat", "fsdp"]
    for name in ("task", "compat", "fsdp"):
        r = by_check[name]
        assert len(r["losses"]) == 3 and r["step_s_median"] > 0 and r["peak_rss"] > 0, r
    # MUSCLE's mask sends each token to one teacher: a share in [0, 1], and the KL is >= 0
    assert 0.0 <= by_check["compat"]["share_v1"] <= 1.0 and min(by_check["compat"]["losses"]) >= 0.0
    assert by_check["fsdp"]["backend"] == "gloo"
    # the same weights and batch under FSDP (bf16 params) as without: the first loss agrees closely
    assert abs(by_check["fsdp"]["losses"][0] - by_check["compat"]["losses"][0]) < 0.05 * by_check["compat"]["losses"][0]
    assert by_check["scoring"]["agreement"] >= 0.9 and by_check["scoring"]["items"] == 32
    # the script must stay runnable where muscle-ray and Ray are not installed: torch, transformers, peft only
    imported = set()
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch", "transformers", "peft"}


def test_gpu_check_exit_code_names_the_failed_check(capsys):
    """A failed check is exit code 1 and a FAIL line, and the other checks still run."""
    import torch

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        code = module.main(["--size", "tiny", "--steps", "1", "--warmup", "0", "--min-agreement", "1.01"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL  scoring  agreement" in out and "agreement 1.000 < 1.01" in out and "PASS  fsdp" in out
