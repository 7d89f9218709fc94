"""The in-process search replica's index: geo search by tile lookup and by whole batch, global search on
the host or on a torch device (a GPU worker's), references grouped by landmark. Each is checked against a
plain scan, or against what the decision rule gets from the searches Milvus offers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared import geo
from shared.events import GeoPoint
from shared.index import CentroidRows, ReferenceRows
from shared.local_index import LocalIndex
from shared.recognition import SQUARE_HALF_SIZE_M, Thresholds, best_inside, geo_winners, recognise_batch


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
    found = index.search_geo("v", queries, tiles, limit=5)
    assert len(found) == len(queries)  # one list of hits a query, or zip below would stop short
    for query, wanted, hits in zip(queries, tiles, found):
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
    assert len(host) == len(queries)
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
    assert len(hits) == len(queries)  # every chunk of queries answered, or zip below would stop short
    scan = queries @ centroids.embeddings.T
    for query_hits, scores in zip(hits, scan):
        best = np.argsort(-scores, kind="stable")[:7]
        assert [(h.landmark_id, h.centroid_no) for h in query_hits] == \
            [(int(centroids.landmark_ids[r]), int(centroids.centroid_nos[r])) for r in best]
        assert np.allclose([h.score for h in query_hits], scores[best], atol=1e-6)
    assert LocalIndex("v", centroids, references).search_global("v", queries[:0], 7) == []
    with pytest.raises(ValueError):
        LocalIndex("v", centroids, references).search_global("v", queries, 0)


class TileSearchOnly:
    """The replica seen through the searches Milvus offers (no whole-batch geo, no score floor): what
    shared.recognition does with Milvus, for comparison with what it does with the replica."""

    def __init__(self, index: LocalIndex) -> None:
        self.index = index

    def search_geo(self, version, queries, tiles, limit):
        return self.index.search_geo(version, queries, tiles, limit)

    def search_global(self, version, queries, k, min_score=None):
        return [[h for h in hits if min_score is None or h.score >= min_score]
                for hits in self.index.search_global(version, queries, k)]

    def references(self, version, ids):
        return self.index.references(version, ids)


@pytest.fixture(scope="module")
def places():
    """1,000 centroids in crowded squares (~150 centroids a km²), on both sides of the antimeridian and at
    both poles, with photo points near them and some in empty places."""
    rng = np.random.default_rng(11)
    centres = np.array([(48.86, 2.35), (-16.5, 179.9995), (-16.5, -179.9995), (89.9995, 40.0), (-89.999, -120.0)])
    n = 1000
    ids = np.arange(n) // 4 + 1
    at = centres[rng.integers(0, len(centres), n)]
    lats = np.clip(at[:, 0] + rng.normal(0, 0.004, n), -90, 90)
    lons = (at[:, 1] + rng.normal(0, 0.004, n) / np.cos(np.radians(lats)).clip(0.05) + 180) % 360 - 180
    centroids = CentroidRows(ids, np.arange(n) % 4, lats, lons, _unit(rng.standard_normal((n, 32))))
    references = ReferenceRows(ids[::4], np.zeros(n // 4, int), _unit(rng.standard_normal((n // 4, 32))))
    near = rng.integers(0, n, 300)
    points = [GeoPoint(lat=float(np.clip(lats[r] + rng.normal(0, 0.003), -90, 90)),
                       lon=float((lons[r] + rng.normal(0, 0.003) + 180) % 360 - 180)) for r in near]
    points += [GeoPoint(lat=10.0, lon=10.0), GeoPoint(lat=-16.5, lon=179.9)]  # nothing near; 10 km off
    queries = _unit(centroids.embeddings[np.append(near, [0, 1])] + 0.5 * rng.standard_normal((302, 32)))
    return centroids, references, queries, points


@pytest.mark.parametrize("rows_per_pass", [1 << 20, 500])  # the whole batch at once; several passes
def test_the_replica_finds_each_squares_best_centroid_as_a_tile_search_does(places, monkeypatch, rows_per_pass):
    from shared import local_index
    centroids, references, queries, points = places
    monkeypatch.setattr(local_index, "BAND_ROWS_PER_PASS", rows_per_pass)
    index = LocalIndex("v", centroids, references)
    found = geo_winners(index, "v", queries, points)
    by_tiles = geo_winners(TileSearchOnly(index), "v", queries, points, limit=len(queries))
    assert len(found) == len(by_tiles) == len(queries)
    assert sum(hit is not None for hit in found) > 250 and found[-2:] == [None, None]
    for hit, expected in zip(found, by_tiles):
        assert (hit is None) == (expected is None)
        if hit is not None:
            assert (hit.landmark_id, hit.centroid_no, hit.lat, hit.lon) == \
                (expected.landmark_id, expected.centroid_no, expected.lat, expected.lon)
            assert hit.score == pytest.approx(expected.score, abs=1e-6)
    assert geo_winners(index, "v", queries[:0], []) == []


def test_a_tile_search_cut_off_by_its_limit_asks_again_until_it_reaches_the_square(places):
    """In a crowded city the tiles around a square hold more than ``limit`` better matches outside the square
    than the best one inside it: a search that stopped at ``limit`` would call the photo a non-landmark."""
    centroids, references, queries, points = places
    index = TileSearchOnly(LocalIndex("v", centroids, references))
    whole = geo_winners(index, "v", queries, points, limit=len(centroids))
    cut_off = [best_inside(hits, p) for hits, p in zip(index.search_geo(
        "v", queries, [geo.tiles_covering_square(p.lat, p.lon, SQUARE_HALF_SIZE_M) for p in points], 2), points)]
    assert sum(a is None and b is not None for a, b in zip(cut_off, whole)) > 20  # the case arises here
    assert geo_winners(index, "v", queries, points, limit=2) == whole


def test_a_batch_gets_the_same_tags_from_the_replica_as_through_milvus_searches(places):
    """recognise_batch takes the replica's shortcuts (whole-batch geo, global hits under t_global left
    out): the tags must be those the plain searches give."""
    centroids, references, queries, points = places
    index = LocalIndex("v", centroids, references)
    gps = [p if i % 3 else None for i, p in enumerate(points)]  # a third without GPS
    thresholds = Thresholds(t_geo=0.3, t_global=0.3, t_ref=0.0)
    direct = recognise_batch(queries, gps, index, "v", thresholds)
    plain = recognise_batch(queries, gps, TileSearchOnly(index), "v", thresholds)
    assert len(direct) == len(plain) == len(queries)
    assert sum(bool(t) for t in direct[::3]) > 10 and sum(bool(t) for t in direct) > 100
    for mine, theirs in zip(direct, plain):
        assert [(t.landmark_id, t.method) for t in mine] == [(t.landmark_id, t.method) for t in theirs]
        assert np.allclose([t.score for t in mine], [t.score for t in theirs], atol=1e-6)


def test_a_score_floor_keeps_exactly_the_hits_that_reach_it(places):
    centroids, references, queries, _ = places
    index = LocalIndex("v", centroids, references)
    every = index.search_global("v", queries, 10)
    floor = float(np.median([h.score for hits in every for h in hits]))
    assert index.search_global("v", queries, 10, min_score=floor) == \
        [[h for h in hits if h.score >= floor] for hits in every]
