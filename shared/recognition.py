"""The decision rule over a batch (DESIGN.md): geo-filtered centroids with GPS, global top-k plus
reference verification without. No I/O besides the index."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared import geo
from shared.events import GeoPoint
from shared.index import MAX_TOPK, Hit, LandmarkIndex
from shared.outcomes import Method, Tag

SQUARE_HALF_SIZE_M = 500.0  # the article's 1x1 km square around the photo
GEO_LIMIT_GROWTH = 8  # how much further a tile search goes when its answer was cut off (geo_winners)


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


def best_inside(hits: Sequence[Hit], where: GeoPoint) -> Hit | None:
    """The best-scoring hit inside the square around ``where`` (the first of equals), or None."""
    return max(inside_square(hits, where), key=lambda hit: hit.score, default=None)


def geo_tag(best: Hit | None, t_geo: float) -> list[Tag]:
    """With GPS, the best landmark inside the square is the answer when it reaches t_geo."""
    return [Tag(best.landmark_id, float(best.score), Method.GEO)] if best is not None and best.score >= t_geo else []


def decide_geo(hits: Sequence[Hit], where: GeoPoint, t_geo: float) -> list[Tag]:
    return geo_tag(best_inside(hits, where), t_geo)


def geo_winners(index: LandmarkIndex, version: str, embeddings: np.ndarray, points: Sequence[GeoPoint],
                limit: int = 256) -> list[Hit | None]:
    """Each photo's best centroid inside the square around its point. An index that finds it for a whole
    batch at once (the worker-local replica, shared.local_index.LocalIndex.best_in_squares: exact, no
    tiles) does; otherwise the ``limit`` best centroids in the tiles covering each square are searched
    (Milvus's filtered search) and those outside the square dropped."""
    if len(points) == 0:
        return []
    whole_batch = getattr(index, "best_in_squares", None)
    if whole_batch is not None:
        return whole_batch(version, embeddings, [p.lat for p in points], [p.lon for p in points],
                           SQUARE_HALF_SIZE_M)
    tiles = [geo.tiles_covering_square(p.lat, p.lon, SQUARE_HALF_SIZE_M) for p in points]
    winners: list[Hit | None] = [None] * len(points)
    pending = list(range(len(points)))
    while pending:
        answers = index.search_geo(version, embeddings[pending], [tiles[i] for i in pending], limit)
        for i, hits in zip(pending, answers):
            winners[i] = best_inside(hits, points[i])
        # A full answer with nothing inside the square may have cut off the square's best centroid (the tiles
        # cover up to 9 times the square, all of it better matches in a dense city): ask those again for more.
        # Where something inside was found, whatever was cut off scores no higher.
        pending = [i for i, hits in zip(pending, answers)
                   if winners[i] is None and len(hits) >= limit and limit < MAX_TOPK]
        limit = min(limit * GEO_LIMIT_GROWTH, MAX_TOPK)
    return winners


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
        winners = geo_winners(index, version, embeddings[with_gps], [gps[i] for i in with_gps], geo_limit)
        for i, best in zip(with_gps, winners):
            results[i] = geo_tag(best, thresholds.t_geo)
    if without_gps:
        # Only the hits that reach t_global can be tagged (decide_global): the index leaves out the others.
        hits = index.search_global(version, embeddings[without_gps], global_k, min_score=thresholds.t_global)
        candidates = {h.landmark_id for photo_hits in hits for h in photo_hits}
        references = index.references(version, candidates) if candidates else {}
        for i, photo_hits in zip(without_gps, hits):
            results[i] = decide_global(photo_hits, embeddings[i], references, thresholds)
    return results
