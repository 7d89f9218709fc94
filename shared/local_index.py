"""An exact in-process index with the same search interface as the Milvus one: used to calibrate and
evaluate offline, and as a worker-local replica of the active version's centroids.

On a GPU worker the replica's global search runs on the device (issue 4: "on the GPU when there is one"):
at 1M centroids of dim 512, 3,000 photos a second would ask 3 TFLOP/s of the host. The device finds each
query's 2k best candidates with an fp16 product; their scores are then computed exactly (fp32, on the
host) and the best k kept, so the scores that meet the thresholds are the CPU path's.

On the host the gallery is scored a block of rows at a time and each block's best k found by pruning
(``_block_top_k``): exact, about three times faster at 100k and 1M centroids than partitioning every score,
and its scratch memory stays under 20 MB at any gallery size instead of a gigabyte per batch at 1M."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property

import numpy as np

from shared import geo
from shared.index import CentroidRows, Hit, ReferenceRows

SCORES_PER_BLOCK = 1 << 22  # 16 MB of fp32 scores per block: near the cache, and flat memory at any size
QUERIES_PER_CHUNK = 256  # an evaluation's thousands of queries are scored a chunk at a time
PRUNING_GROUPS = 32  # columns in a pruning group: a block partitions k·32 scores per query, not all of them
BAND_ROWS_PER_PASS = 1 << 20  # candidate rows a geo pass holds: ~50 MB of coordinates, however dense the places


class LocalIndex:
    """One version's centroids and references, searched exactly with a matrix product."""

    def __init__(self, version: str, centroids: CentroidRows, references: ReferenceRows,
                 device: str | None = None) -> None:
        """``device``: a torch device for the global search's product and top-k (None: numpy on the host)."""
        self.version = version
        self.ids = np.asarray(centroids.landmark_ids, dtype=np.int64)
        self.nos = np.asarray(centroids.centroid_nos, dtype=np.int64)
        self.lats = np.asarray(centroids.lats, dtype=np.float64)
        self.lons = np.asarray(centroids.lons, dtype=np.float64)
        # The rows by latitude: a square's rows lie in a 1 km band of it, found by bisection (best_in_squares).
        self._by_lat = np.argsort(self.lats, kind="stable")
        self._sorted_lats = self.lats[self._by_lat]
        self.embeddings = np.asarray(centroids.embeddings, dtype=np.float32)
        self.refs = grouped_by_id(np.asarray(references.landmark_ids, dtype=np.int64),
                                  np.asarray(references.embeddings, dtype=np.float32))
        self._on_device = _to_device(self.embeddings, device) if device is not None else None

    def active_version(self) -> str:
        return self.version

    def _columns(self, rows: np.ndarray, scores: np.ndarray) -> tuple[list, ...]:
        """A Hit's fields for ``rows``, as Python lists (nested for a 2-D ``rows``): whole columns at once, since
        per-element numpy indexing was most of a worker's search time."""
        return (self.ids[rows].tolist(), self.nos[rows].tolist(), scores.tolist(), self.lats[rows].tolist(),
                self.lons[rows].tolist())

    def _hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        return list(map(Hit, *self._columns(rows, scores)))

    @property
    def device(self) -> str:
        return str(self._on_device.device) if self._on_device is not None else "cpu"

    def search_global(self, version: str | None, queries: np.ndarray, k: int,
                      min_score: float | None = None) -> list[list[Hit]]:
        if k < 1:  # as LandmarkIndex: no search asks for nothing
            raise ValueError(f"limit must be at least 1, got {k}")
        k = min(k, len(self.embeddings))
        if self._on_device is not None:
            top = self._candidates_on_device(queries, min(2 * k, len(self.embeddings)))
            top_sims = np.einsum("qd,qcd->qc", queries, self.embeddings[top])  # exact, fp32
        else:
            top, top_sims = _exact_top_k(np.asarray(queries, dtype=np.float32), self.embeddings, k)
        order = np.argsort(-top_sims, axis=1, kind="stable")[:, :k]
        rows, scores = np.take_along_axis(top, order, axis=1), np.take_along_axis(top_sims, order, axis=1)
        if min_score is None:
            return [list(map(Hit, *columns)) for columns in zip(*self._columns(rows, scores))]
        # Most photos show no landmark and keep no hit: only the hits kept become objects.
        query_of, rank = np.nonzero(scores >= min_score)
        out: list[list[Hit]] = [[] for _ in range(len(rows))]
        for i, hit in zip(query_of.tolist(), self._hits(rows[query_of, rank], scores[query_of, rank])):
            out[i].append(hit)
        return out

    def _candidates_on_device(self, queries: np.ndarray, n: int) -> np.ndarray:
        """Each query's ``n`` best rows by the device's product (fp16 on CUDA), as a (queries, n) array."""
        import torch
        table = self._on_device
        batch = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(table.device)
        sims = batch.to(table.dtype) @ table.T
        return torch.topk(sims, n, dim=1, sorted=False).indices.cpu().numpy()

    def search_geo(self, version: str | None, queries: np.ndarray, tiles: list[list[int]],
                   limit: int) -> list[list[Hit]]:
        out = []
        for query, wanted in zip(queries, tiles):
            rows = self._rows_in(wanted)
            scores = self.embeddings[rows] @ query
            order = np.argsort(-scores, kind="stable")[:limit]
            out.append(self._hits(rows[order], scores[order]))
        return out

    def best_in_squares(self, version: str | None, queries: np.ndarray, lats: Sequence[float],
                        lons: Sequence[float], half_size_m: float) -> list[Hit | None]:
        """Each query's best centroid inside the square of ±``half_size_m`` around (lats[i], lons[i]), or None
        when the square holds none: what the decision rule keeps of a tile search (shared.recognition), found
        exactly for the whole batch in a few array operations. The candidates are the rows in the square's
        band of latitude, bisected from the latitude-sorted rows; ``geo.in_square_mask`` keeps those inside,
        and only these are scored. Ties in score go to the lower row, as in ``search_geo``."""
        centre_lats = np.clip(np.asarray(lats, dtype=np.float64), -90.0, 90.0)
        centre_lons = np.asarray(lons, dtype=np.float64)
        queries = np.asarray(queries, dtype=np.float32)
        reach = half_size_m / geo.M_PER_DEG_LAT * (1 + 1e-9)  # a little wider than in_square's own test
        first = np.searchsorted(self._sorted_lats, centre_lats - reach, side="left")
        end = np.searchsorted(self._sorted_lats, centre_lats + reach, side="right")
        out: list[Hit | None] = [None] * len(centre_lats)
        for start, stop in _spans_of_at_most(end - first, BAND_ROWS_PER_PASS):
            query_of, rows = _ragged_rows(first[start:stop], end[start:stop], self._by_lat)
            query_of += start
            inside = geo.in_square_mask(self.lats[rows], self.lons[rows], centre_lats[query_of],
                                        centre_lons[query_of], half_size_m)
            query_of, rows = query_of[inside], rows[inside]
            scores = np.einsum("ij,ij->i", self.embeddings[rows], queries[query_of])
            order = np.lexsort((rows, -scores, query_of))  # by query, then best score, then lowest row
            best = order[np.flatnonzero(np.diff(query_of[order], prepend=-1))]
            for i, hit in zip(query_of[best].tolist(), self._hits(rows[best], scores[best])):
                out[i] = hit
        return out

    @cached_property
    def _tile_rows(self) -> dict[int, np.ndarray]:
        """tile → its rows, ascending: a tile search looks up its few tiles instead of scanning every centroid.
        Built on the first tile search (a tile per centroid in Python: seconds and a dict entry per tile at a
        million centroids); a worker decides with best_in_squares and never makes one."""
        tiles = np.array([geo.tile_of(a, o) for a, o in zip(self.lats, self.lons)], dtype=np.int64)
        return grouped_by_id(tiles, np.arange(len(tiles)))

    def _rows_in(self, tiles: list[int]) -> np.ndarray:
        """The rows of the centroids in ``tiles``, ascending (ties in score then keep the row order)."""
        parts = [self._tile_rows[t] for t in tiles if t in self._tile_rows]
        if not parts:
            return np.empty(0, dtype=np.int64)
        return parts[0] if len(parts) == 1 else np.sort(np.concatenate(parts))

    def references(self, version: str | None, landmark_ids: Iterable[int]) -> dict[int, np.ndarray]:
        return {int(i): self.refs[int(i)] for i in landmark_ids if int(i) in self.refs}


def _ragged_rows(first: np.ndarray, end: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (query, row) pairs of ``rows[first[q]:end[q]]`` for every query q, as two flat arrays."""
    lengths = end - first
    query_of = np.repeat(np.arange(len(first)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return query_of, rows[first[query_of] + offsets]


def _spans_of_at_most(lengths: np.ndarray, cap: int) -> list[tuple[int, int]]:
    """Consecutive spans of queries whose ``lengths`` add up to at most ``cap`` (a longer one alone)."""
    spans, start, total = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if total + n > cap and i > start:
            spans.append((start, i))
            start, total = i, 0
        total += n
    return spans + [(start, len(lengths))] if len(lengths) else spans


def _exact_top_k(queries: np.ndarray, table: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` best rows of ``table`` by inner product and their scores, unordered, exactly."""
    if len(queries) > QUERIES_PER_CHUNK:
        parts = [_exact_top_k(queries[i:i + QUERIES_PER_CHUNK], table, k)
                 for i in range(0, len(queries), QUERIES_PER_CHUNK)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    step = max(SCORES_PER_BLOCK // max(len(queries), 1), PRUNING_GROUPS * k)
    best = [_block_top_k(queries @ table[start:start + step].T, k, start) for start in range(0, len(table), step)]
    if len(best) == 1:
        return best[0]
    rows, scores = np.concatenate([b[0] for b in best], axis=1), np.concatenate([b[1] for b in best], axis=1)
    return _take_top_k(rows, scores, k)


def _block_top_k(scores: np.ndarray, k: int, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` columns of each row of a block's ``scores`` (as table rows, from ``first_row``), and
    their scores. The columns are dealt into groups of PRUNING_GROUPS, column c in group c mod w. A row's k
    best columns all lie in its k groups with the highest maxima (k groups with higher maxima would each
    hold a better column), so only those k groups are partitioned. The maxima are elementwise maxima of w
    contiguous columns at a time, which numpy vectorises; partitioning every score was most of the time."""
    n_queries, n_cols = scores.shape
    width = n_cols // PRUNING_GROUPS
    columns = np.broadcast_to(np.arange(n_cols), scores.shape)
    if width <= k:  # too few groups to prune: partition the block as it is
        return _take_top_k(columns + first_row, scores, k)
    pruned = PRUNING_GROUPS * width
    maxima = scores[:, :pruned].reshape(n_queries, PRUNING_GROUPS, width).max(axis=1)
    groups = np.argpartition(maxima, width - k, axis=1)[:, width - k:]
    candidates = (groups[:, :, None] + np.arange(PRUNING_GROUPS) * width).reshape(n_queries, k * PRUNING_GROUPS)
    if pruned < n_cols:  # the columns left over after whole groups are all candidates
        candidates = np.concatenate([candidates, columns[:, pruned:]], axis=1)
    return _take_top_k(candidates + first_row, np.take_along_axis(scores, candidates, axis=1), k)


def _take_top_k(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each row's candidate ``rows`` by ``scores`` (all of them when there are only k)."""
    if scores.shape[1] <= k:
        return np.ascontiguousarray(rows), scores
    pick = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k:]
    return np.take_along_axis(rows, pick, axis=1), np.take_along_axis(scores, pick, axis=1)


def grouped_by_id(ids: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    """{id: its rows}, in one sort (a mask per id would cost ids × rows: hours at a million references)."""
    order = np.argsort(ids, kind="stable")
    unique, starts = np.unique(ids[order], return_index=True)
    return {int(i): rows[part] for i, part in zip(unique.tolist(), np.split(order, starts[1:]))}


def _to_device(embeddings: np.ndarray, device: str):
    """The centroids on ``device``: fp16 on CUDA (the product runs on tensor cores; scores are recomputed
    exactly on the host), fp32 elsewhere. Synchronised, so every batch thread's stream sees them."""
    import warnings
    import torch
    with warnings.catch_warnings():  # a read-only gallery array: it is only read, and copied to the device
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        table = torch.from_numpy(embeddings)
    target = torch.device(device)
    table = table.to(target, dtype=torch.float16 if target.type == "cuda" else torch.float32)
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    return table
