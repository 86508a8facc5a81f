"""PNG plots of a comparison (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from muscle_ray.metrics import flips


def quadrant_bars(summary: dict, out: Path) -> Path:
    """Bar chart of the five quadrants (discrete) or improved / tie / regressed (continuous)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if summary.get("quadrants"):
        names, values = list(flips.QUADRANTS), [summary["quadrants"][k] for k in flips.QUADRANTS]
        colors = ["tab:green", "tab:blue", "tab:gray", "tab:orange", "tab:red"]
    else:
        c = summary["continuous"]
        names, values = list(flips.DIRECTIONS), [c["improved"], summary["n"] - c["improved"] - c["regressed"], c["regressed"]]
        colors = ["tab:blue", "tab:gray", "tab:red"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, values, color=colors)
    ax.set_ylabel("instances")
    ax.set_title(f"old -> new flips (n={summary['n']}, NFR={_pct(summary['nfr'])}, PFR={_pct(summary['pfr'])})")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def d_histogram(d: np.ndarray, metric: str, epsilon: float, out: Path) -> Path:
    """Histogram of D = S(new) - S(old), with the ±eps band marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"
