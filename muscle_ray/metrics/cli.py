"""`muscle flips OLD NEW [--compat COMPAT]`: what broke in an update, and is it real?"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from muscle_ray.errors import MuscleError
from muscle_ray.metrics.format import num as _num
from muscle_ray.metrics.format import pct, relative
from muscle_ray.metrics.text import SIMILARITIES


def _epsilon(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"epsilon must be a number >= 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old", help="old model's results: Parquet file/dir, results JSONL, or lm-eval samples_<task>_*.jsonl")
    parser.add_argument("new", help="new model's results (same forms)")
    parser.add_argument("--compat", help="the compatibility model's results: adds the paper's ΔNFR_c, Δacc_c, ... columns")
    parser.add_argument("--metric", choices=SIMILARITIES,
                        help="recompute S from prediction/reference with this similarity (default: use the 'score' column)")
    parser.add_argument("--epsilon", type=_epsilon, default=0.0, help="continuous flips need |D| > epsilon (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", type=Path, help="write flips.parquet, summary.json and PNG plots here")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates for the 95%% CIs")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--bertscore-model", help="local model directory for BERTScore (default: bundled MiniLM-L6)")
    parser.add_argument("--lmeval-metric", help="which per-sample lm-eval metric is correctness (default acc, else exact_match)")
    parser.add_argument("--lmeval-filter", help="which lm-eval filter's lines to read (default: the file's first)")


def run(args: argparse.Namespace) -> int:
    from muscle_ray.metrics.compare import columns_for, compare, compat_deltas
    from muscle_ray.results import read_results

    def load(path: str):
        # ids are checked for duplicates by the join itself (one hash pass instead of three)
        return read_results(path, columns=columns_for(args.metric), unique_ids=False,
                            lmeval_metric=args.lmeval_metric, lmeval_filter=args.lmeval_filter)

    old, new = load(args.old), load(args.new)
    opts = dict(metric=args.metric, epsilon=args.epsilon, n_boot=args.bootstrap, seed=args.seed,
                bertscore_model=args.bertscore_model)
    try:
        base = compare(old, new, names=(args.old, args.new), **opts)
        comp = compare(old, load(args.compat), names=(args.old, args.compat), **opts) if args.compat else None
    except ValueError as e:  # e.g. a BERTScore model directory that is not there
        raise MuscleError(f"--metric {args.metric}: {e}") from None
    summary = dict(base.summary)
    if comp is not None:
        summary["compat"] = comp.summary
        summary["deltas"] = compat_deltas(base.summary, comp.summary)
        if comp.summary["n"] != base.summary["n"]:
            print(f"muscle flips: warning: old->new joins {base.summary['n']} ids, old->compat "
                  f"{comp.summary['n']}; the deltas compare different instance sets", file=sys.stderr)
    if args.out:
        _write_out(args.out, base, comp, summary)
    if args.json:
        print(json.dumps(summary))
    else:
        print(format_table(summary))
    return 0


def _write_out(out: Path, base, comp, summary: dict) -> None:
    from muscle_ray.metrics import plots
    from muscle_ray.results import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(base.flip_table(), out / "flips.parquet")
    plots.quadrant_bars(base.summary, out / "quadrants.png")
    binary = bool(np.isin(base.s_old, (0.0, 1.0)).all() and np.isin(base.s_new, (0.0, 1.0)).all())
    if base.summary["kind"] == "continuous" or not binary:
        plots.d_histogram(base.s_new - base.s_old, base.summary["metric"], base.epsilon, out / "d_hist.png")
    if comp is not None:
        write_atomic(comp.flip_table(), out / "flips_compat.parquet")
        plots.quadrant_bars(comp.summary, out / "quadrants_compat.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def _rate(x) -> str:
    return f"{pct(x, unit=True):>8}"


def format_table(s: dict) -> str:
    """A readable plain-text report."""
    ci = s["ci"]

    def with_ci(key, ci_key):
        c = ci.get(ci_key)
        return _rate(s[key]) + (f"   95% CI [{100 * c[0]:.2f}, {100 * c[1]:.2f}]" if c else "")

    score_word = "acc" if s["kind"] == "discrete" else f"mean {s['metric']}"
    lines = [
        f"instances joined  {s['n']}   (only in old: {s['only_old']}, only in new: {s['only_new']})",
        f"metric            {s['metric']} ({s['kind']}, epsilon {s['epsilon']})",
        f"{score_word:<17} old {_rate(s['acc_old'])}   new {_rate(s['acc_new'])}",
        f"delta             {_rate(None if s['acc_new'] is None else s['acc_new'] - s['acc_old'])}"
        + (f"   95% CI [{100 * ci['delta_acc'][0]:.2f}, {100 * ci['delta_acc'][1]:.2f}]" if ci.get("delta_acc") else ""),
        f"NFR               {with_ci('nfr', 'nfr')}",
        f"PFR               {with_ci('pfr', 'pfr')}",
    ]
    if s["kind"] == "discrete":
        q = s["quadrants"]
        lines += [
            f"NFR_mc            {_rate(s['nfr_mc'])}",
            f"BTC / BEC         {_num(s['btc'])} / {_num(s['bec'])}",
            "quadrants         " + ", ".join(f"{k} {v}" for k, v in q.items()),
            f"McNemar p         {s['mcnemar_p']:.4g}",
        ]
    else:
        lines.append(f"sign test p       {s['mcnemar_p']:.4g}")
    lines.append(f"m_g / m_r         {_num(s['m_g'])} / {_num(s['m_r'])}")
    if s["only_old_examples"] or s["only_new_examples"]:
        lines.append(f"unmatched ids     old e.g. {s['only_old_examples']}, new e.g. {s['only_new_examples']}")
    if "deltas" in s:
        d, c = s["deltas"], s["compat"]
        rel = relative(d["d_pct_nfr_c"]) + "%"
        lines += [
            "",
            f"compat            n {c['n']}, acc {_rate(c['acc_new'])}, NFR_c {_rate(c['nfr'])}, PFR_c {_rate(c['pfr'])}",
            f"ΔNFR_c {_rate(d['d_nfr_c'])}   Δ%NFR_c {rel}   Δacc_c {_rate(d['d_acc_c'])}   ΔPFR_c {_rate(d['d_pfr_c'])}",
            f"Δm_g {_num(d['d_m_g'])}   Δm_r {_num(d['d_m_r'])}",
        ]
    return "\n".join(lines)
