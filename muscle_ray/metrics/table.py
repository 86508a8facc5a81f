"""The plain-text report `muscle flips` prints: one summary (and its compat deltas) as a table."""

from __future__ import annotations

from muscle_ray.metrics.format import num as _num
from muscle_ray.metrics.format import pct, relative


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
        + (
            f"   95% CI [{100 * ci['delta_acc'][0]:.2f}, {100 * ci['delta_acc'][1]:.2f}]" if ci.get("delta_acc") else ""
        ),
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
            f"compat            n {c['n']}, acc {_rate(c['acc_new'])}, NFR_c {_rate(c['nfr'])}, "
            f"PFR_c {_rate(c['pfr'])}",
            f"ΔNFR_c {_rate(d['d_nfr_c'])}   Δ%NFR_c {rel}   Δacc_c {_rate(d['d_acc_c'])}   "
            f"ΔPFR_c {_rate(d['d_pfr_c'])}",
            f"Δm_g {_num(d['d_m_g'])}   Δm_r {_num(d['d_m_r'])}",
        ]
    return "\n".join(lines)
