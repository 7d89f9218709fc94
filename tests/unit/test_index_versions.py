"""Without a server: how the index tells a missing alias from a failure, and what the gallery fingerprint
that marks a published version covers."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from pymilvus.exceptions import MilvusException

from shared.errors import InfrastructureError
from shared.index import CentroidRows, LandmarkIndex, ReferenceRows, _centroid_columns, _fingerprint, _reference_columns


class _Client:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def describe_alias(self, alias: str, timeout: float) -> dict:
        raise self.error


def _index(error: Exception) -> LandmarkIndex:
    index = LandmarkIndex("http://milvus:19530")
    index._client = _Client(error)
    return index


@pytest.mark.parametrize("error", [
    # current Milvus: ErrAliasNotFound stamped an input error, which _wrap passes on unchanged
    MilvusException(1600, "alias not found[database=default][alias=lm_active]", is_input_error=True),
    MilvusException(1600, "alias not found[database=default][alias=lm_active]"),  # older Milvus
    MilvusException(100, "alias 'lm_active' does not exist"),  # milvus-lite
])
def test_a_missing_alias_means_no_active_version_however_the_server_says_it(error):
    assert _index(error).active_version() is None


def test_other_failures_of_the_alias_check_are_raised():
    with pytest.raises(MilvusException, match="bad request"):
        _index(MilvusException(1100, "bad request", is_input_error=True)).active_version()
    with pytest.raises(InfrastructureError, match="unavailable"):
        _index(MilvusException(2, "service unavailable")).active_version()

    class Unavailable(grpc.RpcError):
        def __str__(self) -> str:
            return "collection not found in the name cache, connection refused"  # "not found", yet an outage
    with pytest.raises(InfrastructureError):
        _index(Unavailable()).active_version()


def _gallery(seed: int = 0) -> tuple[CentroidRows, ReferenceRows]:
    rng = np.random.default_rng(seed)
    c = CentroidRows(np.array([3, 3, 7]), np.array([0, 1, 0]), np.array([48.8, 48.8, 51.0]),
                     np.array([2.3, 2.3, 13.7]), rng.standard_normal((3, 4)).astype(np.float32))
    r = ReferenceRows(np.array([3, 7, 7]), np.array([0, 0, 1]), rng.standard_normal((3, 4)).astype(np.float32))
    return c, r


def _fp(c: CentroidRows, r: ReferenceRows) -> str:
    ccols = _centroid_columns(c)
    return _fingerprint(ccols, _reference_columns(r, dim=ccols["embedding"].shape[1]))


def test_the_fingerprint_is_the_gallery_as_sent_whatever_types_it_came_in():
    c, r = _gallery()
    assert _fp(c, r) == _fp(*_gallery())
    as_lists = CentroidRows(c.landmark_ids.astype(np.int32), c.centroid_nos.tolist(), c.lats.tolist(),
                            tuple(c.lons), c.embeddings.astype(np.float64))
    assert _fp(as_lists, r) == _fp(c, r)


def test_every_column_of_the_gallery_changes_the_fingerprint():
    c, r = _gallery()
    nudged = c.embeddings.copy()
    nudged[2, 3] = np.nextafter(nudged[2, 3], np.float32(1))
    variants = [
        (CentroidRows(c.landmark_ids, c.centroid_nos, c.lats, c.lons, nudged), r),
        (CentroidRows(np.array([3, 3, 8]), c.centroid_nos, c.lats, c.lons, c.embeddings), r),
        (CentroidRows(c.landmark_ids, np.array([0, 2, 0]), c.lats, c.lons, c.embeddings), r),
        (CentroidRows(c.landmark_ids, c.centroid_nos, c.lats + [0, 0, 1e-9], c.lons, c.embeddings), r),
        (CentroidRows(c.landmark_ids, c.centroid_nos, c.lats, c.lons - [1e-9, 0, 0], c.embeddings), r),
        (c, ReferenceRows(np.array([3, 3, 7]), np.array([0, 1, 0]), r.embeddings)),
        (c, ReferenceRows(r.landmark_ids, r.ref_nos, r.embeddings[::-1])),
        (c, ReferenceRows(r.landmark_ids[:2], r.ref_nos[:2], r.embeddings[:2])),
        (c, ReferenceRows(np.array([], np.int64), np.array([], np.int64), np.zeros((0, 4), np.float32))),
    ]
    fingerprints = {_fp(*v) for v in variants} | {_fp(c, r)}
    assert len(fingerprints) == len(variants) + 1
