"""Semi-automatic cleaning (the article): a photo whose mean distance to its landmark's 3-5
hand-picked references exceeds a threshold is treated as a non-landmark and left out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.local_index import grouped_by_id


@dataclass
class CleaningReport:
    kept: int
    dropped: int
    threshold: float
    precision: float | None = None  # of the drops, how many were really dirty (synthetic truth)
    recall: float | None = None     # of the dirty photos, how many were dropped


def mean_reference_similarity(embeddings: np.ndarray, labels: np.ndarray,
                              references: dict[int, np.ndarray]) -> np.ndarray:
    """Each photo's mean similarity to its landmark's references; NaN where the landmark has none."""
    out = np.full(len(embeddings), np.nan, dtype=np.float32)
    for landmark_id, rows in grouped_by_id(np.asarray(labels), np.arange(len(labels))).items():
        refs = references.get(landmark_id)
        if refs is not None and len(refs):
            out[rows] = (embeddings[rows] @ refs.T).mean(axis=1)
    return out


def reference_threshold(references: dict[int, np.ndarray], margin: float = 0.5) -> float:
    """The cleaning threshold, from the references alone: between how alike one landmark's references
    are (genuine: leave-one-out mean similarity, 5th percentile) and how alike they are to other
    landmarks' references (impostor: 95th percentile). `margin` 0 → impostor level, 1 → genuine level."""
    ids = [i for i, refs in references.items() if len(refs) >= 2]
    if len(ids) < 2:
        raise ValueError("cleaning needs two or more landmarks with at least two references each")
    # A mean of inner products is the inner product with the mean: a reference's mean similarity to the
    # other landmarks' references uses the sum of all of them, less its own landmark's. Scoring every pair
    # of landmarks took landmarks² products (and as many copies of the references).
    total = sum(references[i].sum(axis=0, dtype=np.float64) for i in ids)
    count = sum(len(references[i]) for i in ids)
    genuine, impostor = [], []
    for i in ids:
        refs = references[i]
        sims = refs @ refs.T
        genuine.extend((sims.sum(axis=1) - np.diag(sims)) / (len(refs) - 1))
        others = (total - refs.sum(axis=0, dtype=np.float64)) / (count - len(refs))
        impostor.extend(refs @ others)
    low_genuine, high_impostor = np.quantile(genuine, 0.05), np.quantile(impostor, 0.95)
    return float(high_impostor + margin * (low_genuine - high_impostor))


def clean(similarities: np.ndarray, threshold: float, dirty_truth: np.ndarray | None = None) -> tuple[np.ndarray, CleaningReport]:
    keep = ~(similarities < threshold)  # NaN (no references) is kept
    report = CleaningReport(kept=int(keep.sum()), dropped=int((~keep).sum()), threshold=threshold)
    if dirty_truth is not None:
        dropped, dirty = ~keep, dirty_truth.astype(bool)
        report.precision = float((dropped & dirty).sum() / max(1, dropped.sum()))
        report.recall = float((dropped & dirty).sum() / max(1, dirty.sum()))
    return keep, report
