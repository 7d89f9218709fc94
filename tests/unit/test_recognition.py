"""The decision rule on hand-made hits: geo square, thresholds, reference verification, ordering."""

import numpy as np

from shared.events import GeoPoint
from shared.index import Hit
from shared.outcomes import Method
from shared.recognition import Thresholds, best_per_landmark, decide_geo, decide_global, recognise_batch

PARIS = GeoPoint(lat=48.8584, lon=2.2945)
T = Thresholds(t_geo=0.5, t_global=0.8, t_ref=0.7)


def test_a_landmark_scores_its_best_centroid():
    hits = [Hit(1, 0, 0.3), Hit(1, 1, 0.9), Hit(2, 0, 0.5)]
    assert best_per_landmark(hits) == {1: 0.9, 2: 0.5}


def test_geo_accepts_the_best_landmark_inside_the_square_at_t_geo():
    near = [Hit(1, 0, 0.55, 48.8590, 2.2950), Hit(2, 0, 0.52, 48.8580, 2.2940)]
    tags = decide_geo(near, PARIS, T.t_geo)
    assert [(t.landmark_id, t.method) for t in tags] == [(1, Method.GEO)]


def test_geo_ignores_landmarks_outside_the_square_even_if_they_score_higher():
    hits = [Hit(1, 0, 0.99, 48.8700, 2.2945), Hit(2, 0, 0.6, 48.8586, 2.2946)]  # 1 is 1.3 km north
    assert [t.landmark_id for t in decide_geo(hits, PARIS, T.t_geo)] == [2]


def test_geo_below_threshold_is_a_non_landmark():
    assert decide_geo([Hit(1, 0, 0.49, 48.8584, 2.2945)], PARIS, T.t_geo) == []


def test_global_verifies_every_candidate_against_its_references():
    e = np.array([1.0, 0.0], dtype=np.float32)
    refs = {1: np.array([[1.0, 0.0], [0.8, 0.6]], np.float32),   # mean similarity 0.9: passes
            2: np.array([[0.0, 1.0]], np.float32),               # 0.0: fails verification
            3: np.array([[0.95, 0.31]], np.float32)}             # passes but lower score
    hits = [Hit(1, 0, 0.85), Hit(2, 0, 0.95), Hit(3, 0, 0.81), Hit(4, 0, 0.79)]
    tags = decide_global(hits, e, refs, T)
    assert [(t.landmark_id, t.method) for t in tags] == [(1, Method.REFERENCE), (3, Method.REFERENCE)]


class FakeIndex:
    """Only the two searches recognise_batch uses; the real index is tested against Milvus."""

    def __init__(self):
        self.calls = []

    def search_geo(self, version, queries, tiles, limit):
        self.calls.append(("geo", len(queries)))
        return [[Hit(7, 0, 0.6, PARIS.lat, PARIS.lon)] for _ in queries]

    def search_global(self, version, queries, k, min_score=None):
        self.calls.append(("global", len(queries)))
        return [[Hit(9, 0, 0.9)] for _ in queries]

    def references(self, version, ids):
        return {9: np.array([[1.0, 0.0]], np.float32)}


def test_a_batch_splits_into_one_geo_and_one_global_search():
    index = FakeIndex()
    embeddings = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    tags = recognise_batch(embeddings, [PARIS, None, None], index, "v1", T)
    assert index.calls == [("geo", 1), ("global", 2)]
    assert [t[0].landmark_id if t else None for t in tags] == [7, 9, None]  # photo 3 fails verification
