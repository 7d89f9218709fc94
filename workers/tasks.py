"""The public Celery tasks. Thin: parse the events, call the pipeline, decide what to retry."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery_batches import Batches
from sqlalchemy.exc import DBAPIError

from shared import metrics
from shared.db.session import transaction
from shared.db.writer import delete_photo, record_failure
from shared.errors import InfrastructureError, InvalidEvent, Stage
from shared.events import PhotoDeleted, PhotoUploaded, parse_event, safe_field
from shared.settings import get_settings
from workers.app import app
from workers.context import worker_context

log = logging.getLogger(__name__)
_settings = get_settings()

UPLOADED = "landmarks.photo_uploaded"
DELETED = "landmarks.photo_deleted"
# How long a batch keeps retrying a broken database/Milvus before handing its events back.
INFRA_RETRY_S = 60.0


def _payload(request: Any) -> Any:
    if len(request.args) == 1 and not request.kwargs:
        return request.args[0]
    if not request.args and set(request.kwargs) == {"event"}:
        return request.kwargs["event"]
    return {"_args": list(request.args), "_kwargs": dict(request.kwargs)}  # recorded as malformed


def _split(requests: list[Any]) -> tuple[list[PhotoUploaded], list[tuple[Any, str]]]:
    events, bad, seen = [], [], set()
    for request in requests:
        payload = _payload(request)
        try:
            event = parse_event(PhotoUploaded, payload)
        except InvalidEvent as exc:
            bad.append((payload, exc.reason))
            continue
        if event.event_id not in seen:  # the same event twice in one batch is one event
            seen.add(event.event_id)
            events.append(event)
    return events, bad


def _record_malformed(bad: list[tuple[Any, str]], task: str) -> None:
    context = worker_context()
    with transaction(context.engine) as session:
        for payload, reason in bad:
            record_failure(session, payload=payload, task=task, stage=Stage.VALIDATE, reason=reason)
    for payload, reason in bad:
        log.warning("%s: refused a malformed event: %s", task, reason,
                    extra={"event_id": safe_field(payload, "event_id"), "photo_id": safe_field(payload, "photo_id")})
    _observe(metrics.observe_malformed, [payload for payload, _ in bad])


def _observe(hook, *args) -> None:
    """Metrics are never a reason for a batch to fail."""
    try:
        hook(*args)
    except Exception:  # noqa: BLE001
        log.exception("metrics hook %s failed", getattr(hook, "__name__", hook))


def _with_retries(action, what: str) -> bool:
    delay, deadline = 0.5, time.monotonic() + INFRA_RETRY_S
    while True:
        try:
            action()
            return True
        except (InfrastructureError, DBAPIError) as exc:
            _observe(metrics.observe_infrastructure_error, what)
            if time.monotonic() + delay > deadline:
                log.error("%s still failing after %.0fs: %s", what, INFRA_RETRY_S, exc)
                return False
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        except Exception:  # noqa: BLE001 - e.g. CUDA out of memory: celery-batches would ack and lose the batch
            log.exception("%s failed unexpectedly; handing its events back", what)
            return False


def _hand_back(events: list[PhotoUploaded]) -> None:
    """Re-publish, then let the originals be acknowledged: at-least-once, and the writer is idempotent.
    If even the broker refuses, die so Redis redelivers the unacknowledged originals."""
    _observe(metrics.observe_handed_back, len(events))
    try:
        for event in events:
            app.send_task(UPLOADED, args=[event.model_dump(mode="json")], countdown=30)
    except Exception:  # noqa: BLE001 - any failure to re-publish must end in redelivery, not loss
        log.critical("cannot re-publish %d events; exiting so the broker redelivers them", len(events))
        os._exit(75)


@app.task(name=UPLOADED, base=Batches, flush_every=_settings.batch_size,
          flush_interval=_settings.max_wait_ms / 1000, acks_late=True, typing=False)
def photo_uploaded(requests: list[Any]) -> None:
    events, bad = _split(requests)
    if bad and not _with_retries(lambda: _record_malformed(bad, UPLOADED), "recording failures"):
        os._exit(75)
    if events:
        _observe(metrics.batch_started)
        try:
            done = _with_retries(lambda: _process(events), "batch")
        finally:
            _observe(metrics.batch_finished)
        if not done:
            _hand_back(events)


def _process(events: list[PhotoUploaded]) -> None:
    report = worker_context().pipeline.process(events)
    _observe(metrics.observe_batch, report, len(events))


@app.task(name=DELETED, bind=True, acks_late=True, max_retries=None)
def photo_deleted(self, event: Any) -> None:
    try:
        parsed = parse_event(PhotoDeleted, event)
    except InvalidEvent as exc:
        _record_malformed([(event, exc.reason)], DELETED)
        return
    try:
        with transaction(worker_context().engine) as session:
            delete_photo(session, parsed)
    except (InfrastructureError, DBAPIError) as exc:
        _observe(metrics.observe_infrastructure_error, "delete")
        raise self.retry(exc=exc, countdown=min(2 ** self.request.retries, 300))
    _observe(metrics.observe_deleted)
