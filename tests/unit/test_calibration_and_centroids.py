"""Threshold calibration and multi-centroid clustering (pure functions)."""

import numpy as np
import pytest

from shared.training.calibrate import threshold_for_accuracy
from shared.training.centroids import landmark_centroids


@pytest.mark.parametrize("n", [1, 7, 100, 1000])
def test_threshold_rejects_the_target_share_of_negatives(n):
    scores = np.random.default_rng(n).random(n)
    t = threshold_for_accuracy(scores, 0.99)
    assert (scores < t).mean() >= 0.99
    below = np.nextafter(np.float32(t), np.float32(-np.inf))  # the float32 value before it: one more passes
    assert (scores < below).mean() < 0.99 or n < 100


@pytest.mark.parametrize("seed", range(5))
def test_a_threshold_stored_as_real_still_keeps_out_the_negative_it_was_computed_from(seed):
    """model_versions keeps thresholds as REAL (float4) and scores are float32: a threshold a float64 step above
    the last negative kept out rounded back to it when stored, and that negative passed on every worker."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(-1, 1, 200).astype(np.float32)  # what the embeddings' products give
    t = threshold_for_accuracy(scores, 0.99)
    stored = np.float32(t)  # a REAL column
    assert float(stored) == t  # stored exactly
    assert (scores >= stored).sum() == (scores >= t).sum() == 2  # 1% passes, on the workers as in calibration
    assert float(np.sort(scores)[-3]) < float(stored)  # the negative it was computed from stays out


def test_the_no_gps_thresholds_are_float32_values_and_decide_as_in_calibration():
    from shared.training import calibrate as cal
    scores = np.random.default_rng(7).uniform(0, 1, 300).astype(np.float32)
    negatives = [({9: float(s)}, {9: float(s)}) for s in scores]
    c = cal.Candidates([s for s, _ in negatives], [r for _, r in negatives])
    _, _, curve = cal.calibrate_no_gps(c, [None] * len(scores), 0.99)
    for t_global, t_ref, _, rejected in curve:
        assert float(np.float32(t_global)) == t_global and float(np.float32(t_ref)) == t_ref
        stored = [float(np.float32(t)) for t in (t_global, t_ref)]
        assert sum(not cal.tags_no_gps(c, i, *stored) for i in range(len(scores))) == rejected * len(scores)


def test_two_aspects_give_two_centroids_and_a_small_landmark_one():
    rng = np.random.default_rng(0)
    near_front = np.eye(16)[0] + rng.normal(0, 0.05, (30, 16))
    far_view = np.eye(16)[1] + rng.normal(0, 0.05, (20, 16))
    centroids = landmark_centroids(np.vstack([near_front, far_view]), min_cluster=10, max_distance=0.5)
    assert centroids.shape == (2, 16)
    assert np.argmax(centroids[0]) == 0 and np.argmax(centroids[1]) == 1  # biggest aspect first
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    assert landmark_centroids(near_front[:5], min_cluster=10, max_distance=0.5).shape == (1, 16)


def test_stray_photos_do_not_pull_the_centroid():
    rng = np.random.default_rng(1)
    main = np.eye(8)[0] + rng.normal(0, 0.03, (40, 8))
    strays = rng.normal(0, 1, (4, 8))
    (centroid,) = landmark_centroids(np.vstack([main, strays]), min_cluster=10, max_distance=0.5)
    assert centroid[0] > 0.99


def _two_landmark_index():
    from shared.index import CentroidRows, ReferenceRows
    from shared.local_index import LocalIndex
    e1, e2 = np.eye(3, dtype=np.float32)[:2]
    return LocalIndex("v", CentroidRows(np.array([1, 2]), np.array([0, 0]), [48.85, 49.25], [2.35, 4.03], np.stack([e1, e2])),
                      ReferenceRows(np.array([1, 2]), np.array([0, 0]), np.stack([e1, e2])))


def test_a_landmark_photo_also_tagged_with_another_landmark_counts_as_wrong():
    """Online every passing landmark tags the photo, so a photo of 1 tagged [1, 2] is in album 2 too."""
    from shared.recognition import Thresholds
    from shared.training.evaluate import TestPhotos, accuracy_metrics, decide
    between = np.array([0.75, 0.66, 0.0], np.float32)
    photos = np.stack([between / np.linalg.norm(between), np.eye(3, dtype=np.float32)[0]])
    test = TestPhotos(photos, [None, None], [1, 1], [True, True])
    answers = decide(test, _two_landmark_index(), "v", Thresholds(0.6, 0.6, 0.6))
    assert answers == [[1, 2], [1]]
    metrics = accuracy_metrics(test, answers)
    assert metrics["landmark_accuracy"] == 0.5 and metrics["no_gps_landmark_accuracy"] == 0.5
    assert metrics["frequent_accuracy"] == 0.5
    assert metrics["landmark_top1_accuracy"] == 1.0  # the best tag alone, under its own name
    assert metrics["landmark_several_tags_rate"] == 0.5


def test_thresholds_are_chosen_for_photos_tagged_with_their_landmark_alone():
    """15 photos of landmark 1 that landmark 2 also reaches at 0.7, 10 photos of landmark 3 at 0.65:
    below 0.7 every photo of 1 is double-tagged, so the best choice keeps 2 out (and misses 3)."""
    from shared.training import calibrate as cal
    negatives = [({9: s}, {9: -np.inf}) for s in np.linspace(0.0, 1.0, 200)]  # never verified
    positives = [({1: 0.9, 2: 0.7}, {1: 0.9, 2: 0.7})] * 15 + [({3: 0.65}, {3: 0.65})] * 10
    c = cal.Candidates([s for s, _ in negatives + positives], [r for _, r in negatives + positives])
    truth = [None] * 200 + [1] * 15 + [3] * 10
    t_global, t_ref, _ = cal.calibrate_no_gps(c, truth, 0.99)
    assert 0.7 < t_global <= 0.9
    assert all(cal.tags_no_gps(c, i, t_global, t_ref) == {1} for i in range(200, 215))


def test_calibration_without_non_landmark_photos_says_what_it_needs():
    from shared.training import calibrate as cal
    c = cal.Candidates([{1: 0.9}], [{1: 0.9}])
    with pytest.raises(ValueError, match="non-landmark photos"):
        cal.calibrate_no_gps(c, [1], 0.99)


def test_negatives_with_no_candidate_give_the_lowest_float32_threshold_without_an_overflow():
    """A non-landmark photo with no candidate scores -inf: every build printed `overflow encountered in cast`."""
    import warnings
    scores = np.array([-np.inf] * 5 + [0.1, 0.2, 0.3, 0.4, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's RuntimeWarning fails the test
        t = threshold_for_accuracy(scores, 0.5)
    assert t == float(np.finfo(np.float32).min) and (scores < t).mean() == 0.5
