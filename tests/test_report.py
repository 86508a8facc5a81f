"""The report turns real Comparisons into the paper's table and three files."""

import json

import numpy as np
import pyarrow as pa

from muscle_ray.metrics.compare import compare
from muscle_ray.report import mean_over_seeds, task_row, write_report


def _results(correct, pred, score=None):
    n = len(correct)
    return pa.table({
        "id": [str(i) for i in range(n)], "task": ["t"] * n, "correct": correct,
        "score": score if score is not None else [float(c) for c in correct],
        "prediction": pred, "reference": ["0"] * n,
    })


def test_task_row_and_files(tmp_path):
    v1 = _results([True, True, False, False, True], ["0", "0", "1", "2", "0"])
    v2 = _results([False, True, True, False, True], ["3", "0", "0", "1", "0"])
    compat = _results([True, True, True, False, True], ["0", "0", "0", "2", "0"])
    control = _results([False, True, True, True, True], ["3", "0", "0", "0", "0"])
    cmps = {"v2": compare(v1, v2, n_boot=50), "compat": compare(v1, compat, n_boot=50),
            "control": compare(v1, control, n_boot=50)}
    row = task_row("acc", cmps["v2"], cmps["compat"], cmps["control"])
    # hand-computed: v1 right on {0,1,4}; v2 breaks 0 (NFR 1/5), fixes 2 (PFR 1/5); compat breaks none.
    assert row["nfr"] == 0.2 and row["pfr"] == 0.2 and row["nfr_compat"] == 0.0
    assert row["d_nfr_c"] == -0.2 and row["d_pct_nfr_c"] == -100.0
    assert row["acc_control"] == 0.8 and row["nfr_control"] == 0.2
    assert (row["fixed"], row["broken"]) == (1, 0)
    assert np.isclose(row["d_acc_c"], 0.8 - 0.6)

    report = {"tasks": {"toy": mean_over_seeds([row, row])}, "timings": {"zoo": 1.0}}
    paths = write_report(report, {"toy": cmps}, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["tasks"]["toy"]["nfr_compat_per_seed"] == [0.0, 0.0]
    assert "| toy | acc | 60.00 | 60.00 | 80.00" in paths["md"].read_text()
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
