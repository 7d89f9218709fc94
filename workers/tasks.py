"""The public Celery tasks. Thin: parse the events, call the pipeline, decide what to retry."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any, TypeVar

from celery import signals
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from shared import metrics
from shared.backfill import backfill_queue
from shared.db.session import transaction
from shared.db.writer import delete_photo, record_failure
from shared.errors import InfrastructureError, InvalidEvent, Stage
from shared.events import E, PhotoDeleted, PhotoUploaded, parse_event, safe_field
from shared.logs import log_context
from shared.settings import get_settings
from shared.signing import event_signer, verification_keys
from workers.app import app
from workers.context import worker_context
from workers.pool import PipelinedBatches

log = logging.getLogger(__name__)
_settings = get_settings()
# Read once at start-up: a missing or short key stops the worker here rather than letting events in unchecked.
_signing_keys = verification_keys(_settings)
# A handed-back event must pass this fleet's own signature check when it comes round again.
_sign = event_signer(_settings)
_backfill_queue = backfill_queue(_settings)


@signals.worker_init.connect
def _warn_if_unsigned(**_: object) -> None:
    # At worker start, not on every import: `landmarks enqueue` imports this module for the task names.
    if not _signing_keys:
        log.warning("LANDMARKS_EVENT_SIGNING_KEY (or LANDMARKS_EVENT_SIGNING_KEY_FILE) is not set: event signing "
                    "is off, so this worker accepts unsigned events from anyone who can write to the broker")


UPLOADED = "landmarks.photo_uploaded"
DELETED = "landmarks.photo_deleted"
# How long a batch keeps retrying a broken database/Milvus before handing its events back.
INFRA_RETRY_S = 60.0
# Message header counting the fetches of a photo that the storage did not answer (shared.errors.FetchError).
FETCH_ATTEMPTS_HEADER = "landmarks_fetch_attempts"
# The longest wait before a photo the storage did not serve is fetched again (each countdown is bounded by
# the visibility timeout too: see _countdown).
MAX_FETCH_RETRY_WAIT_S = 900.0
# How long events handed back after an outage, or malformed ones that could not be recorded, wait.
HAND_BACK_WAIT_S = 30.0
T = TypeVar("T")


def _payload(request: Any) -> Any:
    args, kwargs = request.args, request.kwargs
    if isinstance(args, (list, tuple)) and isinstance(kwargs, dict):
        if len(args) == 1 and not kwargs:
            return args[0]
        if not args and set(kwargs) == {"event"}:
            return kwargs["event"]
    # Anything else, a hand-crafted message's args that are not a list included, is recorded as malformed.
    return {"_args": args, "_kwargs": kwargs}


def _read(kind: type[E], payload: Any) -> E:
    """parse_event, where any error is the event's InvalidEvent: an error escaping a task would have Celery
    acknowledge the message (for uploads, the whole batch) with no record."""
    try:
        return parse_event(kind, payload, keys=_signing_keys)
    except InvalidEvent:
        raise
    except Exception as exc:  # noqa: BLE001
        log.exception("reading an event failed unexpectedly", extra={"event_id": safe_field(payload, "event_id")})
        raise InvalidEvent(f"malformed event: reading it failed unexpectedly: {type(exc).__name__}: {exc}") from exc


def _split(requests: list[Any]) -> tuple[list[PhotoUploaded], list[tuple[Any, str]], dict[str, int]]:
    """(events, malformed payloads with their reasons, {event_id: fetch attempts made before this one})."""
    events, bad, attempts = [], [], {}
    for request in requests:
        payload = _payload(request)
        try:
            event = _read(PhotoUploaded, payload)
        except InvalidEvent as exc:
            bad.append((payload, exc.reason))
            continue
        if event.event_id not in attempts:  # the same event twice in one batch is one event
            attempts[event.event_id] = _fetch_attempts(request)
            events.append(event)
    return events, bad, attempts


def _fetch_attempts(request: Any) -> int:
    """How often this event's photo could not be fetched yet: the message header this worker set when it
    sent the event round again (0 on an upload pipeline's message)."""
    headers = getattr(request, "request_dict", None) or {}
    value = headers.get(FETCH_ATTEMPTS_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _record_malformed(bad: list[tuple[Any, str]], task: str) -> None:
    context = worker_context()
    with transaction(context.engine) as session:
        for payload, reason in bad:
            record_failure(session, payload=payload, task=task, stage=Stage.VALIDATE, reason=reason)
    for payload, reason in bad:
        log.warning("%s: refused a malformed event: %s", task, reason,
                    extra={"event_id": safe_field(payload, "event_id"), "photo_id": safe_field(payload, "photo_id")})
    _observe(metrics.observe_malformed, [payload for payload, _ in bad])


def _count_dead_lettered(event: PhotoUploaded) -> None:
    """A photo recorded as failed after an unexpected error, counted as the pipeline counts a failed photo
    (landmarks_events_total{outcome="failed"}, which LandmarksFailureRateHigh reads), under the stage its
    failures row names (write): uncounted, a bug that dead-letters every photo would raise no alert."""
    metrics.EVENTS.labels("failed", metrics.source_of(event.event_id)).inc()
    metrics.FAILURES.labels(str(Stage.WRITE)).inc()


def _observe(hook, *args) -> None:
    """Metrics are never a reason for a batch to fail."""
    try:
        hook(*args)
    except Exception:  # noqa: BLE001
        log.exception("metrics hook %s failed", getattr(hook, "__name__", hook))


class Unexpected(Exception):
    """An action failed with an error that is not an outage (a bug, CUDA out of memory, a poisonous input)."""


class StillDown(Exception):
    """Infrastructure stayed down for INFRA_RETRY_S; the message is the last outage's error."""


def _outage(exc: Exception) -> bool:
    """A dependency is down: worth retrying. Not a DataError (SQLSTATE class 22) nor an IntegrityError (class
    23, a tag naming a landmark removed by hand): that is a value PostgreSQL refuses, which no retry mends;
    taken for an outage, it would hand the same batch back forever."""
    return isinstance(exc, (InfrastructureError, DBAPIError)) and not isinstance(exc, (DataError, IntegrityError))


def _with_retries(action, what: str) -> None:
    """Returns once ``action`` succeeds; raises StillDown when infrastructure stayed down for INFRA_RETRY_S,
    Unexpected for any other error (celery-batches would acknowledge the batch and lose it)."""
    delay, deadline = 0.5, time.monotonic() + INFRA_RETRY_S
    while True:
        try:
            action()
            return
        except Exception as exc:  # noqa: BLE001
            if not _outage(exc):
                log.exception("%s failed unexpectedly", what)
                raise Unexpected(f"{type(exc).__name__}: {exc}") from exc
            _observe(metrics.observe_infrastructure_error, what)
            if time.monotonic() + delay > deadline:
                log.error("%s still failing after %.0fs: %s", what, INFRA_RETRY_S, exc)
                raise StillDown(f"{type(exc).__name__}: {exc}") from exc
            log.warning("%s failed (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _republish_or_exit(publish: Callable[[], T], what: str) -> T:
    """Re-publishes what this worker took (``publish``'s result is returned); if even the broker refuses, dies
    so that Redis redelivers the unacknowledged originals, which an acknowledgement would lose."""
    try:
        return publish()
    except Exception:  # noqa: BLE001 - any failure to re-publish must end in redelivery, not loss
        log.critical("cannot re-publish %s; exiting so the broker redelivers the unacknowledged originals", what)
        os._exit(75)


def _bounded_countdown(wait_s: float, visibility_timeout_s: float) -> float:
    """A message waiting for its countdown is held, unacknowledged, by the worker that took it; past the
    broker's visibility timeout Redis hands a second copy to another worker, and the event runs (and is retried)
    twice. Half the timeout leaves room for the time the message waited in the queue first."""
    return min(wait_s, visibility_timeout_s / 2)


def _countdown(wait_s: float) -> float:
    return _bounded_countdown(wait_s, _settings.visibility_timeout_s)


def _ids(event: PhotoUploaded) -> dict[str, str]:
    return {"event_id": event.event_id, "photo_id": event.photo_id}


def _brief(exc: Exception) -> str:
    """An error's first line, for the line logged per event: a database error goes on with its SQL and
    parameters, which the batch's own line (in _with_retries) has already logged once."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return text if len(text) <= 200 else text[:199] + "…"


def _hand_back(events: list[PhotoUploaded], attempts: dict[str, int], why: str) -> None:
    """Re-publish, then let the originals be acknowledged: at-least-once, and the writer is idempotent."""
    _observe(metrics.observe_handed_back, len(events))
    _send_again([(event, HAND_BACK_WAIT_S, attempts.get(event.event_id, 0)) for event in events])
    # Only after an outage or a fault, so a line per event is affordable: an on-call searches a photo_id.
    wait_s = _countdown(HAND_BACK_WAIT_S)
    for event in events:
        log.warning("photo handed back to the broker after %s; it comes round again in %.0f s", why, wait_s,
                    extra=_ids(event))


def _try_fetching_later(events: list[PhotoUploaded], attempts: dict[str, int]) -> None:
    """Send again the events whose photo the storage did not serve, each after twice its last wait."""
    _observe(metrics.observe_fetch_retries, len(events))
    sends = []
    for event in events:
        made = attempts.get(event.event_id, 0)
        sends.append((event, min(_settings.fetch_retry_delay_s * 2 ** made, MAX_FETCH_RETRY_WAIT_S), made + 1))
    _send_again(sends)


def _send_again(sends: list[tuple[PhotoUploaded, float, int]]) -> None:
    """(event, countdown in seconds, fetch attempts made) for each event to publish again."""
    def publish() -> None:
        for event, wait_s, fetch_attempts in sends:
            app.send_task(UPLOADED, args=[_sign(event.model_dump(mode="json"))], countdown=_countdown(wait_s),
                          queue=_queue_of(event), headers={FETCH_ATTEMPTS_HEADER: fetch_attempts})
    _republish_or_exit(publish, f"{len(sends)} events")


def _send_malformed_again(bad: list[tuple[Any, str]], why: str) -> None:
    """Malformed events whose failures rows could not be written go round again as they came (unsigned: a
    signature is this fleet's word that an event is well-formed), to be recorded once the database is back."""
    def publish() -> None:
        for payload, _ in bad:  # to the live queue: a malformed event has no trustworthy source
            app.send_task(UPLOADED, args=[payload], countdown=_countdown(HAND_BACK_WAIT_S))
    _republish_or_exit(publish, f"{len(bad)} malformed events")
    wait_s = _countdown(HAND_BACK_WAIT_S)
    for payload, reason in bad:
        log.warning("malformed event sent round again after %s; it comes round again in %.0f s (%s)", why, wait_s,
                    reason, extra={"event_id": safe_field(payload, "event_id"),
                                   "photo_id": safe_field(payload, "photo_id")})


def _queue_of(event: PhotoUploaded) -> str | None:
    """A backfill's events go back to the backfill queue (None: the live one), where they wait behind live
    uploads as they did before the outage."""
    return _backfill_queue if _backfill_queue and metrics.source_of(event.event_id) == "backfill" else None


@app.task(name=UPLOADED, base=PipelinedBatches, flush_every=_settings.batch_size,
          flush_interval=_settings.max_wait_ms / 1000, acks_late=True, typing=False)
def photo_uploaded(requests: list[Any]) -> None:
    events, bad, attempts = _split(requests)
    if bad and not _record_or_send_again(bad, events, attempts):
        return
    if events:
        _observe(metrics.batch_started)
        try:
            _process_or_isolate(events, attempts)
        finally:
            _observe(metrics.batch_finished)


def _record_or_send_again(bad: list[tuple[Any, str]], events: list[PhotoUploaded], attempts: dict[str, int]) -> bool:
    """Records the malformed events, or sends them round again: acknowledged unrecorded they would be lost, and
    an exit for redelivery would hold their batch-mates back for the visibility timeout. False when the database
    stayed down: the batch-mates, which would only wait as long again, are then handed back with them (first,
    since a payload this process cannot encode, JSON nested a thousand levels deep, still ends it)."""
    try:
        _with_retries(lambda: _record_malformed(bad, UPLOADED), "recording failures")
        return True
    except Unexpected as exc:  # a bug, not the batch-mates' problem: they go on
        _send_malformed_again(bad, f"recording it failed unexpectedly ({_brief(exc)})")
        return True
    except StillDown as down:
        why = f"the database stayed down while its batch's malformed events were recorded ({_brief(down)})"
    if events:
        _hand_back(events, attempts, why)
    _observe(metrics.observe_handed_back, len(bad))
    _send_malformed_again(bad, why)
    return False


def _process_or_isolate(events: list[PhotoUploaded], attempts: dict[str, int]) -> None:
    """The batch; if it fails unexpectedly, each event alone, so that one poisonous event is recorded as a
    failure instead of sinking its batch-mates (and coming back forever)."""
    with _logged_as(events):
        if not _failed_unexpectedly(events, attempts):
            return
    log.warning("processing the %d events of the failed batch one by one", len(events),
                extra={"event_ids": [e.event_id for e in events], "photo_ids": [e.photo_id for e in events]})
    for event in events:
        _process_or_isolate([event], attempts)


def _logged_as(events: list[PhotoUploaded]) -> AbstractContextManager[None]:
    """An event processed alone has its ids on every line (its error and traceback, its retries): an on-call
    searches a photo_id. A batch's lines name no single event."""
    return log_context(**_ids(events[0])) if len(events) == 1 else nullcontext()


def _failed_unexpectedly(events: list[PhotoUploaded], attempts: dict[str, int]) -> bool:
    """Processes the batch, or hands it back after an outage, or records a lone event's unexpected failure.
    True when a batch of several failed unexpectedly: its events are to be tried one by one."""
    try:
        _with_retries(lambda: _process(events, attempts), "batch")
    except StillDown as down:
        _hand_back(events, attempts, f"an outage ({_brief(down)})")
    except Unexpected as exc:
        if _device_fault(exc.__cause__):
            _give_up_the_device(events, exc, attempts)
        if len(events) > 1:
            return True
        _record_unexpected(events[0], f"processing failed unexpectedly: {exc}", attempts)
    return False


def _device_fault(exc: BaseException | None) -> bool:
    """A CUDA error other than running out of memory (an illegal address, a GPU fallen off the bus) leaves
    the process's CUDA context broken: every later batch would fail the same way, whatever its photos."""
    torch = sys.modules.get("torch")  # never imported here for this: a worker without it has no device
    if torch is None or isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, getattr(torch, "AcceleratorError", ())) or "CUDA error" in str(exc)


def _give_up_the_device(events: list[PhotoUploaded], exc: Unexpected, attempts: dict[str, int]) -> None:
    """Hands the batch back and exits, so that a fresh process (or, if the device stays broken, the
    supervisor's restart limit and the pod's readiness) deals with it: recorded one by one as failures, the
    whole stream would be dead-lettered while the device is broken."""
    log.critical("the device failed (%s); handing the batch back and exiting for a fresh CUDA context", exc)
    _hand_back(events, attempts, f"a device failure ({_brief(exc)})")
    os._exit(75)


def _record_unexpected(event: PhotoUploaded, reason: str, attempts: dict[str, int]) -> None:
    try:
        _with_retries(lambda: _record_failure(event.model_dump(mode="json"), UPLOADED, reason),
                      "recording a failure")
    except (StillDown, Unexpected) as exc:
        _hand_back([event], attempts, f"its failure could not be recorded ({_brief(exc)})")
        return
    log.error("photo recorded as failed, not to be retried: %s", reason, extra=_ids(event))
    _observe(_count_dead_lettered, event)


def _record_failure(payload: Any, task: str, reason: str) -> None:
    with transaction(worker_context().engine) as session:
        record_failure(session, payload=payload, task=task, stage=Stage.WRITE, reason=reason)


def _process(events: list[PhotoUploaded], attempts: dict[str, int]) -> None:
    may_retry = frozenset(e.event_id for e in events if attempts.get(e.event_id, 0) < _settings.fetch_retries)
    report = worker_context().pipeline.process(events, may_retry)
    _observe(metrics.observe_batch, report, len(events))
    if report.try_later:
        _try_fetching_later(report.try_later, attempts)


@app.task(name=DELETED, bind=True, acks_late=True, max_retries=None)
def photo_deleted(self, *args: Any, **kwargs: Any) -> None:
    # Any arguments, read like an upload's: with a signature of its own, a message with the wrong ones would fail
    # before this body ran, and Celery would acknowledge it with no failures row (the photo staying tagged).
    try:
        _delete_or_record(_payload(self.request))
    except Exception as exc:  # noqa: BLE001 - Celery would acknowledge it with no trace in the tables
        if not _outage(exc):
            raise
        _observe(metrics.observe_infrastructure_error, "delete")
        # An outage while deleting or while recording why it cannot be done: the whole task again later (both
        # are idempotent). Task.retry turns a failed re-publish into Reject(requeue=False), an acknowledgement.
        retry = partial(self.retry, exc=exc, countdown=_countdown(min(2 ** self.request.retries, 300)), throw=False)
        raise _republish_or_exit(retry, "1 deletion")


def _delete_or_record(event: Any) -> None:
    """The deletion, or a failures row saying why it cannot be done; an outage propagates."""
    try:
        parsed = _read(PhotoDeleted, event)
    except InvalidEvent as exc:
        _record_malformed([(event, exc.reason)], DELETED)
        return
    try:
        with transaction(worker_context().engine) as session:
            delete_photo(session, parsed)
    except Exception as exc:  # noqa: BLE001
        if _outage(exc):
            raise
        log.exception("deletion failed unexpectedly; recording it", extra={"event_id": parsed.event_id})
        _record_failure(event, DELETED, f"deletion failed unexpectedly: {type(exc).__name__}: {exc}")
        return
    _observe(metrics.observe_deleted)
