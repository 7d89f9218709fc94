"""The bench's model and gallery: a random-init checkpoint, synthetic centroids and references placed in
synthetic cities, anchored on a few generated images so that some photos get tags."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.bench.config import BenchConfig, Reporter
from shared.errors import DecodeError
from shared.training.centroids import normalise

LANDMARK_IMAGE_EVERY = 32  # one generated image in 32 shows a "landmark" (the article: 1–3 % of photos)


def synthetic_places(n_landmarks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Landmark coordinates clustered in cities (~100 landmarks per city, a few km apart), so that the
    1x1 km geo filter meets a realistic handful of candidates."""
    n_cities = max(1, n_landmarks // 100)
    city_lat = rng.uniform(-45, 60, n_cities)
    city_lon = rng.uniform(-180, 180, n_cities)
    city = rng.integers(0, n_cities, n_landmarks)
    lats = np.clip(city_lat[city] + rng.normal(0, 0.03, n_landmarks), -89.9, 89.9)
    lons = (city_lon[city] + rng.normal(0, 0.04, n_landmarks) + 180) % 360 - 180
    return lats, lons


def _centroids_per_landmark(n_centroids: int) -> list[int]:
    """1, 2, 3, 4, 5, 1, 2, … centroids per landmark, the last cut short to make n_centroids in all
    (whole cycles at once: summing the list at each step was quadratic, an hour at a million)."""
    cycles, rest = divmod(n_centroids, 15)
    counts = [1, 2, 3, 4, 5] * cycles
    while rest > 0:
        counts.append(min(len(counts) % 5 + 1, rest))
        rest -= counts[-1]
    return counts


def synthetic_gallery(n_centroids: int, dim: int, anchors: np.ndarray, seed: int = 0) -> dict:
    """A checkpoint gallery of ~n_centroids random unit centroids (1–5 per landmark, 3 references each).
    Landmark k < len(anchors) is anchored on anchors[k] (centroid 0 and references), so the photos that
    produced those embeddings are recognised: the bench exercises the tag path, not only rejections."""
    import torch
    rng = np.random.default_rng(seed)
    counts = _centroids_per_landmark(n_centroids)
    n_landmarks = len(counts)
    lats, lons = synthetic_places(n_landmarks, rng)
    ids = np.repeat(np.arange(1, n_landmarks + 1), counts)
    nos = np.concatenate([np.arange(c) for c in counts])
    centroids = normalise(rng.standard_normal((len(ids), dim)).astype(np.float32))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    refs = normalise(np.repeat(centroids[first], 3, axis=0) + 0.3 * rng.standard_normal((3 * n_landmarks, dim)))
    for k, anchor in enumerate(anchors[:n_landmarks]):
        centroids[first[k]] = anchor
        refs[3 * k:3 * k + 3] = anchor
    landmarks = [{"id": int(i + 1), "slug": f"bench_{i + 1}", "name": f"Bench landmark {i + 1}",
                  "city": f"City {i // 100}", "country": "Benchland", "region": int(1 + i % 4),
                  "lat": float(lats[i]), "lon": float(lons[i])} for i in range(n_landmarks)]
    return {"landmarks": landmarks,
            "centroids": {"landmark_ids": torch.from_numpy(ids.astype(np.int64)),
                          "centroid_nos": torch.from_numpy(nos.astype(np.int32)),
                          "embeddings": torch.from_numpy(centroids)},
            "references": {"landmark_ids": torch.from_numpy(np.repeat(np.arange(1, n_landmarks + 1), 3)),
                           "embeddings": torch.from_numpy(refs)}}


@dataclass
class BenchModel:
    path: Path
    version: str
    meta: object
    image_embeddings: np.ndarray  # of the unique input images, in order
    landmark_of_image: dict[int, int]  # unique image index → its anchored landmark id
    places: dict[int, tuple[float, float]]
    gallery: dict


def make_bench_model(out: Path, cfg: BenchConfig, images: Sequence[Path], reporter: Reporter) -> BenchModel:
    """A random-init served model (BatchNorm statistics from the inputs, as `landmarks model init` does)
    with a synthetic gallery; one input image in 32 is a landmark's centroid and references."""
    import torch
    from shared.embedder import Embedder
    from shared.imaging import decode_image
    from shared.model import LandmarkNet, ModelMeta, save_checkpoint
    from shared.modelinit import calibrate_batchnorm

    version = f"bench_{uuid.uuid4().hex[:8]}"
    reporter.start(f"model: random-init {cfg.backbone} {cfg.input_size} px, dim {cfg.embedding_dim}")
    torch.manual_seed(cfg.seed)
    meta = ModelMeta(version=version, backbone=cfg.backbone, embedding_dim=cfg.embedding_dim,
                     input_size=cfg.input_size, t_geo=0.98, t_global=0.98, t_ref=0.98)
    net = LandmarkNet(cfg.backbone, cfg.embedding_dim, 0).eval()
    pixels = []
    for path in images[:16]:
        try:
            pixels.append(decode_image(path.read_bytes(), size=cfg.input_size, max_pixels=10**9).pixels)
        except DecodeError:
            continue
    if len(pixels) > 1:
        calibrate_batchnorm(net, np.stack(pixels), meta.mean, meta.std)
    save_checkpoint(out, net, meta)
    reporter.start("embedding the input images (gallery anchors, search queries)", len(images))
    embedder = Embedder(out, cfg.device)
    embeddings = []
    dim = cfg.embedding_dim
    for start in range(0, len(images), 16):
        chunk = []
        for path in images[start:start + 16]:
            try:
                chunk.append(decode_image(path.read_bytes(), size=cfg.input_size, max_pixels=10**9).pixels)
            except DecodeError:
                chunk.append(None)
        ok = [p for p in chunk if p is not None]
        got = iter(embedder.embed(np.stack(ok)) if ok else [])
        embeddings += [next(got) if p is not None else np.zeros(dim, np.float32) for p in chunk]
        reporter.advance(len(chunk))
    image_embeddings = np.stack(embeddings).astype(np.float32)
    anchored = [i for i in range(0, len(images), LANDMARK_IMAGE_EVERY) if image_embeddings[i].any()]
    gallery = synthetic_gallery(cfg.centroids, dim, image_embeddings[anchored], seed=cfg.seed)
    save_checkpoint(out, net, meta, gallery)
    places = {row["id"]: (row["lat"], row["lon"]) for row in gallery["landmarks"]}
    return BenchModel(out, version, meta, image_embeddings, {img: k + 1 for k, img in enumerate(anchored)},
                      places, gallery)


def event_gps(i: int, image: int, model: BenchModel, rng: np.random.Generator) -> tuple[float, float] | None:
    """Half the events carry GPS (the article: half of the photos have none): at their landmark for
    landmark photos, else ~100 m from a random landmark so the geo filter finds candidates."""
    if i % 2:
        return None
    landmark = model.landmark_of_image.get(image) or int(rng.integers(1, len(model.places) + 1))
    lat, lon = model.places[landmark]
    return (float(lat + rng.normal(0, 0.001)), float(lon + rng.normal(0, 0.001)))
