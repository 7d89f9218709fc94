"""The recognition pipeline for a batch of upload events: fetch → decode → embed → search → decide →
one transaction. Workers, tests, backfills and benchmarks all call it; it knows nothing of Celery.

While a shadow version runs (shared/shadow.py), a sample of each batch's decoded photos also goes
through the candidate, after the live batch has committed.

A worker calls `process` from several threads at once (LANDMARKS_BATCHES_IN_FLIGHT): the decode pool
(shared/loading.py) is shared, and the batches take turns at the model (`forward_turns`: one at a time on a
GPU; on a CPU as many as the cores hold at the model's torch threads each, every core for a heavy model:
ForwardTurns.threads_for), so batch i+1 decodes while batch i is embedded, searched and written. On
CUDA, with a device JPEG decoder, the batch's JPEGs are decoded on the GPU (shared/device_decode.py), each
batch thread on its own CUDA stream."""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass, field, replace
from typing import NoReturn

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from shared import metrics
from shared.db.session import transaction
from shared.db.writer import write_live_outcomes
from shared.errors import InfrastructureError
from shared.events import GeoPoint, PhotoUploaded
from shared.health import unserved_active_version
from shared.device_decode import DecodeSplit, DeviceJpegDecoder, load_split, stack_pixels, thread_stream
from shared.imaging import DecodedImage
from shared.index import LandmarkIndex
from shared.loading import LoadRequest, PhotoLoader
from shared.outcomes import Failure, GpsSource, PhotoOutcome, PhotoStatus
from shared.recognition import recognise_batch
from shared.runtime import ForwardTurns, ModelRuntime, StageClock, load_model_runtime, local_replica
from shared.settings import Settings
from shared.shadow import ShadowPlan, ShadowReport, ShadowRunner

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    outcomes: list[PhotoOutcome]
    model_version: str
    applied: int
    timings_ms: dict[str, float] = field(default_factory=dict)  # the live path's stages only
    shadow: ShadowReport | None = None
    decoded_on_device: int = 0  # photos decoded by the device JPEG decoder
    # Events whose fetch failed transiently and may be tried again: nothing was written for them.
    try_later: list[PhotoUploaded] = field(default_factory=list)

    @property
    def decoded(self) -> int:
        """Photos decoded: every photo that did not fail reached the model (failures come from loading)."""
        return sum(o.status != PhotoStatus.FAILED for o in self.outcomes)


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
        self.load_error: str | None = None  # why the active version could not be loaded, until it is
        self._runtime_lock = threading.Lock()
        self.forward_turns = ForwardTurns(settings.torch_threads)
        self.loader = PhotoLoader(settings)
        # JPEGs decoded on the GPU when a decoder loads there (found with the first model version), a share
        # of each batch's photos while the pool decodes the others.
        self.device_decoder: DeviceJpegDecoder | None = None
        self.decode_split = DecodeSplit(settings.device_decode_share)
        self.shadow = ShadowRunner(settings, engine, index, forward_turns=self.forward_turns)

    @property
    def loaded_version(self) -> str | None:
        """The model version in memory (None before the first load): readiness and metrics read it."""
        runtime = self._runtime
        return runtime.version if runtime is not None else None

    def runtime(self) -> ModelRuntime:
        """The active model version, read once per batch so that no batch mixes two versions."""
        version = self.index.active_version()
        with self._runtime_lock:  # the first batch after the alias moved loads it; the others wait for it
            if version is None:
                self._cannot_load(self._why_no_active_version())
            if self._runtime is None or self._runtime.version != version:
                try:
                    self._runtime = self._load_runtime(version)
                except InfrastructureError as exc:  # readiness says why, not only "no model loaded"
                    self._cannot_load(f"cannot load the active model {version}: {exc}", exc)
            if self.load_error is not None:  # cleared once, not on every batch (metrics takes a lock)
                self._set_load_error(None)
            return self._runtime

    def _cannot_load(self, error: str, cause: Exception | None = None) -> NoReturn:
        """Not ready, and counted as holding no model, until a version loads: a version loaded before serves no
        batch now (the batch is handed back), and an idle fleet in this state must trip LandmarksNoWorkers."""
        self._set_load_error(error)
        raise InfrastructureError(error) from cause

    def _set_load_error(self, error: str | None) -> None:
        self.load_error = error
        metrics.set_model_error(error)

    def _why_no_active_version(self) -> str:
        """No alias in Milvus: before the first publish, or Milvus lost its data (PostgreSQL still names one)."""
        try:
            lost = unserved_active_version(self.engine, self.index)
        except (SQLAlchemyError, InfrastructureError) as exc:  # the batch fails anyway; say what is known
            log.warning("no active version in Milvus, and PostgreSQL cannot say which should be: %s", exc)
            lost = None
        return lost or "no active model version: run `landmarks publish MODEL` first"

    def _load_runtime(self, version: str) -> ModelRuntime:
        gc.unfreeze()  # the runtime being replaced, if any, becomes collectable again
        runtime = load_model_runtime(self.engine, version, self.settings.device, self.settings.model_path,
                                     role="active", batch_size=self.settings.batch_size,
                                     compile_model=self.settings.torch_compile, precision=self.settings.precision)
        # Milvus answers whether the alias moved (once per batch); the searching is done in process.
        runtime.replica = local_replica(version, runtime.embedder.gallery, self.index,
                                        self.settings.search_replica_max_centroids, str(runtime.embedder.device),
                                        path=runtime.embedder.checkpoint)
        runtime.embedder.gallery = {}  # the replica holds what is needed of it
        if self.device_decoder is None and self.settings.device_decode == "auto":
            self.device_decoder = DeviceJpegDecoder.detect(str(runtime.embedder.device))
        # What lives as long as this version (torch, the model, the replica: hundreds of thousands of objects)
        # leaves the cyclic collector's view: each full collection had walked them all, pausing the batches.
        gc.collect()
        gc.freeze()
        return runtime

    def _load_all(self, events: list[PhotoUploaded], size: int, shadow_size: int | None = None,
                  sampled: frozenset[int] = frozenset(), may_retry: frozenset[str] = frozenset()
                  ) -> tuple[list[DecodedImage | Failure], dict[int, np.ndarray], int]:
        """Decoded images (or failures) at ``size``; for the ``sampled`` positions also the pixels at
        ``shadow_size`` (when the shadow model's input size differs), from the same fetch; and how many
        were decoded on the device. With a device decoder, a share of the others goes to the device while
        the pool decodes the rest (shared/device_decode.load_split)."""
        requests = [LoadRequest(event.preview_uri or event.uri, size, shadow_size if i in sampled else None,
                                event_id=event.event_id, photo_id=event.photo_id)
                    for i, event in enumerate(events)]
        decoder = self.device_decoder
        if decoder is None:
            results, on_device = self.loader.load(requests), 0
        else:
            eligible = [i for i in range(len(requests)) if i not in sampled]  # the shadow decodes on the CPU
            results, on_device = load_split(self.loader, decoder, self.decode_split, requests, eligible)
        self._original_where_the_preview_failed(events, requests, results, may_retry)
        extra = {i: r.extra_pixels for i, r in enumerate(results) if r.extra_pixels is not None}
        return [r.image for r in results], extra, on_device

    def _original_where_the_preview_failed(self, events: list[PhotoUploaded], requests: list[LoadRequest],
                                           results: list, may_retry: frozenset[str]) -> None:
        """A preview that cannot be used (not made yet, unreadable) is no reason to fail the photo: its original
        is loaded in its place, and only the original's failure is the photo's. A preview whose storage does not
        answer for the moment is tried again later, while the event may be (``may_retry``): fetching every
        original too would double a batch's time while the storage is down (the pod's grace period counts on
        one fetch per photo except on this last attempt); on the last attempt the original is fetched, rather
        than fail the photo."""
        again = [i for i, (event, result) in enumerate(zip(events, results))
                 if event.preview_uri and isinstance(result.image, Failure)
                 and not (result.image.transient and event.event_id in may_retry)]
        if not again:
            return
        log.info("%d previews could not be used (%s, ...): loading the originals", len(again),
                 results[again[0]].image.reason)
        originals = self.loader.load([replace(requests[i], uri=events[i].uri) for i in again])
        for i, result in zip(again, originals):
            results[i] = result

    def process(self, events: list[PhotoUploaded], may_retry: frozenset[str] = frozenset()) -> BatchReport:
        """Tags, writes and reports the batch. An event in ``may_retry`` (event ids) whose fetch failed
        transiently is left out, unwritten, in the report's try_later; any other failure is recorded."""
        runtime = self.runtime()
        with thread_stream(runtime.embedder.device):  # on CUDA, this batch's decode overlaps another's forward
            return self._process(events, runtime, may_retry)

    def _process(self, events: list[PhotoUploaded], runtime: ModelRuntime, may_retry: frozenset[str]) -> BatchReport:
        clock = StageClock()
        shadow = self.shadow.for_batch(runtime)
        sampled = shadow.sample(events) if shadow is not None else frozenset()
        loaded, shadow_pixels, on_device = self._load_all(events, runtime.embedder.meta.input_size,
                                                          shadow.decode_size if shadow is not None else None,
                                                          sampled, may_retry)
        clock.lap("fetch_decode")
        later = _to_try_later(events, loaded, may_retry)
        ok = [i for i, item in enumerate(loaded) if isinstance(item, DecodedImage)]
        outcomes = [_failed(event, item) if isinstance(item, Failure) and i not in later else None
                    for i, (event, item) in enumerate(zip(events, loaded))]
        if ok:
            pixels = stack_pixels([loaded[i].pixels for i in ok], runtime.embedder.device)
            with self.forward_turns.model_turn(runtime.embedder):
                clock.lap("wait_model")
                embeddings = runtime.embedder.embed(pixels)
            clock.lap("embed")
            if self.device_decoder is not None:
                self.device_decoder.inputs_read()  # the embeddings are on the host: the stream got that far
            gps = [photo_gps(loaded[i], events[i]) for i in ok]
            tags = recognise_batch(embeddings, [point for point, _ in gps], runtime.replica or self.index,
                                   runtime.version, runtime.thresholds,
                                   global_k=self.settings.global_top_k, geo_limit=self.settings.geo_top_k)
            clock.lap("search")
            for i, photo_tags, (point, source) in zip(ok, tags, gps):
                status = PhotoStatus.TAGGED if photo_tags else PhotoStatus.NO_LANDMARK
                outcomes[i] = PhotoOutcome(events[i], status, photo_tags, gps=point, gps_source=source)
        settled = [o for o in outcomes if o is not None]  # outcomes stays by position for the shadow pass
        with transaction(self.engine) as session:
            applied = write_live_outcomes(session, runtime.version, settled)
        clock.lap("write")
        report = BatchReport(settled, runtime.version, applied, clock.laps, decoded_on_device=on_device,
                             try_later=[events[i] for i in sorted(later)])
        tagged = sum(o.status == PhotoStatus.TAGGED for o in settled)
        failed = sum(o.status == PhotoStatus.FAILED for o in settled)
        timings = {k: round(v, 1) for k, v in clock.laps.items()}
        cpu = {k: round(v, 1) for k, v in clock.cpu_laps.items()}
        on_device_note = f", {on_device} decoded on the device" if self.device_decoder is not None else ""
        log.info("batch of %d: %d tagged, %d failed, %d to try later, %d applied%s, model %s, ms %s, cpu ms %s",
                 len(events), tagged, failed, len(later), applied, on_device_note, runtime.version, timings, cpu,
                 extra={"model_version": runtime.version, "batch_size": len(events), "tagged": tagged,
                        "failed": failed, "try_later": len(later), "applied": applied,
                        "decoded_on_device": on_device, "timings_ms": timings, "cpu_ms": cpu})
        _log_photos(settled, runtime.version)
        if shadow is not None:
            report.shadow = self._shadow_pass(shadow, sampled, outcomes, loaded, shadow_pixels)
        return report

    def _shadow_pass(self, shadow: ShadowPlan, sampled: frozenset[int], outcomes: list[PhotoOutcome],
                     loaded: list[DecodedImage | Failure], shadow_pixels: dict[int, np.ndarray]) -> ShadowReport:
        """The sampled photos that decoded, with the live path's GPS, through the shadow version."""
        ready = [i for i in sorted(sampled) if isinstance(loaded[i], DecodedImage)]
        images = [shadow_pixels.get(i) if shadow.decode_size else loaded[i].pixels for i in ready]
        return self.shadow.run(shadow, [outcomes[i].event for i in ready], images, [outcomes[i].gps for i in ready])

    def close(self) -> None:
        self.loader.close()


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


def _to_try_later(events: list[PhotoUploaded], loaded: list[DecodedImage | Failure],
                  may_retry: frozenset[str]) -> set[int]:
    """The positions of transient fetch failures of events that may be tried again: recorded as failed, a
    photo would wait for an operator's backfill after every storage hiccup."""
    later = {i for i, (event, item) in enumerate(zip(events, loaded))
             if isinstance(item, Failure) and item.transient and event.event_id in may_retry}
    for i in sorted(later):
        log.info("fetch failed, will try again: %s", loaded[i].reason,
                 extra={"event_id": events[i].event_id, "photo_id": events[i].photo_id})
    return later


def _failed(event: PhotoUploaded, failure: Failure) -> PhotoOutcome:
    return PhotoOutcome(event, PhotoStatus.FAILED, failure=failure, gps=event.gps,
                        gps_source=GpsSource.EVENT if event.gps else None)
