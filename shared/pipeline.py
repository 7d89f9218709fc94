"""The recognition pipeline for a batch of upload events: fetch → decode → embed → search → decide →
one transaction. Workers, tests, backfills and benchmarks all call it; it knows nothing of Celery."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine

from shared.db.models import ModelVersion
from shared.db.session import transaction
from shared.db.writer import write_outcomes
from shared.embedder import Embedder
from shared.errors import InfrastructureError, PhotoError
from shared.events import GeoPoint, PhotoUploaded
from shared.fetch import fetch_bytes
from shared.imaging import DecodedImage, decode_image
from shared.index import LandmarkIndex
from shared.outcomes import Failure, GpsSource, PhotoOutcome, PhotoStatus
from shared.recognition import Thresholds, recognise_batch
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class ModelRuntime:
    version: str
    embedder: Embedder
    thresholds: Thresholds


@dataclass
class BatchReport:
    outcomes: list[PhotoOutcome]
    model_version: str
    applied: int
    timings_ms: dict[str, float] = field(default_factory=dict)


def photo_gps(decoded: DecodedImage, event: PhotoUploaded) -> tuple[GeoPoint | None, GpsSource | None]:
    """EXIF GPS first (it travels with the pixels), then the event's; 0/0 is 'no fix'."""
    if decoded.gps is not None and not decoded.gps.is_null_island:
        return decoded.gps, GpsSource.EXIF
    if event.gps is not None and not event.gps.is_null_island:
        return event.gps, GpsSource.EVENT
    return None, None


class RecognitionPipeline:
    def __init__(self, settings: Settings, engine: Engine, index: LandmarkIndex) -> None:
        self.settings = settings
        self.engine = engine
        self.index = index
        self._runtime: ModelRuntime | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1),
                                        thread_name_prefix="decode")

    @property
    def loaded_version(self) -> str | None:
        """The model version in memory (None before the first load): readiness and metrics read it."""
        runtime = self._runtime
        return runtime.version if runtime is not None else None

    def runtime(self) -> ModelRuntime:
        """The active model version, read once per batch so that no batch mixes two versions."""
        version = self.index.active_version()
        if version is None:
            raise InfrastructureError("no active model version: run `landmarks publish MODEL` first")
        if self._runtime is None or self._runtime.version != version:
            self._runtime = self._load_runtime(version)
        return self._runtime

    def _load_runtime(self, version: str) -> ModelRuntime:
        with transaction(self.engine) as session:
            row = session.get(ModelVersion, version)
            if row is None:
                raise InfrastructureError(f"model version {version!r} is active in Milvus but not in PostgreSQL")
            checkpoint, thresholds = row.checkpoint, Thresholds(row.t_geo, row.t_global, row.t_ref)
        path = self.settings.model_path or Path(checkpoint)
        embedder = Embedder(path, self.settings.device)
        try:
            embedder.load()
        except (OSError, ValueError, RuntimeError) as exc:
            # A missing or unreadable model file is an outage of this worker, not of the batch's photos:
            # retried, then handed back, never acknowledged as done.
            raise InfrastructureError(f"cannot load model {version} from {path}: {exc}") from exc
        if embedder.meta.version != version:
            raise InfrastructureError(f"model file {path} holds version {embedder.meta.version!r}, "
                                      f"but {version!r} is active")
        return ModelRuntime(version, embedder, thresholds)

    def _load_one(self, event: PhotoUploaded, size: int) -> DecodedImage:
        uri = event.preview_uri or event.uri
        data = fetch_bytes(uri, self.settings)
        return decode_image(data, size=size, max_pixels=self.settings.max_image_pixels)

    def _load_all(self, events: list[PhotoUploaded], size: int) -> list[DecodedImage | Failure]:
        def load(event: PhotoUploaded) -> DecodedImage | Failure:
            try:
                return self._load_one(event, size)
            except PhotoError as exc:
                return Failure(exc.stage, exc.reason)
        return list(self._pool.map(load, events))

    def process(self, events: list[PhotoUploaded]) -> BatchReport:
        clock = _Clock()
        runtime = self.runtime()
        loaded = self._load_all(events, runtime.embedder.meta.input_size)
        clock.lap("fetch_decode")
        ok = [i for i, item in enumerate(loaded) if isinstance(item, DecodedImage)]
        outcomes = [_failed(event, item) if isinstance(item, Failure) else None
                    for event, item in zip(events, loaded)]
        if ok:
            pixels = np.stack([loaded[i].pixels for i in ok])
            embeddings = runtime.embedder.embed(pixels)
            clock.lap("embed")
            gps = [photo_gps(loaded[i], events[i]) for i in ok]
            tags = recognise_batch(embeddings, [point for point, _ in gps], self.index,
                                   runtime.version, runtime.thresholds,
                                   global_k=self.settings.global_top_k, geo_limit=self.settings.geo_top_k)
            clock.lap("search")
            for i, photo_tags, (point, source) in zip(ok, tags, gps):
                status = PhotoStatus.TAGGED if photo_tags else PhotoStatus.NO_LANDMARK
                outcomes[i] = PhotoOutcome(events[i], status, photo_tags, gps=point, gps_source=source)
        with transaction(self.engine) as session:
            applied = write_outcomes(session, runtime.version, outcomes)
        clock.lap("write")
        report = BatchReport(outcomes, runtime.version, applied, clock.laps)
        tagged = sum(o.status == PhotoStatus.TAGGED for o in outcomes)
        failed = sum(o.status == PhotoStatus.FAILED for o in outcomes)
        timings = {k: round(v, 1) for k, v in clock.laps.items()}
        log.info("batch of %d: %d tagged, %d failed, %d applied, model %s, ms %s", len(events), tagged, failed,
                 applied, runtime.version, timings,
                 extra={"model_version": runtime.version, "batch_size": len(events), "tagged": tagged,
                        "failed": failed, "applied": applied, "timings_ms": timings})
        _log_photos(outcomes, runtime.version)
        return report

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _log_photos(outcomes: list[PhotoOutcome], version: str) -> None:
    """One line per failed photo (INFO) and per tagged photo (DEBUG), with its ids for log search."""
    for o in outcomes:
        ids = {"event_id": o.event.event_id, "photo_id": o.event.photo_id, "model_version": version}
        if o.status == PhotoStatus.FAILED and o.failure is not None:
            log.info("photo failed at %s: %s", o.failure.stage, o.failure.reason,
                     extra={**ids, "stage": str(o.failure.stage)})
        elif o.status == PhotoStatus.TAGGED and log.isEnabledFor(logging.DEBUG):
            log.debug("photo tagged: %s", [t.landmark_id for t in o.tags],
                      extra={**ids, "landmarks": [t.landmark_id for t in o.tags]})


def _failed(event: PhotoUploaded, failure: Failure) -> PhotoOutcome:
    return PhotoOutcome(event, PhotoStatus.FAILED, failure=failure, gps=event.gps,
                        gps_source=GpsSource.EVENT if event.gps else None)


class _Clock:
    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = (now - self._last) * 1000
        self._last = now
