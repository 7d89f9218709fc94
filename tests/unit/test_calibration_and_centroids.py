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
    assert (scores < np.nextafter(t, -np.inf) - 1e-9).mean() < 0.99 or n < 100


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
