"""The decision rule over a batch (DESIGN.md): geo-filtered centroids with GPS, global top-k plus
reference verification without. No I/O besides the index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared import geo
from shared.events import GeoPoint
from shared.index import Hit, LandmarkIndex
from shared.outcomes import Method, Tag

SQUARE_HALF_SIZE_M = 500.0  # the article's 1x1 km square around the photo


@dataclass(frozen=True)
class Thresholds:
    t_geo: float
    t_global: float
    t_ref: float


def best_per_landmark(hits: Sequence[Hit]) -> dict[int, float]:
    """A landmark's score is its best centroid's similarity."""
    scores: dict[int, float] = {}
    for hit in hits:
        if hit.score > scores.get(hit.landmark_id, -np.inf):
            scores[hit.landmark_id] = hit.score
    return scores


def inside_square(hits: Sequence[Hit], where: GeoPoint) -> list[Hit]:
    # Tiles over-cover the square; the exact check keeps only landmarks really inside it.
    return [h for h in hits if h.lat is not None and h.lon is not None
            and geo.in_square(h.lat, h.lon, where.lat, where.lon, SQUARE_HALF_SIZE_M)]


def decide_geo(hits: Sequence[Hit], where: GeoPoint, t_geo: float) -> list[Tag]:
    scores = best_per_landmark(inside_square(hits, where))
    if not scores:
        return []
    landmark_id, score = max(scores.items(), key=lambda item: item[1])
    return [Tag(landmark_id, float(score), Method.GEO)] if score >= t_geo else []


def reference_similarity(embedding: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(references @ embedding))


def decide_global(hits: Sequence[Hit], embedding: np.ndarray, references: dict[int, np.ndarray],
                  thresholds: Thresholds) -> list[Tag]:
    """Every candidate above t_global whose mean similarity to its references reaches t_ref."""
    tags = []
    for landmark_id, score in best_per_landmark(hits).items():
        refs = references.get(landmark_id)
        if score < thresholds.t_global or refs is None or len(refs) == 0:
            continue
        if reference_similarity(embedding, refs) >= thresholds.t_ref:
            tags.append(Tag(landmark_id, float(score), Method.REFERENCE))
    return sorted(tags, key=lambda tag: tag.score, reverse=True)


def recognise_batch(embeddings: np.ndarray, gps: Sequence[GeoPoint | None], index: LandmarkIndex,
                    version: str, thresholds: Thresholds, *, global_k: int = 10,
                    geo_limit: int = 256) -> list[list[Tag]]:
    """Tags for each photo of a batch, best first; [] means non-landmark."""
    results: list[list[Tag]] = [[] for _ in range(len(embeddings))]
    with_gps = [i for i, point in enumerate(gps) if point is not None]
    without_gps = [i for i, point in enumerate(gps) if point is None]
    if with_gps:
        tiles = [geo.tiles_covering_square(gps[i].lat, gps[i].lon, SQUARE_HALF_SIZE_M) for i in with_gps]
        hits = index.search_geo(version, embeddings[with_gps], tiles, geo_limit)
        for i, photo_hits in zip(with_gps, hits):
            results[i] = decide_geo(photo_hits, gps[i], thresholds.t_geo)
    if without_gps:
        hits = index.search_global(version, embeddings[without_gps], global_k)
        candidates = {h.landmark_id for photo_hits in hits for h in photo_hits
                      if h.score >= thresholds.t_global}
        references = index.references(version, candidates) if candidates else {}
        for i, photo_hits in zip(without_gps, hits):
            results[i] = decide_global(photo_hits, embeddings[i], references, thresholds)
    return results
