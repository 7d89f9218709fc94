"""The shadow rollout (`landmarks publish MODEL --shadow`): a candidate version beside the active one.

A deterministic sample of each batch's decoded photos is also embedded with the candidate's model and
tagged under its version, after the live batch has committed; a shadow failure costs a log line and a
metric, never the live batch."""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from shared.db.session import transaction
from shared.db.writer import running_shadow, write_shadow_outcomes
from shared.errors import InfrastructureError
from shared.events import GeoPoint, PhotoUploaded
from shared.index import LandmarkIndex
from shared.outcomes import PhotoOutcome, PhotoStatus
from shared.recognition import recognise_batch
from shared.runtime import ForwardTurns, ModelRuntime, StageClock, load_model_runtime, published_gallery
from shared.settings import Settings

log = logging.getLogger(__name__)

SHADOW_REFRESH_S = 5.0  # how stale a worker's view of the running shadow may be (one query per period)
SHADOW_RETRY_S = 30.0  # after a shadow failure, no new attempt for this long: one log line, not one per batch


@dataclass
@dataclass
class ShadowReport:
    version: str
    photos: dict[str, int]  # by outcome: tagged | no_landmark | skipped | error
    timings_ms: dict[str, float] = field(default_factory=dict)


def in_shadow_sample(user_id: str, photo_id: str, share: float) -> bool:
    """Chosen per photo, not per event: a redelivery, a re-upload or a backfill of a photo choose alike,
    on every worker (a stable hash, not Python's salted one)."""
    digest = hashlib.sha256(f"{user_id}\x00{photo_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < share * 2**64


@dataclass(frozen=True)
class ShadowPlan:
    """The running shadow as one batch sees it: its version, share and model (None until loaded)."""
    version: str
    share: float
    runtime: ModelRuntime | None
    decode_size: int | None  # the shadow model's input size where it differs from the active one's

    def sample(self, events: list[PhotoUploaded]) -> frozenset[int]:
        return frozenset(i for i, e in enumerate(events) if in_shadow_sample(e.user_id, e.photo_id, self.share))


class ShadowRunner:
    """The candidate version beside the active one: which (read from PostgreSQL at most every
    ``refresh_s``), its model (loaded only while it runs, after a live batch has committed), and the
    tagging of a batch's sample under its version. Nothing here raises into the live batch."""

    def __init__(self, settings: Settings, engine: Engine, index: LandmarkIndex,
                 refresh_s: float = SHADOW_REFRESH_S, retry_s: float = SHADOW_RETRY_S,
                 forward_turns: ForwardTurns | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.index = index
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self._running: tuple[str, float] | None = None  # (version, share) as last read
        self._read_at = -float("inf")
        self._runtime: ModelRuntime | None = None
        self._backoff: tuple[str, float] | None = None  # (version, when to try it again)
        # Batches run in several threads: one of them at a time reads, loads or runs the shadow, and its
        # forward pass takes turns with the live model's.
        self._lock = threading.RLock()
        self._forward_turns = forward_turns or ForwardTurns(settings.torch_threads)

    @property
    def loaded_version(self) -> str | None:
        runtime = self._runtime
        return runtime.version if runtime is not None else None

    def for_batch(self, active: ModelRuntime) -> ShadowPlan | None:
        """The shadow for this batch, or None; a shadow that stopped, or became active, is unloaded."""
        with self._lock:
            return self._plan(active)

    def _plan(self, active: ModelRuntime) -> ShadowPlan | None:
        running = self._read_running()
        if running is None or running[0] == active.version:
            self._unload()
            return None
        version, share = running
        if self._runtime is not None and self._runtime.version != version:
            self._unload()
        runtime = self._runtime
        size = runtime.embedder.meta.input_size if runtime is not None else None
        return ShadowPlan(version, share, runtime,
                          size if size is not None and size != active.embedder.meta.input_size else None)

    def run(self, plan: ShadowPlan, events: list[PhotoUploaded], images: list[np.ndarray | None],
            gps: list[GeoPoint | None]) -> ShadowReport:
        """Tags the sampled photos under the shadow version (after the live batch committed)."""
        with self._lock:
            return self._run(plan, events, images, gps)

    def _run(self, plan: ShadowPlan, events: list[PhotoUploaded], images: list[np.ndarray | None],
             gps: list[GeoPoint | None]) -> ShadowReport:
        if self._backing_off(plan.version):
            return ShadowReport(plan.version, {"skipped": len(events)} if events else {})
        if plan.runtime is None:  # loaded now that the live batch is done: its first batch waits for nothing
            if not self._load(plan.version):
                return ShadowReport(plan.version, {"error": len(events)} if events else {})
            plan = replace(plan, runtime=self._runtime)
        if not events:
            return ShadowReport(plan.version, {})
        clock = StageClock()
        try:
            photos = self._tag(plan, events, images, gps, clock)
        except Exception as exc:  # noqa: BLE001 - whatever breaks in the candidate, the live batch is done
            self._backoff = (plan.version, time.monotonic() + self.retry_s)
            log.warning("shadow %s failed on %d photos (next try in %.0fs): %s", plan.version, len(events),
                        self.retry_s, exc, extra={"model_version": plan.version})
            return ShadowReport(plan.version, {"error": len(events)})
        timings = {k: round(v, 1) for k, v in clock.laps.items()}
        log.info("shadow %s: %d sampled, %s, ms %s", plan.version, len(events), photos, timings,
                 extra={"model_version": plan.version, "shadow_photos": photos, "timings_ms": timings})
        return ShadowReport(plan.version, photos, clock.laps)

    def _tag(self, plan: ShadowPlan, events: list[PhotoUploaded], images: list[np.ndarray | None],
             gps: list[GeoPoint | None], clock: StageClock) -> dict[str, int]:
        runtime = plan.runtime
        assert runtime is not None
        size = runtime.embedder.meta.input_size
        # Pixels of another size: the batch was decoded before this model was loaded (skipped once).
        usable = [k for k, pixels in enumerate(images) if pixels is not None and pixels.shape[0] == size]
        photos = {"skipped": len(events) - len(usable)} if len(usable) < len(events) else {}
        if not usable:
            return photos
        with self._forward_turns.model_turn(runtime.embedder):
            embeddings = runtime.embedder.embed(np.stack([images[k] for k in usable]))
        clock.lap("embed")
        tags = recognise_batch(embeddings, [gps[k] for k in usable], self.index, plan.version, runtime.thresholds,
                               global_k=self.settings.global_top_k, geo_limit=self.settings.geo_top_k)
        clock.lap("search")
        outcomes = [PhotoOutcome(events[k], PhotoStatus.TAGGED if t else PhotoStatus.NO_LANDMARK, t)
                    for k, t in zip(usable, tags)]
        with transaction(self.engine) as session:
            written = write_shadow_outcomes(session, plan.version, outcomes)
        clock.lap("write")
        for o in outcomes:  # not written: the shadow stopped meanwhile, or the photo was deleted
            outcome = str(o.status) if (o.event.user_id, o.event.photo_id) in written else "skipped"
            photos[outcome] = photos.get(outcome, 0) + 1
        return photos

    def _read_running(self) -> tuple[str, float] | None:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            self._read_at = now
            try:
                with transaction(self.engine) as session:
                    row = running_shadow(session)
                    self._running = (row.version, row.share) if row is not None else None
            except (InfrastructureError, SQLAlchemyError) as exc:
                log.warning("cannot read the running shadow; keeping the last one read: %s", exc)
        return self._running

    def _load(self, version: str) -> bool:
        try:
            runtime = load_model_runtime(self.engine, version, self.settings.device, role="shadow",
                                         batch_size=self.settings.batch_size, precision=self.settings.precision)
            # Another build under the candidate's name would judge the sample with weights nobody published.
            published_gallery(version, runtime.embedder.gallery, self.index, runtime.embedder.checkpoint)
            self._runtime = runtime
        except Exception as exc:  # noqa: BLE001 - e.g. a corrupt checkpoint: the candidate's problem, not the batch's
            self._backoff = (version, time.monotonic() + self.retry_s)
            log.warning("cannot load the shadow model %s (next try in %.0fs): %s", version, self.retry_s, exc,
                        extra={"model_version": version})
            return False
        log.info("shadow model %s loaded", version, extra={"model_version": version})
        return True

    def _backing_off(self, version: str) -> bool:
        return self._backoff is not None and self._backoff[0] == version and time.monotonic() < self._backoff[1]

    def _unload(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is None:
            return
        log.info("shadow model %s unloaded", runtime.version, extra={"model_version": runtime.version})
        del runtime
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()  # hand the candidate's memory back to the active model
