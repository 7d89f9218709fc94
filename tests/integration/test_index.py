from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared.errors import InfrastructureError
from shared.geo import tile_of
from shared.index import (
    FINGERPRINT_KEY,
    STATE_KEY,
    CentroidRows,
    Hit,
    IndexVersionError,
    LandmarkIndex,
    ReferenceRows,
    sanitize_version,
)

pytestmark = pytest.mark.integration

DIM = 64


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory):
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    tmp = tmp_path_factory.mktemp("milvus")
    server, db, port = start_server_in_thread(data_dir=str(tmp), host="127.0.0.1", port=0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop(0)
        db.close()


@pytest.fixture(scope="module")
def index(milvus_uri):
    idx = LandmarkIndex(milvus_uri, timeout=30.0, connect_timeout=5.0)
    yield idx
    idx.close()


def _unit(rng, n, d=DIM):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _world(seed: int, n_landmarks: int = 1000, per: int = 3, refs: int = 4):
    """n_landmarks*per centroids; lat/lon spread over the world except a dense cluster of
    landmarks 0..9 in a few tiles near Paris, and landmarks 10..11 straddling the antimeridian."""
    rng = np.random.default_rng(seed)
    lm = np.repeat(np.arange(n_landmarks, dtype=np.int64), per)
    cn = np.tile(np.arange(per, dtype=np.int64), n_landmarks)
    lat_l = rng.uniform(-70, 70, n_landmarks)
    lon_l = rng.uniform(-180, 180, n_landmarks)
    lat_l[:10] = 48.8584 + rng.uniform(-0.004, 0.004, 10)
    lon_l[:10] = 2.2945 + rng.uniform(-0.006, 0.006, 10)
    lat_l[10:12] = -16.5
    lon_l[10:12] = [179.9999, -179.9999]
    lats, lons = np.repeat(lat_l, per), np.repeat(lon_l, per)
    c = CentroidRows(lm, cn, lats, lons, _unit(rng, lm.size))
    rl = np.repeat(np.arange(n_landmarks, dtype=np.int64), refs)
    rn = np.tile(np.arange(refs, dtype=np.int64), n_landmarks)
    r = ReferenceRows(rl, rn, _unit(rng, rl.size))
    return c, r


@pytest.fixture(scope="module")
def published(index):
    c1, r1 = _world(1)
    c2, r2 = _world(2, n_landmarks=50)
    index.publish("v1_0", c1, r1)
    index.publish("v2", c2, r2)
    return {"v1_0": (c1, r1), "v2": (c2, r2)}


def _brute(c: CentroidRows, q: np.ndarray, k: int, mask=None):
    s = q @ c.embeddings.T
    out = []
    for i in range(q.shape[0]):
        sc = s[i].copy()
        if mask is not None:
            sc[~mask] = -np.inf
        order = np.argsort(-sc, kind="stable")[:k]
        order = [j for j in order if np.isfinite(sc[j])]
        out.append([(int(c.landmark_ids[j]), int(c.centroid_nos[j]), float(sc[j])) for j in order])
    return out


def _assert_same(hits: list[list[Hit]], expected, tol=1e-4):
    assert len(hits) == len(expected)
    for h, e in zip(hits, expected):
        assert len(h) == len(e)
        scores = [x.score for x in h]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, [x[2] for x in e], atol=tol)
        got = {(x.landmark_id, x.centroid_no) for x in h}
        want = {(x[0], x[1]) for x in e}
        if got != want:  # allow swaps only between (near-)ties at the cut-off
            cut = e[-1][2]
            diff = got ^ want
            sc = {(x.landmark_id, x.centroid_no): x.score for x in h}
            sc.update({(x[0], x[1]): x[2] for x in e})
            assert all(abs(sc[d] - cut) < tol for d in diff), diff


def test_versions_must_be_collection_safe():
    assert sanitize_version("v2024_05_01_abc") == "v2024_05_01_abc"
    for bad in ("", "...", "v1.0", "2024-05-01+abc", "x" * 201):
        with pytest.raises(ValueError):
            sanitize_version(bad)


def test_publish_activate_and_swap(index, published):
    assert set(index.versions()) >= {"v1_0", "v2"}
    assert index.active_version() is None
    index.activate("v1_0")
    assert index.active_version() == "v1_0"
    index.activate("v2")
    assert index.active_version() == "v2"
    index.activate("v2")  # idempotent
    assert index.active_version() == "v2"
    with pytest.raises(IndexVersionError):
        index.drop("v2")  # active
    with pytest.raises(IndexVersionError):
        index.activate("nope")
    index.activate("v1_0")
    assert index.active_version() == "v1_0"
    # None means the active version.
    q = published["v1_0"][0].embeddings[:2]
    assert [h[0].landmark_id for h in index.search_global(None, q, 1)] == [
        int(x) for x in published["v1_0"][0].landmark_ids[:2]
    ]


def test_a_first_activation_that_fails_in_postgresql_leaves_no_alias(tmp_path):
    """With no version to go back to, the alias is removed: workers must not tag under a version that the
    albums never activated (they find no active model and hand their batches back instead)."""
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    from shared.rollout import alias_restored_on_failure

    server, db, port = start_server_in_thread(data_dir=str(tmp_path), host="127.0.0.1", port=0)
    idx = LandmarkIndex(f"http://127.0.0.1:{port}", timeout=30.0, connect_timeout=5.0)
    try:
        idx.publish("first", *_world(5, n_landmarks=20))
        with pytest.raises(RuntimeError, match="database went away"):
            with alias_restored_on_failure("first", idx):
                assert idx.active_version() == "first"
                raise RuntimeError("the database went away")
        assert idx.active_version() is None
        idx.deactivate()  # nothing to remove: no error
        assert "first" in idx.versions()
    finally:
        idx.close()
        server.stop(0)
        db.close()


def test_publishing_a_version_again_is_a_no_op_and_another_gallery_under_it_is_refused(index, published):
    c, r = published["v2"]
    assert index.publish("v2", c, r) is False  # the same gallery: nothing to do
    assert index.holds("v2", c, r)
    # Same row counts, another gallery (what `build --version v2` run again gives): refused, never overwritten.
    other = CentroidRows(c.landmark_ids, c.centroid_nos, c.lats, c.lons, -c.embeddings)
    with pytest.raises(IndexVersionError, match="already exists .* another gallery.*new version"):
        index.publish("v2", other, r)
    assert not index.holds("v2", other, r)
    moved = CentroidRows(c.landmark_ids, c.centroid_nos, c.lats + 0.001, c.lons, c.embeddings)
    assert not index.holds("v2", moved, r)  # the places count too
    # The refused publish left the existing version intact.
    assert index.row_counts("v2") == (len(c), len(r))
    assert index.search_global("v2", c.embeddings[:1], 1)[0][0].score == pytest.approx(1.0, abs=1e-4)


# A publish killed outright (SIGKILL, the OOM killer): its process runs no cleanup. The child stores two
# chunks of centroids, says so, then waits in its third insert until it is killed.
_KILLED_PUBLISH = """
import sys, time
import numpy as np
import shared.index as si
from pymilvus import MilvusClient

si.INSERT_CHUNK, si.INSERTS_IN_FLIGHT = 16, 1
real_insert, sent = MilvusClient.insert, []

def insert(self, *args, **kwargs):
    if len(sent) == 2:
        print("inserting", flush=True)
        time.sleep(600)
    sent.append(1)
    return real_insert(self, *args, **kwargs)

MilvusClient.insert = insert
g = np.load(sys.argv[3])
c = si.CentroidRows(g["c_lm"], g["c_no"], g["c_lat"], g["c_lon"], g["c_emb"])
r = si.ReferenceRows(g["r_lm"], g["r_no"], g["r_emb"])
si.LandmarkIndex(sys.argv[1]).publish(sys.argv[2], c, r)
"""


def _publish_killed_while_inserting(milvus_uri: str, version: str, c, r, tmp_path) -> None:
    gallery = tmp_path / "gallery.npz"
    np.savez(gallery, c_lm=c.landmark_ids, c_no=c.centroid_nos, c_lat=c.lats, c_lon=c.lons, c_emb=c.embeddings,
             r_lm=r.landmark_ids, r_no=r.ref_nos, r_emb=r.embeddings)
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_PUBLISH, milvus_uri, version, str(gallery)],
                             cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([child.stdout], [], [], 120)
        assert ready and child.stdout.readline() == b"inserting\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL


def test_a_publish_killed_while_inserting_is_not_published_and_publishing_again_repairs_it(
        index, milvus_uri, published, tmp_path, caplog):
    c, r = _world(6, n_landmarks=40)
    _publish_killed_while_inserting(milvus_uri, "killed", c, r, tmp_path)
    # It left both collections behind, part-filled: no cleanup ran.
    assert index.client.has_collection("lm_centroids_killed") and index.client.has_collection("lm_references_killed")
    assert "killed" not in index.versions()
    assert not index.is_published("killed")
    with pytest.raises(IndexVersionError, match="incomplete"):
        index.activate("killed")
    with pytest.raises(IndexVersionError, match="incomplete"):
        index.row_counts("killed")
    assert index.active_version() != "killed"
    # Publishing it again drops the leftovers and publishes the whole gallery.
    with caplog.at_level(logging.WARNING, logger="shared.index"):
        assert index.publish("killed", c, r) is True
    assert any("incomplete" in rec.getMessage() for rec in caplog.records)
    assert index.is_published("killed") and "killed" in index.versions()
    assert index.row_counts("killed") == (len(c), len(r)) and index.holds("killed", c, r)
    index.drop("killed")


def test_a_version_is_complete_only_once_both_collections_are_sealed_with_one_fingerprint(index):
    """What a publish killed at each later step leaves: still incomplete, until its very last step is done."""
    c, r = _world(7, n_landmarks=20)
    index.publish("steps", c, r)
    seal = index._stored("steps")
    assert seal.complete and len(seal.fingerprint) == 64
    for cname_marks, rname_marks in [
        ({"state": "filling"}, {"state": "filling"}),  # killed before sealing either
        ({"state": "filling"}, {"state": "sealed"}),  # killed between the two
        ({"state": "sealed"}, {"state": "sealed", "fp": "0" * 64}),  # two different galleries
    ]:
        for name, marks in (("lm_centroids_steps", cname_marks), ("lm_references_steps", rname_marks)):
            index.client.alter_collection_properties(
                name, {STATE_KEY: marks["state"], FINGERPRINT_KEY: marks.get("fp", seal.fingerprint)})
        assert "steps" not in index.versions() and not index.is_published("steps")
    index.client.drop_collection("lm_references_steps")  # killed between creating the two
    assert "steps" not in index.versions() and not index.is_published("steps")
    assert index.publish("steps", c, r) is True
    assert index._stored("steps") == seal
    index.drop("steps")


def test_a_version_published_before_the_marks_is_listed_activatable_and_compared_by_its_counts(index, published):
    """An upgrading fleet keeps its active version: collections without marks (as older code left them)
    count as complete; with no fingerprint to compare, a publish over them compares row counts."""
    c, r = _world(8, n_landmarks=20)
    index.publish("legacy", c, r)
    for name in ("lm_centroids_legacy", "lm_references_legacy"):
        index.client.drop_collection_properties(name, [STATE_KEY, FINGERPRINT_KEY])
        assert not index.client.describe_collection(name).get("properties")
    assert "legacy" in index.versions() and index.is_published("legacy")
    index.activate("legacy")
    assert index.active_version() == "legacy"
    index.activate("v1_0")  # as test_publish_activate_and_swap left it
    assert index.publish("legacy", c, r) is False  # same counts: taken for the same gallery
    fewer = CentroidRows(c.landmark_ids[:-1], c.centroid_nos[:-1], c.lats[:-1], c.lons[:-1], c.embeddings[:-1])
    with pytest.raises(IndexVersionError, match="another gallery"):
        index.publish("legacy", fewer, r)
    assert index.row_counts("legacy") == (len(c), len(r))
    index.drop("legacy")


def test_publish_drop_roundtrip(index):
    c, r = _world(3, n_landmarks=20)
    index.publish("tmp", c, r)
    assert "tmp" in index.versions()
    assert sorted(index.references("tmp", [0, 1])) == [0, 1]
    index.drop("tmp")
    assert "tmp" not in index.versions()
    index.publish("tmp", c, r)  # may be published again once dropped
    index.drop("tmp")


def test_publish_validates(index):
    c, r = _world(4, n_landmarks=20)
    bad = CentroidRows(c.landmark_ids, c.centroid_nos, c.lats, c.lons, c.embeddings[:, :10])
    with pytest.raises(ValueError):
        index.publish("bad", bad, r)
    dup = CentroidRows(c.landmark_ids, np.zeros_like(c.centroid_nos), c.lats, c.lons, c.embeddings)
    with pytest.raises(ValueError, match="duplicate"):
        index.publish("bad", dup, r)
    assert "bad" not in index.versions()


def test_a_publish_that_fails_part_way_leaves_nothing_behind(index, monkeypatch):
    """The server fails one insert chunk while another is in flight: the publish stops sending, raises an
    infrastructure error, leaves neither collection of the version, and the version can be published again."""
    import shared.index
    from pymilvus import MilvusClient
    from pymilvus.exceptions import MilvusException
    c, r = _world(5, n_landmarks=40)
    monkeypatch.setattr(shared.index, "INSERT_CHUNK", 16)  # 120 centroids: 8 chunks
    real_insert, calls = MilvusClient.insert, []

    def failing_on_the_fifth(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise MilvusException(message="the server dropped this chunk")
        return real_insert(self, *args, **kwargs)

    monkeypatch.setattr(MilvusClient, "insert", failing_on_the_fifth)
    with pytest.raises(InfrastructureError, match="dropped this chunk"):
        index.publish("partial", c, r)
    assert len(calls) <= 5 + shared.index.INSERTS_IN_FLIGHT  # not the 13 chunks after the failure
    assert "partial" not in index.versions()
    assert not index.client.has_collection("lm_centroids_partial")
    assert not index.client.has_collection("lm_references_partial")
    monkeypatch.setattr(MilvusClient, "insert", real_insert)
    index.publish("partial", c, r)
    assert index.row_counts("partial") == (120, 160)
    index.drop("partial")


def test_search_global_matches_brute_force(index, published):
    c, _ = published["v1_0"]
    rng = np.random.default_rng(7)
    q = np.vstack([_unit(rng, 6), c.embeddings[[5, 100, 2999]]])
    for k in (1, 10, 50):
        hits = index.search_global("v1_0", q, k)
        _assert_same(hits, _brute(c, q, k))
    hits = index.search_global("v1_0", q[-3:], 1)
    assert [(h[0].landmark_id, h[0].centroid_no) for h in hits] == [(1, 2), (33, 1), (999, 2)]
    assert hits[0][0].lat == pytest.approx(float(c.lats[5]))
    assert hits[0][0].lon == pytest.approx(float(c.lons[5]))
    assert index.search_global("v1_0", q[:0], 5) == []
    with pytest.raises(ValueError):
        index.search_global("v1_0", q, 0)
    every = index.search_global("v1_0", q, 10)
    floor = float(np.median([h.score for found in every for h in found]))
    assert index.search_global("v1_0", q, 10, min_score=floor) == \
        [[h for h in found if h.score >= floor] for found in every]


def test_search_geo_exact_on_selective_filter(index, published):
    c, _ = published["v1_0"]
    tiles = np.array([tile_of(a, o) for a, o in zip(c.lats, c.lons)])
    paris = sorted(set(tiles[: 10 * 3].tolist()))
    assert 1 <= len(paris) <= 12
    one = [paris[0]]
    anti = sorted({tile_of(-16.5, 179.9999), tile_of(-16.5, -179.9999)})
    empty = [tile_of(0.0, 0.0) + 1, 12345]  # tiles holding nothing
    assert not np.isin(tiles, empty).any()
    rng = np.random.default_rng(11)
    q = _unit(rng, 8)
    tile_lists = [paris, paris, one, anti, empty, paris, one, []]
    for limit in (1, 5, 100, 500):
        hits = index.search_geo("v1_0", q, tile_lists, limit)
        expected = [
            _brute(c, q[i : i + 1], limit, np.isin(tiles, t))[0] if t else []
            for i, t in enumerate(tile_lists)
        ]
        _assert_same(hits, expected)
    # Fewer matches than the limit: all of them, no padding.
    hits = index.search_geo("v1_0", q, tile_lists, 500)
    assert len(hits[0]) == int(np.isin(tiles, paris).sum()) == 30
    assert len(hits[3]) == 6
    assert {h.landmark_id for h in hits[3]} == {10, 11}
    assert hits[4] == [] and hits[7] == []
    for h in hits[0]:
        assert h.lat is not None and abs(h.lat - 48.8584) < 0.01
    with pytest.raises(ValueError):
        index.search_geo("v1_0", q, tile_lists[:3], 5)


def test_references_roundtrip_and_cache(index, published):
    _, r = published["v1_0"]
    got = index.references("v1_0", [3, 999, 3, 123456])
    assert sorted(got) == [3, 999]
    for lid in (3, 999):
        want = r.embeddings[r.landmark_ids == lid]
        assert got[lid].dtype == np.float32 and got[lid].shape == (4, DIM)
        np.testing.assert_allclose(got[lid], want, atol=1e-6)
    many = index.references("v1_0", range(1000))
    assert len(many) == 1000
    # Cached: served without touching Milvus.
    index._client, saved = None, index._client
    index.uri, uri = "http://127.0.0.1:1", index.uri
    try:
        assert sorted(index.references("v1_0", [3, 999])) == [3, 999]
    finally:
        index._client, index.uri = saved, uri


def test_references_of_landmarks_past_the_query_limit_are_all_fetched(index, monkeypatch):
    """A query answers at most MAX_TOPK rows and the dataset puts no cap on references per landmark: chunks
    whose references reach the limit (down to a single landmark with as many as the limit) still come back
    whole, ordered by ref_no; chunks below the limit still take one query each."""
    import shared.index
    from pymilvus import MilvusClient
    rng = np.random.default_rng(6)
    n_landmarks, limit = 30, 16
    counts = rng.integers(1, 8, n_landmarks)
    counts[[4, 17]] = [limit, limit]  # landmarks alone at the limit
    rl = np.repeat(np.arange(n_landmarks, dtype=np.int64), counts)
    rn = np.concatenate([rng.choice(shared.index.ID_STRIDE, k, replace=False) for k in counts]).astype(np.int64)
    shuffle = rng.permutation(rl.size)
    r = ReferenceRows(rl[shuffle], rn[shuffle], _unit(rng, rl.size))
    c, _ = _world(6, n_landmarks=n_landmarks)
    index.publish("many_refs", c, r)
    monkeypatch.setattr(shared.index, "MAX_TOPK", limit)
    monkeypatch.setattr(shared.index, "QUERY_ID_CHUNK", 10)  # every chunk holds 16 rows or more
    real_query, queries = MilvusClient.query, []

    def counted(self, *args, **kwargs):
        queries.append(kwargs["filter"])
        return real_query(self, *args, **kwargs)

    monkeypatch.setattr(MilvusClient, "query", counted)
    try:
        got = index.references("many_refs", range(n_landmarks))
        assert sorted(got) == list(range(n_landmarks))
        for lid in range(n_landmarks):
            mine = r.landmark_ids == lid
            order = np.argsort(r.ref_nos[mine])
            np.testing.assert_allclose(got[lid], r.embeddings[mine][order], atol=1e-6)
        few = [lid for lid in range(n_landmarks) if counts[lid] <= 2][:3]
        index._ref_cache.clear()
        queries.clear()
        assert sorted(index.references("many_refs", few)) == few
        assert len(queries) == 1
    finally:
        index.drop("many_refs")


def test_unreachable_uri_raises_infrastructure_error():
    idx = LandmarkIndex("http://127.0.0.1:1", timeout=2.0, connect_timeout=2.0)
    t = time.monotonic()
    with pytest.raises(InfrastructureError, match="127.0.0.1:1"):
        idx.search_global("v1", np.zeros((1, DIM), np.float32), 5)
    with pytest.raises(InfrastructureError):
        idx.active_version()
    assert time.monotonic() - t < 10.0


def test_a_released_collection_is_loaded_again_on_first_use(index, published):
    """A restarted Milvus (milvus-lite always) serves its collections released; search must not fail."""
    from shared.index import centroid_collection, reference_collection
    c, r = published["v2"]
    q = c.embeddings[[0, 7]]
    before = index.search_global("v2", q, 3)
    index.client.release_collection(centroid_collection("v2"))
    index.client.release_collection(reference_collection("v2"))
    index._ref_cache.clear()
    _assert_same(index.search_global("v2", q, 3), [[(h.landmark_id, h.centroid_no, h.score) for h in hits]
                                                   for hits in before])
    got = index.references("v2", [int(r.landmark_ids[0])])
    assert list(got) == [int(r.landmark_ids[0])]


def test_row_counts(index, published):
    c, r = published["v2"]
    assert index.row_counts("v2") == (len(c), len(r))
