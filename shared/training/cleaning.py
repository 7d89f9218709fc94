"""Semi-automatic cleaning (the article): a photo whose mean distance to its landmark's 3-5
hand-picked references exceeds a threshold is treated as a non-landmark and left out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CleaningReport:
    kept: int
    dropped: int
    threshold: float
    precision: float | None = None  # of the drops, how many were really dirty (synthetic truth)
    recall: float | None = None     # of the dirty photos, how many were dropped


def mean_reference_similarity(embeddings: np.ndarray, labels: np.ndarray,
                              references: dict[int, np.ndarray]) -> np.ndarray:
    out = np.full(len(embeddings), np.nan, dtype=np.float32)
    for landmark_id in np.unique(labels):
        rows = np.flatnonzero(labels == landmark_id)
        refs = references.get(int(landmark_id))
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
    genuine, impostor = [], []
    for i in ids:
        refs = references[i]
        sims = refs @ refs.T
        genuine.extend((sims.sum(axis=1) - np.diag(sims)) / (len(refs) - 1))
        others = np.concatenate([references[j] for j in ids if j != i])
        impostor.extend((refs @ others.T).mean(axis=1))
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
