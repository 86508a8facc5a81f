"""Every plot muscle-ray draws: PNG files of one comparison, and the report's embedded figures.

matplotlib is imported on first use (Agg backend: no display needed), so `muscle flips`
without `--out` never pays for it.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from muscle_ray.metrics import flips
from muscle_ray.metrics.format import pct


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def quadrant_bars(summary: dict, out: Path) -> Path:
    """Bar chart of the five quadrants (discrete) or improved / tie / regressed (continuous)."""
    plt = _pyplot()
    if summary.get("quadrants"):
        names, values = list(flips.QUADRANTS), [summary["quadrants"][k] for k in flips.QUADRANTS]
        colors = ["tab:green", "tab:blue", "tab:gray", "tab:orange", "tab:red"]
    else:
        c = summary["continuous"]
        names, values = (
            list(flips.DIRECTIONS),
            [c["improved"], summary["n"] - c["improved"] - c["regressed"], c["regressed"]],
        )
        colors = ["tab:blue", "tab:gray", "tab:red"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, values, color=colors)
    ax.set_ylabel("instances")
    nfr, pfr = pct(summary["nfr"], unit=True), pct(summary["pfr"], unit=True)
    ax.set_title(f"old -> new flips (n={summary['n']}, NFR={nfr}, PFR={pfr})")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def d_histogram(d: np.ndarray, metric: str, epsilon: float, out: Path) -> Path:
    """Histogram of D = S(new) - S(old), with the ±eps band marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.hist(d, bins=50, color="tab:purple")
    for x in {-epsilon, epsilon}:
        ax.axvline(x, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"D = {metric}(new) - {metric}(old)")
    ax.set_ylabel("instances")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _png(fig) -> str:
    """A figure as base64 PNG, for embedding in the HTML report."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def report_figures(report: dict, comparisons: dict) -> dict[str, str]:
    """Base64 PNGs: quadrants per update, NFR vs accuracy, and the distribution of D."""
    plt = _pyplot()
    figs: dict[str, str] = {}
    for task, cmps in comparisons.items():
        first = next(iter(cmps.values()))
        if first.summary.get("quadrants"):
            fig, ax = plt.subplots(figsize=(6, 3))
            names = list(first.summary["quadrants"])
            width = 0.8 / len(cmps)
            for i, (label, cmp) in enumerate(cmps.items()):
                q = cmp.summary["quadrants"]
                ax.bar(np.arange(len(names)) + i * width, [q[n] for n in names], width, label=f"v1→{label}")
            ax.set_xticks(
                np.arange(len(names)) + width * (len(cmps) - 1) / 2,
                [n.replace("_", " ") for n in names],
                rotation=20,
                fontsize=8,
            )
            ax.set_ylabel("instances")
            ax.set_title(f"{task}: quadrants of each update")
            ax.legend(fontsize=8)
            figs[f"{task}: quadrants"] = _png(fig)
        else:
            fig, ax = plt.subplots(figsize=(6, 3))
            for label, cmp in cmps.items():
                ax.hist(cmp.s_new - cmp.s_old, bins=40, alpha=0.5, label=f"v1→{label}")
            ax.axvline(0, color="k", lw=0.8)
            ax.set_xlabel("D = S(new) − S(v1)")
            ax.set_title(f"{task}: distribution of D")
            ax.legend(fontsize=8)
            figs[f"{task}: D distribution"] = _png(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    markers = {"v2": "o", "compat": "*", "control": "s"}
    for color, (task, r) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], report["tasks"].items()):
        pts = [("v2", r["acc_v2"], r["nfr"]), ("compat", r["acc_compat"], r["nfr_compat"])]
        if r.get("acc_control") is not None:
            pts.append(("control", r["acc_control"], r["nfr_control"]))
        ax.plot([100 * p[1] for p in pts], [100 * p[2] for p in pts], "-", color=color, alpha=0.35)
        for label, acc, nfr in pts:
            ax.scatter([100 * acc], [100 * nfr], marker=markers[label], s=70, color=color)
        ax.plot([], [], "-", color=color, label=task)
    for label, m in markers.items():
        ax.scatter([], [], marker=m, color="gray", label=label)
    ax.set_xlabel("accuracy / score (%)")
    ax.set_ylabel("NFR against v1 (%)")
    ax.set_title("NFR against accuracy: v2, compat, control")
    ax.legend(fontsize=7, ncol=2)
    figs["NFR vs accuracy"] = _png(fig)
    return figs


def fight_curves(title: str, fight: dict) -> str:
    """NFR against accuracy along training, compat and control (base64 PNG): both curves in
    step order from the v2 point (step 0), the accuracy range they share, and each curve's
    NFR at the matched accuracy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    styles = {"compat": ("tab:green", "*"), "control": ("tab:blue", "s")}
    for name, (color, marker) in styles.items():
        pts = fight["curves"][name]
        acc, nfr = [100 * p["acc"] for p in pts], [100 * p["nfr"] for p in pts]
        ax.plot(acc, nfr, "-", marker=marker, color=color, label=f"{name} (steps {pts[0]['step']}–{pts[-1]['step']})")
        ax.annotate(str(pts[-1]["step"]), (acc[-1], nfr[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    start = fight["curves"]["control"][0]
    if start["step"] == 0:
        ax.scatter([100 * start["acc"]], [100 * start["nfr"]], s=80, color="black", zorder=3, label="v2 (step 0)")
    m = fight["matched"]
    if m.get("overlap"):
        ax.axvspan(100 * m["overlap"][0], 100 * m["overlap"][1], color="gray", alpha=0.12, label="shared accuracy")
    if m.get("acc") is not None:
        ax.axvline(100 * m["acc"], color="black", lw=0.8, ls="--", label=f"matched accuracy {pct(m['acc'])}%")
        for name, (color, _) in styles.items():
            ax.scatter([100 * m["acc"]], [100 * m[f"nfr_{name}"]], marker="x", s=60, color=color, zorder=4)
    ax.set_xlabel("accuracy / score (%)")
    ax.set_ylabel("NFR against v1 (%)")
    ax.set_title(f"{title}: {fight['verdict']['verdict']}", fontsize=10)
    ax.legend(fontsize=7)
    return _png(fig)
