"""The MUSCLE update report: the paper's Tables 4-7 for each task, as JSON, Markdown and HTML.

Input is a set of Comparisons (v1 -> v2, v1 -> compat, v1 -> control) per task and seed; rates
stay fractions in JSON and are printed in percent, as the paper prints them.

A task's row (`task_row`) may also carry, each optional (a row without them renders as before):
  "fight": `metrics.fight.fair_fight(...)`: {"curves": {"compat": [...], "control": [...]},
      "matched": {...}, "mcnemar": {...}, "verdict": {...}} (shapes in muscle_ray/metrics/fight.py);
  "plateau": `fight.plateau(...)`; "flip_overlap": `fight.flip_overlap(...)`;
  "selected": `fight.select_for_compat(...)` plus "test": `fight.point(<that snapshot on test>, step)`;
  "variants": {name: task_row(metric, v2, <variant>)} for extra compat variants ("muscle+ce", ...).
`mean_over_seeds` keeps them as they are for one seed and as "<key>_per_seed" lists for several.

report["base_seeds"] (optional) pools the fight over pairs of base seeds:
  {"pairs": [[v1_seed, v2_seed], ...],
   "tasks": {task: {"rows": [task row per pair, in "pairs" order],
                    "pooled_mcnemar": fight.pooled_mcnemar([row["fight"]["mcnemar"] per pair])}}}
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

import numpy as np

from muscle_ray.metrics.compare import Comparison, compat_deltas
from muscle_ray.metrics.format import MISSING, num, pct, relative
from muscle_ray.metrics.plots import fight_curves, report_figures

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
    "nfr_mc_control",
    "both_wrong_diff",
    "both_wrong_diff_compat",
    "both_wrong_diff_control",
    "m_g",
    "m_r",
    "d_m_g",
    "d_m_r",
    "fixed",
    "broken",
]
EXTRA_KEYS = ("fight", "plateau", "flip_overlap", "selected", "variants")


def task_row(
    metric: str,
    v2: Comparison,
    compat: Comparison,
    control: Comparison | None = None,
    *,
    fight: dict | None = None,
    plateau: dict | None = None,
    flip_overlap: dict | None = None,
    selected: dict | None = None,
    variants: dict[str, dict] | None = None,
) -> dict:
    """One table row: each model against v1, and the compat deltas against the vanilla update.

    `fixed`/`broken` count v1-right instances that compat gets right where v2 got them wrong,
    and the reverse: the paired view the miniature experiments recommend beside rates. The
    keyword fields are the fair fight's (see the module docstring); None leaves them out.
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
        "both_wrong_diff": _both_wrong_diff(s),
        "both_wrong_diff_compat": _both_wrong_diff(c),
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
                "nfr_mc_control": control.summary.get("nfr_mc"),
                "both_wrong_diff_control": _both_wrong_diff(control.summary),
            }
        )
    # Paired fixed/broken among the instances both comparisons joined (v1 right on them).
    ids_v2 = v2.paired.old_column("id").to_numpy(zero_copy_only=False)
    ids_c = compat.paired.old_column("id").to_numpy(zero_copy_only=False)
    _, i_v2, i_c = np.intersect1d(ids_v2, ids_c, assume_unique=True, return_indices=True)
    d_v2, d_c = (v2.s_new - v2.s_old)[i_v2], (compat.s_new - compat.s_old)[i_c]
    row["fixed"] = int(np.sum((d_v2 < 0) & (d_c >= 0)))
    row["broken"] = int(np.sum((d_v2 >= 0) & (d_c < 0)))
    extras = dict(fight=fight, plateau=plateau, flip_overlap=flip_overlap, selected=selected, variants=variants)
    row.update({k: v for k, v in extras.items() if v is not None})
    return row


def _both_wrong_diff(summary: dict) -> float | None:
    """Both wrong with different answers, as a rate over all instances (None: continuous)."""
    q = summary.get("quadrants")
    return q["both_wrong_different"] / summary["n"] if q and summary["n"] else None


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
    for k in EXTRA_KEYS:
        if len(rows) == 1 and rows[0].get(k) is not None:
            out[k] = rows[0][k]
        elif any(r.get(k) is not None for r in rows):
            out[f"{k}_per_seed"] = [r.get(k) for r in rows]
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


def entries(report: dict, row: dict, key: str) -> list[tuple[str, dict]]:
    """A row's `key` field as (label suffix, value) pairs: one for a single seed, one per seed
    (labelled by report["seeds"]) where `mean_over_seeds` kept "<key>_per_seed"."""
    if row.get(key) is not None:
        return [("", row[key])]
    per_seed = row.get(f"{key}_per_seed") or []
    seeds = report.get("seeds") or []
    names = [f"seed {x}" for x in seeds] if len(seeds) == len(per_seed) else [f"#{i}" for i in range(len(per_seed))]
    return [(f" ({n})", v) for n, v in zip(names, per_seed) if v is not None]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _triple(row: dict, key: str) -> str:
    """v2 / compat / control of one rate (key, key_compat, key_control)."""
    return " / ".join(pct(row.get(k)) for k in (key, f"{key}_compat", f"{key}_control"))


def _accs(row: dict) -> str:
    return " / ".join(pct(row.get(k)) for k in ("acc_v2", "acc_compat", "acc_control"))


def _matched_cells(fight: dict) -> list[str]:
    m, mc = fight["matched"], fight["mcnemar"]
    ci = f" [{pct(m['ci'][0], True)}, {pct(m['ci'][1], True)}]" if m.get("ci") else ""
    return [
        pct(m.get("acc")),
        f"{pct(m.get('nfr_compat'))} / {pct(m.get('nfr_control'))}",
        pct(m.get("diff"), True) + ci,
        f"{mc['b']}/{mc['c']} of {mc['n']}",
        f"{mc['p']:.3g}",
        fight["verdict"]["verdict"],
    ]


def _fight_section(report: dict) -> list[str]:
    head = ["task", "acc v2/compat/control", "NFR v2/compat/control", "NFR_mc v2/compat/control"]
    head += ["both wrong ≠ v2/compat/control", "matched acc", "NFR@ compat/control", "Δ NFR [CI]"]
    head += ["McNemar b/c", "p", "verdict"]
    rows, why = [], []
    for name, r in report["tasks"].items():
        for label, f in entries(report, r, "fight"):
            rates = [_triple(r, k) for k in ("nfr", "nfr_mc", "both_wrong_diff")]
            rows.append([name + label, _accs(r), *rates, *_matched_cells(f)])
            why.append(f"- {name}{label}: {f['verdict']['verdict']}: {f['verdict']['why']}.")
    if not rows:
        return []
    return [
        "## Fair fight: compat against the CE control",
        "",
        *_table(head, rows),
        "",
        "acc, NFR, NFR_mc and both-wrong-different (rates over all instances): the exported adapters, as above. "
        "NFR@: each curve of snapshots at the matched accuracy (lower envelope of the step-order path); "
        "McNemar on v1-right instances, final snapshots: b = compat keeps where the control breaks, c = the reverse.",
        "",
        *why,
    ]


def _fit_section(report: dict) -> list[str]:
    head = ["task", "CE steps", "Δacc after", "max abs Δacc", "at plateau", "flip Jaccard", "chance", "ratio"]
    head += ["acc v1 range", "acc v2 range", "NFR v2", "NFR ≥ 5%"]
    rows = []
    for name, r in report["tasks"].items():
        plateaus, overlaps = entries(report, r, "plateau"), entries(report, r, "flip_overlap")
        labels = sorted({lb for lb, _ in plateaus + overlaps})
        for label in labels:
            p = next((v for lb, v in plateaus if lb == label), None)
            o = next((v for lb, v in overlaps if lb == label), None)
            cells = [str(p["steps"]), pct(p["delta"], True), pct(p["max_abs_delta"])] if p else [MISSING] * 3
            cells.append(("yes" if p["at_plateau"] else "no") if p else MISSING)
            if o:
                ratio = MISSING if o.get("ratio") is None else f"{o['ratio']:.1f}×"
                cells += [num(o.get("jaccard"), 3), num(o.get("jaccard_chance"), 3), ratio]
                cells += [pct(o["acc_v1_range"]), pct(o["acc_v2_range"])]
            else:
                cells += [MISSING] * 5
            nfr = r.get("nfr")
            cells += [pct(nfr), MISSING if nfr is None else ("yes" if nfr >= 0.05 else "no")]
            rows.append([name + label, *cells])
    if not rows:
        return []
    return [
        "## Is the world fit for the question",
        "",
        *_table(head, rows),
        "",
        "Plateau: how far the control's plain CE steps move v2's accuracy (at plateau: under the threshold). "
        "Flip Jaccard: mean pairwise overlap of v1→v2 negative flips across adapter seeds; ratio = overlap / "
        "its chance value (independent random sets of the same sizes): far above 1, the flips are the bases' doing. "
        "Ranges: accuracy spread across adapter seeds.",
    ]


def _selection_section(report: dict) -> list[str]:
    head = ["task", "floor", "step", "val acc", "val NFR", "test acc", "test NFR", "test PFR", "NFR v2", "NFR compat"]
    rows = []
    for name, r in report["tasks"].items():
        for label, s in entries(report, r, "selected"):
            t = s.get("test") or {}
            rows.append(
                [name + label, pct(s.get("floor")), str(s["step"]), pct(s["val_acc"]), pct(s["val_nfr"])]
                + [pct(t.get("acc")), pct(t.get("nfr")), pct(t.get("pfr")), pct(r.get("nfr")), pct(r.get("nfr_compat"))]
            )
    if not rows:
        return []
    return [
        "## Selection for compatibility",
        "",
        *_table(head, rows),
        "",
        "The compat snapshot with the lowest validation NFR among those within `floor` of v2's validation accuracy.",
    ]


def _variants_section(report: dict) -> list[str]:
    head = ["task", "variant", "acc", "NFR", "PFR", "NFR_mc", "ΔNFR_c", "Δ%NFR_c", "Δacc_c", "fixed/broken"]
    rows = []
    for name, r in report["tasks"].items():
        for label, variants in entries(report, r, "variants"):
            for v, x in variants.items():
                rows.append(
                    [name + label, v, pct(x["acc_compat"]), pct(x["nfr_compat"]), pct(x.get("pfr_compat"))]
                    + [pct(x.get("nfr_mc_compat")), pct(x.get("d_nfr_c"), True), relative(x.get("d_pct_nfr_c"))]
                    + [pct(x.get("d_acc_c"), True), f"{x.get('fixed', 0):.0f}/{x.get('broken', 0):.0f}"]
                )
    if not rows:
        return []
    return ["## Compat variants (against v2)", "", *_table(head, rows)]


def _base_seeds_section(report: dict) -> list[str]:
    bs = report.get("base_seeds")
    if not bs:
        return []
    head = ["task", "bases v1, v2", "acc v2/compat/control", "NFR v2/compat/control", "matched acc"]
    head += ["NFR@ compat/control", "Δ NFR [CI]", "McNemar b/c", "p", "verdict"]
    rows = []
    for name, t in bs["tasks"].items():
        for pair, r in zip(bs["pairs"], t["rows"]):
            f = r.get("fight")
            cells = [_accs(r), _triple(r, "nfr"), *(_matched_cells(f) if f else [MISSING] * 6)]
            rows.append([name, f"{pair[0]}, {pair[1]}", *cells])
        pm = t.get("pooled_mcnemar")
        if pm:
            pooled = [f"{pm['b']}/{pm['c']} of {pm['n']}", f"{pm['p']:.3g}", MISSING]
            rows.append([name, f"pooled ({pm['pairs']} pairs)", *[MISSING] * 5, *pooled])
    return [
        "## Over pairs of base seeds",
        "",
        *_table(head, rows),
        "",
        "Pooled: McNemar with b and c summed over the pairs.",
    ]


def fight_markdown(report: dict) -> str:
    """The fair-fight sections, each only where some task row carries its fields."""
    sections = [
        _fight_section(report),
        _fit_section(report),
        _selection_section(report),
        _variants_section(report),
        _base_seeds_section(report),
    ]
    return "\n\n".join("\n".join(s) for s in sections if s)


def verdict(row: dict) -> str:
    """Compat against the fair control on one task: the computed verdict of the fight when the
    row has one (`metrics.fight.verdict`), else fewer flips at no lower accuracy wins."""
    if row.get("fight"):
        return row["fight"]["verdict"]["verdict"]
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
    fights = fight_markdown(report)
    md = (
        "# MUSCLE update report\n\n"
        + tables_markdown(report)
        + "\n\nRates in %. Timings (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in report.get("timings", {}).items())
        + "\n"
        + (f"\n{fights}\n" if fights else "")
    )
    images = report_figures(report, comparisons)
    for name, r in report["tasks"].items():
        for label, f in entries(report, r, "fight"):
            images[f"{name}{label}: NFR vs accuracy along training"] = fight_curves(f"{name}{label}", f)
    body = "".join(
        f"<h3>{html.escape(t)}</h3><img alt='{html.escape(t)}' src='data:image/png;base64,{b}'/>"
        for t, b in images.items()
    )
    table_html = _markdown_table_to_html(tables_markdown(report) + ("\n\n" + fights if fights else ""))
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
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            parts.append(f"<h{level}>{html.escape(line[level:].strip())}</h{level}>")
        elif line:
            parts.append(f"<p>{html.escape(line)}</p>")
    return "".join(parts)
