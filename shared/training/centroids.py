"""Several centroids per landmark: complete-link clustering of its photos' embeddings (the article)."""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage


def normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def landmark_centroids(embeddings: np.ndarray, *, min_cluster: int, max_distance: float) -> np.ndarray:
    """Centroids (k, d) of every complete-link cluster with at least `min_cluster` photos, clusters cut
    at cosine distance `max_distance`; one centroid over all photos when no cluster is big enough."""
    if len(embeddings) == 0:
        raise ValueError("a landmark needs at least one photo to have a centroid")
    if len(embeddings) >= 2:
        tree = linkage(embeddings.astype(np.float64), method="complete", metric="cosine")
        labels = fcluster(tree, t=max_distance, criterion="distance")
        sizes = np.bincount(labels)
        valid = [label for label in np.unique(labels) if sizes[label] >= min_cluster]
        if valid:
            # Largest cluster first: centroid 0 is the landmark's main aspect.
            valid.sort(key=lambda label: -sizes[label])
            return normalise(np.stack([embeddings[labels == label].mean(axis=0) for label in valid]))
    return normalise(embeddings.mean(axis=0, keepdims=True))
