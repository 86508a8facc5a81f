"""How rates read in every table: one spelling for a rate, a signed delta and a missing value."""

from __future__ import annotations

MISSING = "–"


def pct(x: float | None, signed: bool = False, unit: bool = False) -> str:
    """A fraction as percent with two decimals; `signed` for deltas; MISSING for None."""
    if x is None:
        return MISSING
    return f"{100 * x:{'+' if signed else ''}.2f}" + ("%" if unit else "")


def num(x: float | None, digits: int = 4) -> str:
    """A plain number (m_g, m_r, BTC), MISSING for None."""
    return MISSING if x is None else f"{x:.{digits}f}"


def relative(x: float | None) -> str:
    """An already-relative change in percent (Δ%NFR_c), signed with one decimal."""
    return MISSING if x is None else f"{x:+.1f}"
