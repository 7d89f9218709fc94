"""The in-process search replica's index: geo search by tile lookup, global search on the host or on a
torch device (a GPU worker's), references grouped by landmark. Each is checked against a plain scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import geo
from shared.index import CentroidRows, ReferenceRows
from shared.local_index import LocalIndex
from shared.recognition import SQUARE_HALF_SIZE_M


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery():
    """600 centroids of 200 landmarks in three cities, 2 references per landmark."""
    rng = np.random.default_rng(7)
    landmarks = np.arange(1, 201)
    city = np.array([(48.86, 2.35), (51.05, 13.74), (28.61, 77.21)])[landmarks % 3]
    places = city + rng.normal(0, 0.01, (200, 2))
    ids = np.repeat(landmarks, 3)
    centroids = CentroidRows(ids, np.tile(np.arange(3), 200), places[ids - 1, 0], places[ids - 1, 1],
                             _unit(rng.standard_normal((600, 32))))
    ref_ids = np.tile(landmarks, 2)  # interleaved: a landmark's references are not next to each other
    references = ReferenceRows(ref_ids, np.repeat(np.arange(2), 200), _unit(rng.standard_normal((400, 32))))
    queries = _unit(centroids.embeddings[::40] + 0.3 * rng.standard_normal((15, 32)))
    return centroids, references, queries


def test_geo_search_finds_what_a_scan_of_every_centroid_finds(gallery):
    centroids, references, queries = gallery
    index = LocalIndex("v", centroids, references)
    where = [(float(centroids.lats[i]), float(centroids.lons[i])) for i in range(0, 600, 40)]
    tiles = [geo.tiles_covering_square(lat, lon, SQUARE_HALF_SIZE_M) for lat, lon in where]
    tile_of_row = np.array([geo.tile_of(a, o) for a, o in zip(centroids.lats, centroids.lons)])
    for query, wanted, hits in zip(queries, tiles, index.search_geo("v", queries, tiles, limit=5)):
        rows = np.flatnonzero(np.isin(tile_of_row, wanted))
        best = rows[np.argsort(-(centroids.embeddings[rows] @ query), kind="stable")[:5]]
        assert [(h.landmark_id, h.centroid_no) for h in hits] == \
            [(int(centroids.landmark_ids[r]), int(centroids.centroid_nos[r])) for r in best]
        assert hits and all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert index.search_geo("v", queries[:1], [[12345]], limit=5) == [[]]  # a tile with no landmark


ON_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])  # fp16 candidates on CUDA
@pytest.mark.parametrize("k", [10, 400, 1000])  # 2k above the gallery's size, and k above it
def test_global_search_on_a_torch_device_gives_the_host_search_hits(gallery, k, device):
    centroids, references, queries = gallery
    host = LocalIndex("v", centroids, references).search_global("v", queries, k)
    index = LocalIndex("v", centroids, references, device=device)
    assert index.device.split(":")[0] == device
    on_device = index.search_global("v", queries, k)
    assert [len(h) for h in on_device] == [min(k, 600)] * len(queries)
    for a, b in zip(host, on_device):
        assert [(h.landmark_id, h.centroid_no) for h in a] == [(h.landmark_id, h.centroid_no) for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    exact = queries[0] @ centroids.embeddings.T
    assert on_device[0][0].score == pytest.approx(float(exact.max()), abs=1e-6)


def test_references_are_grouped_by_landmark_in_their_order(gallery):
    centroids, references, _ = gallery
    index = LocalIndex("v", centroids, references)
    refs = index.references("v", [5, 200, 999])
    assert set(refs) == {5, 200}  # 999 has none
    for landmark in (5, 200):
        assert np.array_equal(refs[landmark], references.embeddings[references.landmark_ids == landmark])


@pytest.mark.parametrize("scores_per_block", [1 << 22, 60_000, 3_000])  # one block; two pruned; k·32 rows each
def test_global_search_is_exact_whatever_the_block_size(gallery, monkeypatch, scores_per_block):
    """The host scores the gallery a block at a time and prunes each block: the hits must be a full scan's."""
    from shared import local_index
    centroids, references, _ = gallery
    rng = np.random.default_rng(3)
    queries = _unit(rng.standard_normal((300, 32)))  # more than one chunk of queries
    monkeypatch.setattr(local_index, "QUERIES_PER_CHUNK", 128)
    monkeypatch.setattr(local_index, "SCORES_PER_BLOCK", scores_per_block)
    hits = LocalIndex("v", centroids, references).search_global("v", queries, 7)
    scan = queries @ centroids.embeddings.T
    for query_hits, scores in zip(hits, scan):
        best = np.argsort(-scores, kind="stable")[:7]
        assert [(h.landmark_id, h.centroid_no) for h in query_hits] == \
            [(int(centroids.landmark_ids[r]), int(centroids.centroid_nos[r])) for r in best]
        assert np.allclose([h.score for h in query_hits], scores[best], atol=1e-6)
    assert LocalIndex("v", centroids, references).search_global("v", queries[:0], 7) == []
    with pytest.raises(ValueError):
        LocalIndex("v", centroids, references).search_global("v", queries, 0)
