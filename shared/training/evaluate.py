"""`landmarks eval`: the article's offline test through the workers' own recognition code: hard
landmark photos against many more hard non-landmark photos, with and without GPS, frequent vs rare,
plus the closed-set accuracy and a pixel baseline that shows the world is not trivially easy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.embedder import Embedder
from shared.events import GeoPoint
from shared.model import load_checkpoint
from shared.recognition import Thresholds, recognise_batch
from shared.training.build import load_images
from shared.training.dataset import frequent_landmarks, is_frequent, load_dataset

log = logging.getLogger(__name__)
PIXEL_BASELINE_SIZE = 16


@dataclass
class TestPhotos:
    embeddings: np.ndarray
    gps: list[GeoPoint | None]
    truth: list[int | None]
    frequent: list[bool]


def embed_split(records, embedder: Embedder, progress=None,
                frequent_ids: frozenset[int] | set[int] = frozenset()) -> TestPhotos:
    """Decode as the workers do (same size, EXIF GPS), embed with the model's own Embedder. A landmark
    photo is frequent by its `frequent` column, else when its landmark is in `frequent_ids`."""
    size = embedder.meta.input_size
    images = load_images([r.path for r in records], size, progress)
    kept = [r for r, ok in zip(records, images.ok) if ok]
    chunks = [embedder.embed(images.pixels[i:i + 256]) for i in range(0, len(images.pixels), 256)]
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, embedder.meta.embedding_dim), np.float32)
    frequent = [is_frequent(r, frequent_ids) for r in kept]
    return TestPhotos(embeddings, images.gps, [r.landmark_id for r in kept], frequent)


def _rate(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def decide(photos: TestPhotos, index, version: str, thresholds: Thresholds, global_k: int = 10) -> list[list[int]]:
    """Each photo's tags (landmark ids, best first; [] = non-landmark), as the workers tag it."""
    answers: list[list[int]] = []
    for start in range(0, len(photos.embeddings), 256):
        tags = recognise_batch(photos.embeddings[start:start + 256], photos.gps[start:start + 256], index,
                               version, thresholds, global_k=global_k)
        answers += [[t.landmark_id for t in photo_tags] for photo_tags in tags]
    return answers


def closed_set(photos: TestPhotos, index, version: str) -> float | None:
    rows = [i for i, t in enumerate(photos.truth) if t is not None]
    if not rows:
        return None
    hits = index.search_global(version, photos.embeddings[rows], 1)
    return float(np.mean([h[0].landmark_id == photos.truth[i] for h, i in zip(hits, rows)]))


def accuracy_metrics(photos: TestPhotos, answers: list[list[int]]) -> dict:
    """A landmark photo is right only when its tags are exactly its landmark: every tag puts it in an
    album, so a second one is a wrong album the user sees. landmark_top1_accuracy counts the best tag
    alone. A non-landmark photo is right when it has no tag."""
    exact = [set(a) == {t} for a, t in zip(answers, photos.truth)]
    landmark = [(ok, g is not None, f) for ok, t, g, f in zip(exact, photos.truth, photos.gps, photos.frequent) if t is not None]
    other = [(not a, g is not None) for a, t, g in zip(answers, photos.truth, photos.gps) if t is None]
    several = [len(a) > 1 for a, t in zip(answers, photos.truth) if t is not None]
    return {
        "landmark_accuracy": _rate([ok for ok, _, _ in landmark]),
        "landmark_top1_accuracy": _rate([bool(a) and a[0] == t for a, t in zip(answers, photos.truth) if t is not None]),
        "landmark_several_tags_rate": _rate(several),
        "non_landmark_accuracy": _rate([ok for ok, _ in other]),
        "frequent_accuracy": _rate([ok for ok, _, f in landmark if f]),
        "rare_accuracy": _rate([ok for ok, _, f in landmark if not f]),
        "gps_landmark_accuracy": _rate([ok for ok, g, _ in landmark if g]),
        "no_gps_landmark_accuracy": _rate([ok for ok, g, _ in landmark if not g]),
        "gps_non_landmark_accuracy": _rate([ok for ok, g in other if g]),
        "no_gps_non_landmark_accuracy": _rate([ok for ok, g in other if not g]),
        "n_landmark_photos": len(landmark),
        "n_non_landmark_photos": len(other),
    }


def pixel_baseline(dataset) -> float | None:
    """Closed-set accuracy of the nearest reference photo by 16x16 RGB pixels."""
    refs = load_images([r.path for r in dataset.references], PIXEL_BASELINE_SIZE)
    ref_ids = np.array([r.landmark_id for r, ok in zip(dataset.references, refs.ok) if ok])
    tests = [r for r in dataset.test if r.landmark_id is not None]
    images = load_images([r.path for r in tests], PIXEL_BASELINE_SIZE)
    truth = np.array([r.landmark_id for r, ok in zip(tests, images.ok) if ok])
    if len(truth) == 0:
        return None
    a = refs.pixels.reshape(len(refs.pixels), -1).astype(np.float32)
    b = images.pixels.reshape(len(images.pixels), -1).astype(np.float32)
    distances = (b ** 2).sum(1)[:, None] - 2 * b @ a.T + (a ** 2).sum(1)[None, :]
    return float(np.mean(ref_ids[distances.argmin(axis=1)] == truth))


def evaluate(world: Path, model: Path, index, *, progress=None) -> dict:
    """`index` is a LandmarkIndex (Milvus, the workers' path) or a LocalIndex holding the model's version."""
    dataset = load_dataset(world)
    _, meta, _ = load_checkpoint(model)
    embedder = Embedder(model, "cpu")  # at LANDMARKS_PRECISION, as the workers run it
    photos = embed_split(dataset.test, embedder, progress, frequent_landmarks(dataset))
    thresholds = Thresholds(meta.t_geo, meta.t_global, meta.t_ref)
    answers = decide(photos, index, meta.version, thresholds)
    metrics = accuracy_metrics(photos, answers)
    metrics["closed_set_accuracy"] = closed_set(photos, index, meta.version)
    metrics["pixel_baseline_closed_set_accuracy"] = pixel_baseline(dataset)
    metrics["model_version"] = meta.version
    metrics["precision"] = "bf16" if embedder.bf16 else "fp32"  # the forward's, as the workers serve it here
    metrics["thresholds"] = {"t_geo": meta.t_geo, "t_global": meta.t_global, "t_ref": meta.t_ref}
    return metrics


# --- ablations that need no retraining: re-decided on the same embeddings, thresholds re-calibrated
# on the validation split so every variant is held to the same 99 % non-landmark target -----------

def recalibrate(index, version: str, val: TestPhotos, *, verify: bool, target: float = 0.99) -> Thresholds:
    from shared.training import calibrate as cal
    candidates = cal.global_candidates(index, version, val.embeddings, 10)
    if not verify:
        candidates.ref_sims = [{lid: np.inf for lid in s} for s in candidates.scores]
    t_global, t_ref, _ = cal.calibrate_no_gps(candidates, val.truth, target)
    with_gps = [i for i, g in enumerate(val.gps) if g is not None]
    best = cal.geo_scores(index, version, val.embeddings[with_gps], [val.gps[i] for i in with_gps]) if with_gps else []
    t_geo, _ = cal.calibrate_geo(best, [val.truth[i] for i in with_gps], target,
                                 cal.best_global_scores(candidates, val.truth))
    return Thresholds(t_geo, t_global, t_ref if verify else -np.inf)


def one_centroid_index(gallery: dict, version: str):
    """The same landmarks with a single centroid each: the mean of all their centroids' photos."""
    from shared.index import CentroidRows
    from shared.local_index import LocalIndex
    from shared.publish import gallery_rows
    centroids, references = gallery_rows(gallery)
    one = gallery.get("one_centroid")
    if one is None:
        raise ValueError("this model's gallery has no one-centroid variant (built before it existed)")
    ids = one["landmark_ids"].numpy()
    place = {int(i): (a, o) for i, a, o in zip(centroids.landmark_ids, centroids.lats, centroids.lons)}
    rows = CentroidRows(ids, np.zeros(len(ids), np.int64), np.array([place[int(i)][0] for i in ids]),
                        np.array([place[int(i)][1] for i in ids]), one["embeddings"].numpy())
    return LocalIndex(version, rows, references)


def decision_ablations(world: Path, model: Path, progress=None) -> dict[str, dict]:
    from shared.local_index import LocalIndex
    from shared.publish import gallery_rows
    dataset = load_dataset(world)
    _, meta, gallery = load_checkpoint(model)
    embedder = Embedder(model, "cpu")
    frequent = frequent_landmarks(dataset)
    test = embed_split(dataset.test, embedder, progress, frequent)
    val = embed_split(dataset.val, embedder, progress, frequent)
    several = LocalIndex(meta.version, *gallery_rows(gallery))
    # Held to the build's own calibration target, so a variant differs only in what it ablates.
    target = float(meta.extra.get("build", {}).get("config", {}).get("target_accuracy", 0.99))
    variants = {"without reference verification": (several, False)}
    if "one_centroid" in gallery:
        variants["one centroid per landmark"] = (one_centroid_index(gallery, meta.version), True)
    out = {}
    for name, (index, verify) in variants.items():
        thresholds = recalibrate(index, meta.version, val, verify=verify, target=target)
        out[name] = {**accuracy_metrics(test, decide(test, index, meta.version, thresholds)),
                     "closed_set_accuracy": closed_set(test, index, meta.version)}
    return out
