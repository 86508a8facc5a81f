"""Per-instance text similarity S(prediction, reference), through the standard packages."""

from __future__ import annotations

import numpy as np

ROUGE_KINDS = ("rouge1", "rouge2", "rougeL")


def rouge(predictions: list[str], references: list[str], kind: str = "rouge1") -> np.ndarray:
    """ROUGE F1 per instance with rouge-score (stemming on, as in most summarisation papers)."""
    from rouge_score import rouge_scorer

    if kind not in ROUGE_KINDS:
        raise ValueError(f"unknown ROUGE kind {kind!r}; choose one of {ROUGE_KINDS}")
    scorer = rouge_scorer.RougeScorer([kind], use_stemmer=True)
    return np.array([scorer.score(r, p)[kind].fmeasure for p, r in zip(predictions, references)], dtype=np.float64)
