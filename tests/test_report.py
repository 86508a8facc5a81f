"""The report turns real Comparisons into the paper's table and three files."""

import json

import numpy as np
import pyarrow as pa

from muscle_ray.metrics.compare import compare
from muscle_ray.report import fight_markdown, mean_over_seeds, task_row, verdict, verdict_table, write_report


def _results(correct, pred, score=None):
    n = len(correct)
    return pa.table(
        {
            "id": [str(i) for i in range(n)],
            "task": ["t"] * n,
            "correct": correct,
            "score": score if score is not None else [float(c) for c in correct],
            "prediction": pred,
            "reference": ["0"] * n,
        }
    )


def test_task_row_and_files(tmp_path):
    v1 = _results([True, True, False, False, True], ["0", "0", "1", "2", "0"])
    v2 = _results([False, True, True, False, True], ["3", "0", "0", "1", "0"])
    compat = _results([True, True, True, False, True], ["0", "0", "0", "2", "0"])
    control = _results([False, True, True, True, True], ["3", "0", "0", "0", "0"])
    cmps = {
        "v2": compare(v1, v2, n_boot=50),
        "compat": compare(v1, compat, n_boot=50),
        "control": compare(v1, control, n_boot=50),
    }
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


def _row(acc_compat, nfr_compat, acc_control=0.8, nfr_control=0.1):
    return {
        "metric": "acc",
        "acc_v1": 0.7,
        "acc_v2": 0.75,
        "acc_compat": acc_compat,
        "acc_control": acc_control,
        "nfr": 0.2,
        "nfr_compat": nfr_compat,
        "nfr_control": nfr_control,
        "d_pct_nfr_c": -50.0,
    }


def test_verdict_weighs_compat_against_the_control_on_flips_and_accuracy():
    assert verdict(_row(acc_compat=0.80, nfr_compat=0.05)) == "compat better"  # fewer flips, same acc
    assert verdict(_row(acc_compat=0.85, nfr_compat=0.10)) == "compat better"  # same flips, higher acc
    assert verdict(_row(acc_compat=0.78, nfr_compat=0.12)) == "control better"
    assert verdict(_row(acc_compat=0.80, nfr_compat=0.10)) == "tie"
    assert verdict(_row(acc_compat=0.70, nfr_compat=0.05)) == "fewer flips, lower acc"
    assert verdict(_row(acc_compat=0.90, nfr_compat=0.15)) == "more flips, higher acc"
    assert verdict({k: v for k, v in _row(0.8, 0.1).items() if k != "nfr_control"}) == "–"


def test_verdict_table_has_a_row_per_task_in_percent():
    table = verdict_table({"tasks": {"home_mc": _row(0.8, 0.05), "trip_rouge": {**_row(0.7, 0.2), "metric": "rouge1"}}})
    head, cols, *rows = table.splitlines()
    assert "accuracy" in head and "NFR" in head and cols.split()[:2] == ["task", "metric"]
    assert rows[0].split() == [
        "home_mc",
        "acc",
        "70.00",
        "75.00",
        "80.00",
        "80.00",
        "20.00",
        "5.00",
        "10.00",
        "-50.0",
        "compat",
        "better",
    ]
    assert rows[1].split()[:2] == ["trip_rouge", "rouge1"] and rows[1].endswith("control better")


def test_mean_over_seeds_keeps_each_seed_and_the_spread():
    rows = [{**_row(0.8, 0.05), "d_acc_c": 0.05}, {**_row(0.9, 0.15), "d_acc_c": 0.15}]
    out = mean_over_seeds(rows)
    assert out["seeds"] == 2 and out["acc_compat_per_seed"] == [0.8, 0.9]
    assert np.isclose(out["acc_compat"], 0.85) and np.isclose(out["nfr_compat_std"], 0.0707107, atol=1e-6)
    assert "nfr_control_std" in out and out["nfr_control_std"] == 0.0  # the same in both seeds
    assert "m_g" not in out  # absent stays absent, not 0
    single = mean_over_seeds(rows[:1])
    assert single["acc_compat"] == 0.8 and "acc_compat_per_seed" not in single and "acc_compat_std" not in single


def _fight(diff: float, verdict_name: str) -> dict:
    """A hand-made row["fight"] (the shape metrics.fight.fair_fight returns)."""
    curve = [{"step": s, "acc": a, "nfr": n} for s, a, n in ((0, 0.75, 0.2), (100, 0.8, 0.1))]
    return {
        "curves": {"compat": curve, "control": curve},
        "matched": {
            "acc": 0.8,
            "nfr_compat": 0.1 + diff,
            "nfr_control": 0.1,
            "diff": diff,
            "ci": [diff - 0.01, diff + 0.01],
        },
        "mcnemar": {"n": 70, "b": 12, "c": 3, "p": 0.035},
        "verdict": {"verdict": verdict_name, "why": "numbers"},
    }


def test_extra_fields_survive_mean_over_seeds_and_render_per_seed(tmp_path):
    one = mean_over_seeds([{**_row(0.8, 0.05), "fight": _fight(-0.03, "compat better")}])
    assert one["fight"]["matched"]["diff"] == -0.03 and "fight_per_seed" not in one
    assert verdict(one) == "compat better"  # the computed verdict, not the rule of thumb
    two = mean_over_seeds([{**_row(0.8, 0.05), "fight": _fight(-0.03, "compat better")}, _row(0.8, 0.05)])
    assert "fight" not in two and two["fight_per_seed"][1] is None
    assert "plateau_per_seed" not in two  # absent in every seed: absent
    md = fight_markdown({"tasks": {"home_mc": two}, "seeds": [3, 4]})
    assert "| home_mc (seed 3) | 75.00 / 80.00 / 80.00 | 20.00 / 5.00 / 10.00 |" in md
    assert "| 80.00 | 7.00 / 10.00 | -3.00 [-4.00, -2.00] | 12/3 of 70 | 0.035 | compat better |" in md
    assert "seed 4" not in md and "Is the world fit" not in md  # seed 4 has no fight; no plateau anywhere


def test_base_seed_pairs_render_each_pair_and_the_pooled_test(tmp_path):
    rows = [{**_row(0.8, 0.05), "fight": _fight(-0.03, "compat better")}, _row(0.8, 0.12)]
    report = {
        "tasks": {"home_mc": {**_row(0.8, 0.05), "d_acc_c": 0.05, "d_nfr_c": -0.15}},
        "base_seeds": {
            "pairs": [[0, 1], [2, 3]],
            "tasks": {
                "home_mc": {"rows": rows, "pooled_mcnemar": {"b": 20, "c": 4, "n": 140, "p": 0.0015, "pairs": 2}}
            },
        },
    }
    lines = fight_markdown(report).splitlines()
    assert lines[0] == "## Over pairs of base seeds"
    body = [line for line in lines if line.startswith("| home_mc")]
    assert body[0].startswith("| home_mc | 0, 1 |") and body[0].endswith("| compat better |")
    assert body[1].startswith("| home_mc | 2, 3 |") and body[1].count("–") == 6  # no fight for that pair
    assert body[2].startswith("| home_mc | pooled (2 pairs) |") and "| 20/4 of 140 | 0.0015 |" in body[2]
    page = write_report(report, {}, tmp_path)["html"].read_text()
    assert "<h2>Over pairs of base seeds</h2>" in page and page.count("<table>") == 2
