"""An exact in-process index with the same search interface as the Milvus one: used to calibrate and
evaluate offline, and as a worker-local replica of the active version's centroids."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from shared import geo
from shared.index import CentroidRows, Hit, ReferenceRows


class LocalIndex:
    """One version's centroids and references, searched exactly with a matrix product."""

    def __init__(self, version: str, centroids: CentroidRows, references: ReferenceRows) -> None:
        self.version = version
        self.ids = np.asarray(centroids.landmark_ids, dtype=np.int64)
        self.nos = np.asarray(centroids.centroid_nos, dtype=np.int64)
        self.lats = np.asarray(centroids.lats, dtype=np.float64)
        self.lons = np.asarray(centroids.lons, dtype=np.float64)
        self.tiles = np.array([geo.tile_of(a, o) for a, o in zip(self.lats, self.lons)], dtype=np.int64)
        self.embeddings = np.asarray(centroids.embeddings, dtype=np.float32)
        ref_ids = np.asarray(references.landmark_ids, dtype=np.int64)
        ref_emb = np.asarray(references.embeddings, dtype=np.float32)
        self.refs = {int(i): ref_emb[ref_ids == i] for i in np.unique(ref_ids)}

    def active_version(self) -> str:
        return self.version

    def _hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        return [Hit(int(self.ids[r]), int(self.nos[r]), float(s), float(self.lats[r]), float(self.lons[r]))
                for r, s in zip(rows, scores)]

    def search_global(self, version: str | None, queries: np.ndarray, k: int) -> list[list[Hit]]:
        sims = queries @ self.embeddings.T
        k = min(k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out = []
        for row, cand in zip(sims, top):
            order = cand[np.argsort(-row[cand], kind="stable")]
            out.append(self._hits(order, row[order]))
        return out

    def search_geo(self, version: str | None, queries: np.ndarray, tiles: list[list[int]],
                   limit: int) -> list[list[Hit]]:
        out = []
        for query, wanted in zip(queries, tiles):
            rows = np.flatnonzero(np.isin(self.tiles, wanted))
            scores = self.embeddings[rows] @ query
            order = np.argsort(-scores, kind="stable")[:limit]
            out.append(self._hits(rows[order], scores[order]))
        return out

    def references(self, version: str | None, landmark_ids: Iterable[int]) -> dict[int, np.ndarray]:
        return {int(i): self.refs[int(i)] for i in landmark_ids if int(i) in self.refs}
