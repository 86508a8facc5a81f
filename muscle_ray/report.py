"""The MUSCLE update report: the paper's Tables 4-7 for each task, as JSON, Markdown and HTML.

Input is a set of Comparisons (v1 -> v2, v1 -> compat, v1 -> control) per task and seed; rates
stay fractions in JSON and are printed in percent, as the paper prints them.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

import numpy as np

from muscle_ray.metrics.compare import Comparison, compat_deltas
from muscle_ray.metrics.format import MISSING, pct, relative
from muscle_ray.metrics.plots import report_figures

ROW_KEYS = [
    "acc_v1",
    "acc_v2",
    "acc_compat",
    "acc_control",
    "d_acc_c",
    "nfr",
    "nfr_compat",
    "nfr_control",
    "d_nfr_c",
    "d_pct_nfr_c",
    "pfr",
    "pfr_compat",
    "pfr_control",
    "d_pfr_c",
    "nfr_mc",
    "nfr_mc_compat",
    "m_g",
    "m_r",
    "d_m_g",
    "d_m_r",
    "fixed",
    "broken",
]


def task_row(metric: str, v2: Comparison, compat: Comparison, control: Comparison | None = None) -> dict:
    """One table row: each model against v1, and the compat deltas against the vanilla update.

    `fixed`/`broken` count v1-right instances that compat gets right where v2 got them wrong,
    and the reverse: the paired view the miniature experiments recommend beside rates.
    """
    s, c = v2.summary, compat.summary
    row = {
        "metric": metric,
        "acc_v1": s["acc_old"],
        "acc_v2": s["acc_new"],
        "acc_compat": c["acc_new"],
        "nfr": s["nfr"],
        "nfr_compat": c["nfr"],
        "pfr": s["pfr"],
        "pfr_compat": c["pfr"],
        "nfr_mc": s.get("nfr_mc"),
        "nfr_mc_compat": c.get("nfr_mc"),
        "m_g": s["m_g"],
        "m_r": s["m_r"],
    }
    d = compat_deltas(s, c)
    row.update(
        {
            "d_acc_c": d["d_acc_c"],
            "d_nfr_c": d["d_nfr_c"],
            "d_pct_nfr_c": d["d_pct_nfr_c"],
            "d_pfr_c": d["d_pfr_c"],
            "d_m_g": d["d_m_g"],
            "d_m_r": d["d_m_r"],
        }
    )
    if control is not None:
        row.update(
            {
                "acc_control": control.summary["acc_new"],
                "nfr_control": control.summary["nfr"],
                "pfr_control": control.summary["pfr"],
            }
        )
    # Paired fixed/broken among the instances both comparisons joined (v1 right on them).
    ids_v2 = v2.paired.old_column("id").to_numpy(zero_copy_only=False)
    ids_c = compat.paired.old_column("id").to_numpy(zero_copy_only=False)
    _, i_v2, i_c = np.intersect1d(ids_v2, ids_c, assume_unique=True, return_indices=True)
    d_v2, d_c = (v2.s_new - v2.s_old)[i_v2], (compat.s_new - compat.s_old)[i_c]
    row["fixed"] = int(np.sum((d_v2 < 0) & (d_c >= 0)))
    row["broken"] = int(np.sum((d_v2 >= 0) & (d_c < 0)))
    return row


def mean_over_seeds(rows: list[dict]) -> dict:
    """Mean of each number over seeds, with the per-seed values and their spread beside it."""
    out = {"metric": rows[0]["metric"], "seeds": len(rows)}
    for k in ROW_KEYS:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if not vals:
            continue
        out[k] = float(np.mean(vals))
        if len(rows) > 1:
            out[f"{k}_per_seed"] = vals
            out[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def _spread(row: dict, key: str) -> str:
    s = row.get(f"{key}_std")
    return f" ±{100 * s:.2f}" if s is not None else ""


def tables_markdown(report: dict) -> str:
    """Tables 4-6 (one row per task) and, when present, the Table 7 ablation."""
    head = [
        "task",
        "metric",
        "acc v1",
        "acc v2",
        "acc compat",
        "acc control",
        "Δacc_c",
        "NFR",
        "NFR compat",
        "NFR control",
        "ΔNFR_c",
        "Δ%NFR_c",
        "m_g",
        "m_r",
        "Δm_g",
        "Δm_r",
        "fixed/broken",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in report["tasks"].items():
        cont = r["metric"] not in ("acc", "exact")  # m_g, m_r: continuous metrics only
        cells = [
            name,
            r["metric"],
            pct(r["acc_v1"]),
            pct(r["acc_v2"]),
            pct(r["acc_compat"]) + _spread(r, "acc_compat"),
            pct(r.get("acc_control")),
            pct(r["d_acc_c"], True),
            pct(r["nfr"]) + _spread(r, "nfr"),
            pct(r["nfr_compat"]) + _spread(r, "nfr_compat"),
            pct(r.get("nfr_control")),
            pct(r["d_nfr_c"], True),
            relative(r.get("d_pct_nfr_c")),
            *(pct(r.get(k), signed=k.startswith("d_")) if cont else MISSING for k in ("m_g", "m_r", "d_m_g", "d_m_r")),
            f"{r.get('fixed', 0):.0f}/{r.get('broken', 0):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("ablation"):
        ab = report["ablation"]
        lines += [
            "",
            f"Masking ablation on {ab['task']} (baseline NFR {pct(ab['nfr'])}):",
            "",
            "| mask | acc | NFR | ΔNFR_c | Δ%NFR_c | ΔPFR_c | Δacc_c |",
            "|---|---|---|---|---|---|---|",
        ]
        for mask, r in ab["masks"].items():
            lines.append(
                f"| {mask} | {pct(r['acc_compat'])} | {pct(r['nfr_compat'])} | {pct(r['d_nfr_c'], True)} | "
                f"{relative(r.get('d_pct_nfr_c'))} | "
                f"{pct(r['d_pfr_c'], True)} | {pct(r['d_acc_c'], True)} |"
            )
    return "\n".join(lines)


def verdict(row: dict) -> str:
    """Compat against the fair control on one task: fewer flips at no lower accuracy wins."""
    if row.get("nfr_control") is None:
        return MISSING
    d_nfr, d_acc = row["nfr_compat"] - row["nfr_control"], row["acc_compat"] - row["acc_control"]
    if d_nfr == 0 and d_acc == 0:
        return "tie"
    if d_nfr <= 0 and d_acc >= 0:
        return "compat better"
    if d_nfr >= 0 and d_acc <= 0:
        return "control better"
    return "fewer flips, lower acc" if d_nfr < 0 else "more flips, higher acc"


def verdict_table(report: dict) -> str:
    """The console's summary of a run: accuracy and NFR of each model, and compat against the
    control per task (report.md has every column, the spread over seeds and the ablation)."""
    lines = [
        f"{'':<19}{'accuracy / score (%)':^32}  {'NFR against v1 (%)':^24}".rstrip(),
        f"{'task':<12}{'metric':<7}"
        + "".join(f"{c:>8}" for c in ("v1", "v2", "compat", "control"))
        + "  "
        + "".join(f"{c:>8}" for c in ("v2", "compat", "control"))
        + f"{'Δ%NFR_c':>9}  compat vs control",
    ]
    for name, r in report["tasks"].items():
        accs = "".join(f"{pct(r.get(k)):>8}" for k in ("acc_v1", "acc_v2", "acc_compat", "acc_control"))
        nfrs = "".join(f"{pct(r.get(k)):>8}" for k in ("nfr", "nfr_compat", "nfr_control"))
        lines.append(f"{name:<12}{r['metric']:<7}{accs}  {nfrs}{relative(r.get('d_pct_nfr_c')):>9}  {verdict(r)}")
    return "\n".join(lines)


def write_report(report: dict, comparisons: dict[str, dict[str, Comparison]], out: str | Path) -> dict[str, Path]:
    """report.json (every number), report.md (tables), report.html (tables + embedded plots)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = (
        "# MUSCLE update report\n\n"
        + tables_markdown(report)
        + "\n\nRates in %. Timings (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in report.get("timings", {}).items())
        + "\n"
    )
    images = report_figures(report, comparisons)
    body = "".join(
        f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'/>"
        for t, b in images.items()
    )
    table_html = _markdown_table_to_html(tables_markdown(report))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>MUSCLE update report</title>"
        f"<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}"
        f"td,th{{border:1px solid #ccc;padding:3px 6px;font-size:13px}}</style></head><body>"
        f"<h1>MUSCLE update report</h1>{table_html}<p>Rates in %.</p>{body}"
        f"<h3>report.json</h3><pre>{html.escape(json.dumps(report, indent=1))}</pre></body></html>"
    )
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["md"].write_text(md)
    paths["html"].write_text(page)
    return paths


def _markdown_table_to_html(md: str) -> str:
    parts, rows = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                rows.append([html.escape(c.strip()) for c in line.strip("|").split("|")])
            continue
        if rows:
            head, *rest = rows
            parts.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rest)
                + "</table>"
            )
            rows = []
        if line:
            parts.append(f"<p>{html.escape(line)}</p>")
    return "".join(parts)
