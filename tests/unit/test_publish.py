"""The rows a gallery is published as: each centroid at its landmark's place, each landmark's references
numbered in gallery order wherever they lie (Milvus keys a reference by landmark and number)."""

from __future__ import annotations

import numpy as np
import torch

from shared.model import ModelMeta
from shared.publish import gallery_rows, model_metrics, occurrence_numbers


def test_references_are_numbered_per_landmark_in_gallery_order_wherever_they_lie():
    ref_ids = [7, 3, 7, 7, 3, 9, 3, 7]
    gallery = {
        "landmarks": [{"id": 3, "lat": 48.86, "lon": 2.35}, {"id": 7, "lat": 51.05, "lon": 13.74},
                      {"id": 9, "lat": 28.61, "lon": 77.21}],
        "centroids": {"landmark_ids": torch.tensor([9, 3, 3, 7]), "centroid_nos": torch.tensor([0, 0, 1, 0]),
                      "embeddings": torch.eye(4)},
        "references": {"landmark_ids": torch.tensor(ref_ids), "embeddings": torch.ones(len(ref_ids), 4)},
    }
    centroids, references = gallery_rows(gallery)
    assert list(references.ref_nos) == [0, 0, 1, 2, 1, 0, 2, 3]
    assert list(zip(centroids.lats, centroids.lons)) == [(28.61, 77.21), (48.86, 2.35), (48.86, 2.35),
                                                         (51.05, 13.74)]


def test_occurrence_numbers_match_counting_the_earlier_equal_ids():
    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 37, 400):
        ids = rng.integers(0, 9, n)
        assert occurrence_numbers(ids).tolist() == [int((ids[:k] == i).sum()) for k, i in enumerate(ids)]


def test_the_version_is_recorded_with_the_builds_figures_in_json_postgres_can_store():
    """model_versions.metrics was always {}: nothing set what publish read."""
    built = ModelMeta("v1", extra={"metrics": {"validation": {"landmark_accuracy": 0.8, "rare_accuracy": None},
                                               "calibration": {"t_ref": float("-inf")}}})
    assert model_metrics(built) == {"validation": {"landmark_accuracy": 0.8, "rare_accuracy": None},
                                    "calibration": {"t_ref": None}}
    older = ModelMeta("v0", extra={"build": {"calibration": {"t_global": 0.9, "photos": 460}}})
    assert model_metrics(older) == {"calibration": {"t_global": 0.9, "photos": 460}}
    assert model_metrics(ModelMeta("v2")) == {}
