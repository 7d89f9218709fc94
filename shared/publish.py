"""Publish a model version: centroids and references into new Milvus collections, landmarks and the version
row into PostgreSQL, then one alias swap. Workers pick it up at their next batch. Published as a
shadow, the version runs beside the active one on a sample of photos instead (shared/rollout.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from shared import rollout
from shared.db.models import ModelVersion
from shared.db.session import transaction
from shared.db.writer import register_model_version, upsert_landmarks
from shared.index import CentroidRows, IndexVersionError, LandmarkIndex, ReferenceRows
from shared.model import CheckpointError, ModelMeta, load_checkpoint

log = logging.getLogger(__name__)

THRESHOLDS = ("t_geo", "t_global", "t_ref")
LANDMARK_COLUMNS = ("id", "name", "city", "country", "region", "lat", "lon")
SHOWN_CHANGES = 10  # catalogue changes listed in the log line and the result; the count says how many in all


def gallery_rows(gallery: dict) -> tuple[CentroidRows, ReferenceRows]:
    places = {row["id"]: (row["lat"], row["lon"]) for row in gallery["landmarks"]}
    c, r = gallery["centroids"], gallery["references"]
    ids = c["landmark_ids"].numpy()
    centroids = CentroidRows(landmark_ids=ids, centroid_nos=c["centroid_nos"].numpy(),
                             lats=[places[i][0] for i in ids], lons=[places[i][1] for i in ids],
                             embeddings=c["embeddings"].numpy())
    ref_ids = r["landmark_ids"].numpy()
    references = ReferenceRows(landmark_ids=ref_ids, ref_nos=occurrence_numbers(ref_ids),
                               embeddings=r["embeddings"].numpy())
    return centroids, references


def occurrence_numbers(ids: np.ndarray) -> np.ndarray:
    """For each element, how many equal ids come before it: a landmark's references are numbered 0, 1, 2…
    in gallery order, wherever they lie. One stable sort; counting the earlier equal ids element by element
    took hours at a million references."""
    ids = np.asarray(ids)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    run_starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    run_lengths = np.diff(np.r_[run_starts, len(ids)])
    numbers = np.empty(len(ids), dtype=np.int64)
    numbers[order] = np.arange(len(ids)) - np.repeat(run_starts, run_lengths)
    return numbers


def model_metrics(meta: ModelMeta) -> dict:
    """The figures recorded with the version: the build's (validation split at the calibrated thresholds);
    for a model built before it stored them, the calibration in its build report. Non-finite numbers
    become None: PostgreSQL's JSON has no infinities or NaN."""
    metrics = meta.extra.get("metrics")
    if metrics is None:
        calibration = meta.extra.get("build", {}).get("calibration")
        metrics = {"calibration": calibration} if calibration else {}
    return _finite(metrics)


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def publish_model(model_path: Path, engine: Engine, index: LandmarkIndex, *, activate: bool | None = True,
                  require_coverage: bool = False) -> ModelMeta:
    """Collections and version row; then, with ``activate``, the alias swap and the albums' version (None:
    only for a version published for the first time or already active; ``extra["activated"]`` says whether
    it was activated). With ``require_coverage`` the activation is refused (RolloutError, the version stays
    published) while photos in the albums have not been through it, as `landmarks promote` refuses it. The
    landmarks this changes for every user (name, city or country of an id already in the catalogue) are logged
    as a warning and returned in the meta's ``extra["catalogue_changes"]``: ``{"count": n, "changes": ["id: old
    → new", ...]}``."""
    _, meta, gallery = load_checkpoint(model_path)
    if not gallery.get("landmarks"):
        raise CheckpointError(f"{model_path} has no gallery (centroids and references): build it first")
    require_same_registration(meta, engine)
    # Milvus first: it refuses another gallery under a published version (IndexVersionError) before PostgreSQL
    # is pointed at this checkpoint, and re-running after a failure finds the version there and moves on.
    index.publish(meta.version, *gallery_rows(gallery))
    landmarks = [{k: row[k] for k in LANDMARK_COLUMNS} for row in gallery["landmarks"]]
    with transaction(engine) as session:
        registered = session.get(ModelVersion, meta.version)
        # Not activated again by default: publishing an older model again must not roll the fleet back.
        activate = (registered is None or registered.is_active) if activate is None else activate
        changes = catalogue_changes(session, landmarks)
        # The version row before the landmarks: a moved landmark's trigger locks photos and photo_tags, which a
        # worker writing under this version holds while it waits for the row (writer.write_live_outcomes).
        register_model_version(session, meta.version, backbone=meta.backbone, embedding_dim=meta.embedding_dim,
                               t_geo=meta.t_geo, t_global=meta.t_global, t_ref=meta.t_ref,
                               checkpoint=str(model_path.resolve()), metrics=model_metrics(meta),
                               activate=False)
        upsert_landmarks(session, landmarks)
    if changes:
        log.warning("publishing %s renamed or moved %d landmark(s) in every user's albums (all versions): %s",
                    meta.version, len(changes), "; ".join(changes[:SHOWN_CHANGES]))
    meta.extra["catalogue_changes"] = {"count": len(changes), "changes": changes[:SHOWN_CHANGES]}
    meta.extra["activated"] = activate
    if activate:  # as `landmarks promote` does it: alias then row, one activation at a time, recorded
        activation = rollout.activate(meta.version, engine, index, action="activate",
                                      require_coverage=require_coverage)
        meta.extra.update(uncovered=activation.uncovered, backfill=activation.backfill)
    log.info("published model %s (%d landmarks)", meta.version, len(gallery["landmarks"]))
    return meta


def catalogue_changes(session: Session, landmarks: list[dict]) -> list[str]:
    """`id: old → new` for each landmark id already in the catalogue whose name, city or country ``landmarks``
    change. Ids are shared by all versions, so the change shows in every user's albums at once."""
    new = {row["id"]: row for row in landmarks}
    stored = session.execute(text("SELECT id, name, city, country FROM landmarks "
                                  "WHERE id = ANY(CAST(:ids AS bigint[])) ORDER BY id"), {"ids": list(new)}).all()
    changes = []
    for lid, *old in stored:
        now = [new[lid][key] for key in ("name", "city", "country")]
        if old != now:
            changes.append(f"{lid}: {_place(*old)} → {_place(*now)}")
    return changes


def _place(name: str, city: str, country: str) -> str:
    return f"{name} ({city}, {country})"


def require_same_registration(meta: ModelMeta, engine: Engine) -> None:
    """IndexVersionError if ``meta.version`` is registered with other thresholds, backbone or embedding
    dimension: workers read them once, when they load the version, so changing them under the same name would
    split the fleet between the old and the new ones (and the tags written under that version with them)."""
    with transaction(engine) as session:
        row = session.get(ModelVersion, meta.version)
        if row is None:
            return
        registered = {"backbone": row.backbone, "embedding_dim": row.embedding_dim,
                      **{t: np.float32(getattr(row, t)) for t in THRESHOLDS}}
    # Thresholds compared as the REAL (float4) PostgreSQL keeps them.
    built = {"backbone": meta.backbone, "embedding_dim": meta.embedding_dim,
             **{t: np.float32(getattr(meta, t)) for t in THRESHOLDS}}
    changed = [f"{key} {registered[key]!s} -> {built[key]!s}" for key in registered if registered[key] != built[key]]
    if changed:
        raise IndexVersionError(
            f"model version {meta.version!r} is already registered with other settings ({', '.join(changed)}); "
            "a version is never changed: build the model under a new version (`landmarks build --version NEW`) "
            "and publish that")


def publish_shadow(model_path: Path, share: float, engine: Engine,
                   index: LandmarkIndex) -> tuple[ModelMeta, dict | None]:
    """Publish MODEL without activating it and make it the shadow on ``share`` of the photos; share 0
    ends its shadow instead. Returns the model's metadata and the shadow started or ended (None if none)."""
    meta = publish_model(model_path, engine, index, activate=False)
    if share == 0:
        return meta, rollout.stop_shadow(engine, version=meta.version)
    return meta, rollout.start_shadow(meta.version, share, engine, index)
