"""Thresholds calibrated for a target non-landmark accuracy: a false positive is worse than a miss."""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)


def threshold_for_accuracy(negative_scores: np.ndarray, target: float = 0.99) -> float:
    """The lowest threshold that keeps at least `target` of the negatives below it (score < t), as a float32
    value (float32_above)."""
    scores = np.sort(np.asarray(negative_scores, dtype=np.float64))
    if len(scores) == 0:
        raise ValueError("calibration needs non-landmark photos")
    # negatives allowed to pass; 1e-9 absorbs 1 - target's rounding (1 - 0.9 is 0.0999...: 40 photos allowed 3)
    allowed_above = int(np.floor(len(scores) * (1 - target) + 1e-9))
    rank = len(scores) - allowed_above - 1
    return float32_above(scores[rank])


# Thresholds are float32 values. PostgreSQL keeps them as REAL (float4), and scores are float32 (the embeddings'
# products): a float64 threshold a step above a score rounds back to that score when stored, and the negative it
# was to keep out passes on every worker. A float32 threshold is stored exactly, and decides a float32 score as
# calibration did, compared in float32 (numpy) or float64 (Python floats) alike.

def float32_above(score: float) -> float:
    """The smallest float32 value above ``score``: every float32 is a float64, so the smallest one not below
    the next float64."""
    if score == -np.inf:  # a negative with no candidate to score: the next float64 is beyond float32's range
        return float(np.finfo(np.float32).min)
    return float32_at_least(np.nextafter(np.float64(score), np.inf))


def float32_at_least(value: float) -> float:
    """The smallest float32 value not below ``value``: a float32 score reaches it exactly when it reaches ``value``."""
    value = np.float64(value)
    nearest = np.float32(value)
    return float(nearest if nearest >= value else np.nextafter(nearest, np.float32(np.inf)))


# --- thresholds of the decision rule, from a validation split -------------------------------------

from dataclasses import dataclass, field  # noqa: E402

from shared.recognition import best_per_landmark, geo_winners, reference_similarity  # noqa: E402


@dataclass
class Candidates:
    """Per photo: its landmarks' best scores and mean reference similarities (no thresholds yet)."""
    scores: list[dict[int, float]]
    ref_sims: list[dict[int, float]]


@dataclass
class Calibration:
    t_geo: float
    t_global: float
    t_ref: float
    curves: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # the evaluation's figures on the split, at these thresholds


def global_candidates(index, version: str, embeddings: np.ndarray, k: int) -> Candidates:
    hits = index.search_global(version, embeddings, k)
    scores = [best_per_landmark(h) for h in hits]
    refs = index.references(version, {lid for s in scores for lid in s})
    sims = [{lid: reference_similarity(e, refs[lid]) if lid in refs else -np.inf for lid in s}
            for e, s in zip(embeddings, scores)]
    return Candidates(scores, sims)


def tags_no_gps(c: Candidates, i: int, t_global: float, t_ref: float) -> set[int]:
    """Every landmark that passes, as the workers tag them all (shared.recognition.decide_global)."""
    return {lid for lid, s in c.scores[i].items() if s >= t_global and c.ref_sims[i][lid] >= t_ref}


def decide_no_gps(c: Candidates, i: int, t_global: float, t_ref: float) -> int | None:
    """The best-scoring tag (top-1); None for a non-landmark."""
    passed = [(s, lid) for lid, s in c.scores[i].items() if s >= t_global and c.ref_sims[i][lid] >= t_ref]
    return max(passed)[1] if passed else None


def _ref_threshold(c: Candidates, negatives: list[int], t_global: float, target: float) -> float:
    worst = [max([c.ref_sims[i][lid] for lid, s in c.scores[i].items() if s >= t_global], default=-np.inf)
             for i in negatives]
    return threshold_for_accuracy(np.array(worst), target)


def calibrate_no_gps(c: Candidates, truth: list[int | None], target: float) -> tuple[float, float, list]:
    """The (t_global, t_ref) pair with the best landmark accuracy among those that keep `target` of
    the non-landmarks out. A landmark photo counts as recognised only when its tags are exactly its
    landmark: a second tag puts it in another landmark's album too, which users see as a mistake."""
    negatives = [i for i, t in enumerate(truth) if t is None]
    positives = [i for i, t in enumerate(truth) if t is not None]
    if not negatives:
        raise ValueError("calibration needs non-landmark photos (empty landmark_id) in the validation split")
    if not positives:
        log.warning("the validation split has no landmark photos: thresholds are set by the non-landmark "
                    "target alone")
    best_neg = np.array([max(c.scores[i].values(), default=-1.0) for i in negatives])
    grid = np.unique([float32_at_least(q) for q in np.quantile(best_neg, np.linspace(0.0, 0.999, 60))])
    curve, best = [], (-1.0, 1.0, 1.0)
    for t_global in grid:
        t_ref = _ref_threshold(c, negatives, float(t_global), target)
        hits = sum(tags_no_gps(c, i, t_global, t_ref) == {truth[i]} for i in positives)
        rejected = sum(not tags_no_gps(c, i, t_global, t_ref) for i in negatives)
        point = (float(t_global), float(t_ref), hits / max(1, len(positives)), rejected / max(1, len(negatives)))
        curve.append(point)
        if point[2] > best[0] and point[3] >= target:
            best = (point[2], point[0], point[1])
    return best[1], best[2], curve


def geo_scores(index, version: str, embeddings: np.ndarray, gps: list) -> list[tuple[int, float] | None]:
    """Per GPS photo, the best landmark inside its square and its score (None: no landmark nearby)."""
    return [(best.landmark_id, best.score) if best is not None else None
            for best in geo_winners(index, version, embeddings, gps)]


# At most this share of the everyday photos taken beside a landmark (one in its square) is let through by
# t_geo, whatever the validation split's share of such photos. The target alone counts the photos far from
# every landmark as rejected, so a split with few near ones set t_geo to -1.0: a plate of food 200 m from a
# cathedral was tagged with it, at a similarity of 0. On the demo's world the floor sits below the target's
# threshold (it changes nothing there); it holds when a split's everyday photos are mostly far from landmarks.
NEAR_NEGATIVES_PASSED = 0.1
# Fewer in-square everyday photos than this say too little about their scores: the floor is then taken from
# every everyday photo's best score over all landmarks, which an in-square best never exceeds.
MIN_NEAR_NEGATIVES = 20


def best_global_scores(c: Candidates, truth: list[int | None]) -> np.ndarray:
    """Each non-landmark photo's best score over all landmarks (-1.0 with no candidate)."""
    return np.array([max(c.scores[i].values(), default=-1.0) for i, t in enumerate(truth) if t is None])


def calibrate_geo(best: list[tuple[int, float] | None], truth: list[int | None], target: float,
                  global_negatives: np.ndarray) -> tuple[float, list]:
    """t_geo keeps `target` of the GPS-tagged non-landmark photos out. Most are taken far from any
    landmark and the geo filter alone rejects them; that is why GPS allows a lower threshold (the
    article), and why the validation split must place everyday photos as realistically as the test.
    Never lower than the floor that lets at most NEAR_NEGATIVES_PASSED of the in-square ones through
    (``global_negatives``: every validation non-landmark's best global score, for a split with too few)."""
    negatives = np.array([-np.inf if b is None else b[1] for b, t in zip(best, truth) if t is None])
    if len(negatives):
        near = negatives[np.isfinite(negatives)]
        t_geo = max(threshold_for_accuracy(negatives, target), _geo_floor(near, global_negatives))
    else:
        t_geo = threshold_for_accuracy(global_negatives, 1 - NEAR_NEGATIVES_PASSED)
        log.warning("the validation split has no non-landmark photos with GPS: t_geo is set from those without "
                    "it (%.3f), so photos with GPS are tagged less often than they could be; add everyday photos "
                    "with GPS to the split", t_geo)
    curve = []
    for t in np.linspace(-0.2, 1.0, 61):
        pos = [b is not None and b[1] >= t and b[0] == tr for b, tr in zip(best, truth) if tr is not None]
        neg = [b is None or b[1] < t for b, tr in zip(best, truth) if tr is None]
        curve.append((float(t), float(np.mean(pos)) if pos else 0.0, float(np.mean(neg)) if neg else 1.0))
    return t_geo, curve


def _geo_floor(near: np.ndarray, global_negatives: np.ndarray) -> float:
    if len(near) >= MIN_NEAR_NEGATIVES:
        return threshold_for_accuracy(near, 1 - NEAR_NEGATIVES_PASSED)
    log.warning("only %d non-landmark photos with GPS in the validation split have a landmark in their square "
                "(%d wanted): t_geo's floor is taken from every non-landmark photo's best score over all "
                "landmarks, which tags photos with GPS less often; add everyday photos taken near landmarks to the split",
                len(near), MIN_NEAR_NEGATIVES)
    return threshold_for_accuracy(global_negatives, 1 - NEAR_NEGATIVES_PASSED)
