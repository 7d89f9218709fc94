"""A model's gallery: per landmark, centroids of its photos' embeddings and 3–5 reference embeddings,
with thresholds calibrated on non-landmark photos. Built from folders (`DIR/<slug>/*.jpg`)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shared.embedder import Embedder
from shared.errors import DecodeError
from shared.imaging import decode_image
from shared.local_index import grouped_by_id
from shared.recognition import reference_similarity
from shared.training.calibrate import threshold_for_accuracy
from shared.training.centroids import landmark_centroids
from shared.training.dataset import Landmark

log = logging.getLogger(__name__)
# The file names of the formats decode_image reads (docs/events.md): a photo of any other is not picked up.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".heic", ".heif", ".avif", ".gif", ".bmp",
                  ".tif", ".tiff"}


def image_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def embed_files(embedder: Embedder, paths: Sequence[Path], batch_size: int = 32,
                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[Path]]:
    """Embeddings of the files that decode; the others are logged and left out."""
    size, chunks, kept = embedder.meta.input_size, [], []
    for start in range(0, len(paths), batch_size):
        pixels = []
        for path in paths[start:start + batch_size]:
            try:
                pixels.append(decode_image(path.read_bytes(), size=size, max_pixels=200_000_000).pixels)
                kept.append(path)
            except DecodeError as exc:
                log.warning("skipping %s: %s", path, exc.reason)
        if pixels:
            chunks.append(embedder.embed(np.stack(pixels)))
        if progress:
            progress(len(paths[start:start + batch_size]))
    dim = embedder.meta.embedding_dim
    return (np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)), kept


class EmptyGalleryError(ValueError):
    """No landmark had photos to build a gallery from."""


@dataclass
class LandmarkPhotos:
    info: Landmark
    references: np.ndarray  # (r, d)
    photos: np.ndarray      # (n, d), references included


def build_gallery(items: Iterable[LandmarkPhotos], *, min_cluster: int = 3,
                  max_distance: float = 0.6) -> dict:
    landmarks, c_ids, c_nos, c_emb, r_ids, r_emb = [], [], [], [], [], []
    for item in items:
        centroids = landmark_centroids(item.photos, min_cluster=min_cluster, max_distance=max_distance)
        landmarks.append({key: value for key, value in asdict(item.info).items() if key != "extra"})
        c_ids += [item.info.id] * len(centroids)
        c_nos += list(range(len(centroids)))
        c_emb.append(centroids)
        r_ids += [item.info.id] * len(item.references)
        r_emb.append(item.references)
    if not landmarks:
        raise EmptyGalleryError("no landmark with photos: the gallery would be empty")
    return {
        "landmarks": landmarks,
        "centroids": {"landmark_ids": torch.tensor(c_ids, dtype=torch.int64),
                      "centroid_nos": torch.tensor(c_nos, dtype=torch.int32),
                      "embeddings": torch.from_numpy(np.concatenate(c_emb))},
        "references": {"landmark_ids": torch.tensor(r_ids, dtype=torch.int64),
                       "embeddings": torch.from_numpy(np.concatenate(r_emb))},
    }


def calibrate_thresholds(gallery: dict, negatives: np.ndarray, target: float = 0.99) -> dict[str, float]:
    """t_global and t_ref so that `target` of the negatives are rejected; t_geo the same rule on each
    negative's score against the landmarks it could meet nearby (here: all of them, a conservative bound)."""
    centroids = gallery["centroids"]["embeddings"].numpy()
    centroid_ids = gallery["centroids"]["landmark_ids"].numpy()
    refs = gallery["references"]["embeddings"].numpy()
    ref_ids = gallery["references"]["landmark_ids"].numpy()
    sims = negatives @ centroids.T
    best = sims.max(axis=1)
    best_ids = centroid_ids[sims.argmax(axis=1)]
    refs_of = grouped_by_id(ref_ids, refs)  # one sort, not a scan of every reference per negative
    empty = np.zeros((0, refs.shape[1]), refs.dtype)
    ref_scores = np.array([reference_similarity(e, refs_of.get(int(lid), empty))
                           for e, lid in zip(negatives, best_ids)])
    t_global = threshold_for_accuracy(best, target)
    return {"t_geo": t_global, "t_global": t_global, "t_ref": threshold_for_accuracy(ref_scores, target)}
