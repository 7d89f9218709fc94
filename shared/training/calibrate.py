"""Thresholds calibrated for a target non-landmark accuracy: a false positive is worse than a miss."""

from __future__ import annotations

import numpy as np


def threshold_for_accuracy(negative_scores: np.ndarray, target: float = 0.99) -> float:
    """The lowest threshold that keeps at least `target` of the negatives below it (score < t)."""
    scores = np.sort(np.asarray(negative_scores, dtype=np.float64))
    if len(scores) == 0:
        raise ValueError("calibration needs non-landmark photos")
    allowed_above = int(np.floor(len(scores) * (1 - target)))  # negatives allowed to pass
    rank = len(scores) - allowed_above - 1
    return float(np.nextafter(scores[rank], np.inf))
