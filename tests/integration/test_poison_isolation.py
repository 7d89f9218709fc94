"""A batch that fails with an unexpected error (not an outage) is retried event by event: the poisonous
event is recorded as a failure with its reason, its batch-mates are processed, nothing loops forever. A
message that cannot be read is refused alone, and a deletion the broker cannot take back is redelivered."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
import sqlalchemy as sa
import torch
from celery.exceptions import Retry
from prometheus_client import REGISTRY
from sqlalchemy.exc import OperationalError

from shared.db import writer
from shared.db.session import transaction
from shared.errors import InfrastructureError
from shared.events import PhotoUploaded
from shared.logs import JsonFormatter
from shared.outcomes import Method, PhotoOutcome, PhotoStatus, Tag
from shared.settings import get_settings
from shared.signing import verify_event
from shared.stack import redis_client_url

from ops_fleet import queued_messages  # tests/integration helpers

pytestmark = [pytest.mark.integration]


@pytest.fixture
def tasks(monkeypatch, database_url, broker_url, milvus_uri):
    monkeypatch.setenv("LANDMARKS_DATABASE_URL", database_url)
    monkeypatch.setenv("LANDMARKS_BROKER_URL", broker_url)
    monkeypatch.setenv("LANDMARKS_MILVUS_URI", milvus_uri)
    get_settings.cache_clear()
    import workers.context as context
    import workers.tasks as tasks
    monkeypatch.setattr(context, "_context", None)
    yield tasks
    monkeypatch.setattr(context, "_context", None)
    get_settings.cache_clear()


@pytest.fixture
def task_log():
    """The lines workers.tasks logs, as the worker's JSON log writes them (a list of dicts when called)."""
    out, logger = io.StringIO(), logging.getLogger("workers.tasks")
    handler, level = logging.StreamHandler(out), logger.level
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    logger.removeHandler(handler)
    logger.setLevel(level)


def _event(photo_id: str) -> PhotoUploaded:
    return PhotoUploaded(event_id=uuid.uuid4().hex, user_id="poison_user", photo_id=photo_id,
                         uri="file:///nowhere.jpg", uploaded_at="2026-11-27T10:00:00Z")


def _failed_photos_counted() -> tuple[float, float]:
    """(landmarks_events_total{outcome="failed"} of live events, landmarks_failures_total{stage="write"})."""
    value = lambda name, labels: REGISTRY.get_sample_value(name, labels) or 0.0  # noqa: E731
    return (value("landmarks_events_total", {"outcome": "failed", "source": "live"}),
            value("landmarks_failures_total", {"stage": "write"}))


def test_one_poisonous_event_is_recorded_and_its_batch_mates_processed(tasks, engine, monkeypatch):
    processed, handed_back = [], []
    counted_before = _failed_photos_counted()

    def process(events: list[PhotoUploaded], attempts: dict[str, int]) -> None:
        if any(e.photo_id == "poison" for e in events):
            raise ValueError("A string literal cannot contain NUL (0x00) characters.")
        processed.extend(e.photo_id for e in events)

    monkeypatch.setattr(tasks, "_process", process)
    monkeypatch.setattr(tasks, "_hand_back", lambda events, attempts, why: handed_back.extend(events))
    batch = [_event("a"), _event("poison"), _event("b"), _event("c")]
    tasks._process_or_isolate(batch, {})
    assert processed == ["a", "b", "c"] and handed_back == []
    with engine.connect() as conn:
        reason = conn.scalar(sa.text("SELECT reason FROM failures WHERE event_key = :k"),
                             {"k": batch[1].event_id})
    assert reason.startswith("processing failed unexpectedly: ValueError: A string literal cannot contain NUL")
    # Counted as a failed photo, or a bug dead-lettering every photo would raise no LandmarksFailureRateHigh.
    events_failed, write_failures = _failed_photos_counted()
    assert (events_failed - counted_before[0], write_failures - counted_before[1]) == (1, 1)


@pytest.mark.parametrize("outage", [InfrastructureError("Milvus down"),
                                    OperationalError("SELECT 1", {}, Exception("server closed the connection"))])
def test_an_outage_still_hands_the_whole_batch_back(tasks, monkeypatch, outage):
    handed_back = []
    monkeypatch.setattr(tasks, "INFRA_RETRY_S", 0.0)
    monkeypatch.setattr(tasks, "_process", lambda events, attempts: (_ for _ in ()).throw(outage))
    monkeypatch.setattr(tasks, "_hand_back", lambda events, attempts, why: handed_back.extend(events))
    batch = [_event("x"), _event("y")]
    tasks._process_or_isolate(batch, {})
    assert handed_back == batch


@pytest.mark.parametrize(("outage", "shown"), [
    (InfrastructureError("database unavailable"), "database unavailable"),
    (OperationalError("SELECT uri FROM photos WHERE photo_id = %(p)s", {"p": "x"}, Exception("server closed")),
     "server closed"),
])
def test_each_event_handed_back_after_an_outage_is_found_in_the_log_by_its_ids(tasks, monkeypatch, task_log,
                                                                               outage, shown):
    sent = []
    monkeypatch.setattr(tasks, "INFRA_RETRY_S", 0.0)
    monkeypatch.setattr(tasks, "_process", lambda events, attempts: (_ for _ in ()).throw(outage))
    monkeypatch.setattr(tasks.app, "send_task", lambda name, **options: sent.append(options["args"][0]["photo_id"]))
    batch = [_event("x"), _event("y")]
    tasks._process_or_isolate(batch, {})
    assert sent == ["x", "y"]
    handed_back = [line for line in task_log() if "event_id" in line]
    assert [(line["level"], line["event_id"], line["photo_id"]) for line in handed_back] == [
        ("WARNING", e.event_id, e.photo_id) for e in batch]
    # Why, in one line: the SQL statement went to the batch's own line, once.
    assert all("handed back" in line["msg"] and shown in line["msg"] and "\n" not in line["msg"]
               and "SELECT" not in line["msg"] for line in handed_back)


@pytest.mark.parametrize("photos", [["poison"], ["a", "poison", "b"]])
def test_a_dead_lettered_photo_is_found_in_the_log_by_its_ids(tasks, monkeypatch, task_log, photos):
    def process(events: list[PhotoUploaded], attempts: dict[str, int]) -> None:
        if any(e.photo_id == "poison" for e in events):
            raise ValueError("no such column: poison")

    monkeypatch.setattr(tasks, "_process", process)
    batch = [_event(photo_id) for photo_id in photos]
    poison = batch[photos.index("poison")]
    tasks._process_or_isolate(batch, {})
    lines = task_log()
    about = [line for line in lines if line.get("photo_id") == "poison"]
    # The error with its traceback, then the photo recorded as failed: both carry the event's ids.
    assert [(line["level"], line["event_id"]) for line in about] == [("ERROR", poison.event_id)] * 2
    assert "batch failed unexpectedly" in about[0]["msg"] and "ValueError: no such column" in about[0]["exc"]
    assert "recorded as failed" in about[1]["msg"] and "ValueError: no such column: poison" in about[1]["msg"]
    # Its batch-mates went through: nothing logged about each of them.
    assert not any(line.get("photo_id") in ("a", "b") for line in lines)


def test_a_successful_batch_logs_nothing_per_event(tasks, monkeypatch, task_log):
    monkeypatch.setattr(tasks, "_process", lambda events, attempts: None)
    tasks._process_or_isolate([_event("a"), _event("b")], {})
    assert task_log() == []


def test_a_malformed_event_the_database_cannot_record_goes_round_again_with_its_batch_mates(
        tasks, engine, monkeypatch, task_log):
    """The database down for longer than the retries: the worker used to exit so the broker would redeliver the
    batch, which held the valid events back for the visibility timeout. Now all go back to the broker, and the
    malformed event is recorded when it comes round with the database up."""
    sent = []

    def exit_(code: int) -> None:
        raise Exited(code)

    def database_unavailable(*args, **kwargs) -> None:
        raise InfrastructureError("database unavailable")

    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(tasks, "INFRA_RETRY_S", 0.0)
    monkeypatch.setattr(tasks, "_process", lambda events, attempts: pytest.fail("processed with the database down"))
    monkeypatch.setattr(tasks.app, "send_task", lambda name, **options: sent.append(options))
    record_failure = tasks.record_failure
    monkeypatch.setattr(tasks, "record_failure", database_unavailable)
    good = _event("good").model_dump(mode="json")
    malformed = {"event_id": uuid.uuid4().hex, "user_id": "poison_user", "photo_id": "no uri"}
    tasks.photo_uploaded.run([_request([good], {}), _request([malformed], {})])

    assert sorted(message["args"][0]["event_id"] for message in sent) == sorted([good["event_id"],
                                                                               malformed["event_id"]])
    assert all(message["countdown"] > 0 for message in sent)
    handed_back = [(line["level"], line["event_id"], line["photo_id"]) for line in task_log() if "event_id" in line]
    assert handed_back == [("WARNING", good["event_id"], "good"), ("WARNING", malformed["event_id"], "no uri")]
    monkeypatch.setattr(tasks, "record_failure", record_failure)  # the database is back
    again = next(message for message in sent if message["args"][0] == malformed)
    tasks.photo_uploaded.run([_request(again["args"], {})])
    with engine.connect() as conn:
        reason = conn.scalar(sa.text("SELECT reason FROM failures WHERE event_key = :k"), {"k": malformed["event_id"]})
    assert reason == "malformed event: uri: Field required; uploaded_at: Field required"


# What a worker process runs when it hands events back: workers.tasks imported under the settings in its
# environment (its Celery app configures itself from them, as a worker's does), the events read from stdin.
HAND_BACK = """
import json, sys, time
from shared.events import PhotoUploaded
from workers import tasks
events = [PhotoUploaded(**event) for event in json.load(sys.stdin)]
before = time.time()
tasks._hand_back(events, {}, "an outage")
print(json.dumps([before, time.time()]))
"""
SIGNING_KEY = "hand-back-signing-key-4e9b1c7a20"
VISIBILITY_TIMEOUT_S = 10  # the lowest allowed: a hand-back's 30 s wait is cut to 5 s


def _hand_back_in_a_worker_process(env: dict[str, str], events: list[PhotoUploaded]) -> tuple[float, float]:
    """(time before, time after) the process handed ``events`` back to its broker."""
    done = subprocess.run([sys.executable, "-c", HAND_BACK], env=env, cwd=Path(__file__).resolve().parents[2],
                          input=json.dumps([e.model_dump(mode="json") for e in events]), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout.strip().splitlines()[-1])
    return before, after


def test_events_handed_back_return_to_the_queue_they_came_from(database_url, broker_url, milvus_uri):
    """A backfill's events wait behind live uploads; handed back onto the live queue after an outage they would
    jump ahead of them. Each comes round signed, or its worker would refuse it, and within half the visibility
    timeout, or Redis would hand a second copy to another worker."""
    queue = f"lm_test_{uuid.uuid4().hex[:8]}"
    backfill_queue = f"{queue}_backfill"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LANDMARKS_")},
           "LANDMARKS_HOME": os.environ["LANDMARKS_HOME"], "LANDMARKS_DATABASE_URL": database_url,
           "LANDMARKS_BROKER_URL": broker_url, "LANDMARKS_MILVUS_URI": milvus_uri, "LANDMARKS_QUEUE": queue,
           "LANDMARKS_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S), "LANDMARKS_EVENT_SIGNING_KEY": SIGNING_KEY}
    live, backfill = _event("live"), _event("old").model_copy(update={"event_id": "backfill-" + uuid.uuid4().hex})
    client = redis.Redis.from_url(redis_client_url(broker_url))
    try:
        before, after = _hand_back_in_a_worker_process(env, [live, backfill])
        queued = {name: queued_messages(client, name) for name in (queue, backfill_queue)}
    finally:
        client.delete(*[key for name in (queue, backfill_queue)
                        for key in (name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")])
        client.close()
    assert {name: [event["event_id"] for _, event in messages] for name, messages in queued.items()} == {
        queue: [live.event_id], backfill_queue: [backfill.event_id]}
    for (headers, event), sent in [(queued[queue][0], live), (queued[backfill_queue][0], backfill)]:
        verify_event(event, SIGNING_KEY.encode())
        assert {k: v for k, v in event.items() if k != "signature"} == sent.model_dump(mode="json")
        eta = datetime.fromisoformat(headers["eta"]).timestamp()
        assert before + VISIBILITY_TIMEOUT_S / 2 <= eta <= after + VISIBILITY_TIMEOUT_S / 2


def test_a_value_postgresql_refuses_is_the_events_failure_not_an_outage(tasks, engine, monkeypatch):
    processed, handed_back = [], []

    def process(events: list[PhotoUploaded], attempts: dict[str, int]) -> None:
        if any(e.photo_id == "refused" for e in events):
            with transaction(engine) as session:  # a DataError, as PostgreSQL raises it
                session.execute(sa.text("SELECT CAST(:v AS integer)"), {"v": "not a number"})
        processed.extend(e.photo_id for e in events)

    monkeypatch.setattr(tasks, "INFRA_RETRY_S", 0.0)  # taken for an outage, the batch would be handed back
    monkeypatch.setattr(tasks, "_process", process)
    monkeypatch.setattr(tasks, "_hand_back", lambda events, attempts, why: handed_back.extend(events))
    batch = [_event("a"), _event("refused"), _event("b")]
    tasks._process_or_isolate(batch, {})
    assert processed == ["a", "b"] and handed_back == []
    with engine.connect() as conn:
        reason = conn.scalar(sa.text("SELECT reason FROM failures WHERE event_key = :k"), {"k": batch[1].event_id})
    assert reason.startswith("processing failed unexpectedly: DataError: (psycopg2.errors.InvalidTextRepresentation)")


def test_a_tag_postgresql_refuses_fails_its_event_and_its_batch_mates_are_written(tasks, engine, monkeypatch):
    """A foreign-key violation (IntegrityError, SQLSTATE class 23: here a landmark removed by hand while its
    tags were being computed) is no outage either: retried, the same batch would come back forever."""
    kept, removed, version = 990_001, 990_002, "fk-" + uuid.uuid4().hex[:8]
    with transaction(engine) as session:
        writer.upsert_landmarks(session, [{"id": lm, "name": f"Landmark {lm}", "city": "Paris", "country": "France",
                                           "region": 1, "lat": 48.8584, "lon": 2.2945} for lm in (kept, removed)])
        writer.register_model_version(session, version, backbone="wrn50_2", embedding_dim=512, t_geo=0.5,
                                      t_global=0.7, t_ref=0.6, checkpoint="/m/fk.pt", metrics={})
        session.execute(sa.text("DELETE FROM landmarks WHERE id = :id"), {"id": removed})
    handed_back = []

    def process(events: list[PhotoUploaded], attempts: dict[str, int]) -> None:
        outcomes = [PhotoOutcome(e, PhotoStatus.TAGGED, [Tag(removed if "removed" in e.photo_id else kept, 0.9,
                                                             Method.GEO)]) for e in events]
        with transaction(engine) as session:
            writer.write_outcomes(session, version, outcomes)

    monkeypatch.setattr(tasks, "INFRA_RETRY_S", 0.0)  # taken for an outage, the batch would be handed back
    monkeypatch.setattr(tasks, "_process", process)
    monkeypatch.setattr(tasks, "_hand_back", lambda events, attempts, why: handed_back.extend(events))
    batch = [_event("fk-kept-1"), _event("fk-removed"), _event("fk-kept-2")]
    tasks._process_or_isolate(batch, {})
    assert handed_back == []
    with engine.connect() as conn:
        written = conn.execute(sa.text("SELECT photo_id, status FROM photos WHERE model_version = :v ORDER BY 1"),
                               {"v": version}).all()
        reason = conn.scalar(sa.text("SELECT reason FROM failures WHERE event_key = :k"), {"k": batch[1].event_id})
    assert [tuple(row) for row in written] == [("fk-kept-1", "tagged"), ("fk-kept-2", "tagged")]
    assert reason.startswith("processing failed unexpectedly: IntegrityError: (psycopg2.errors.ForeignKeyViolation)")


def test_a_broken_device_hands_the_batch_back_and_ends_the_process_instead_of_failing_every_photo(
        tasks, engine, monkeypatch):
    """A sticky CUDA error fails every batch after it: recording each photo as a failure would dead-letter the
    whole stream while the device is broken. The batch goes back to the broker and a fresh process starts."""
    handed_back = []

    def exit_(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(tasks, "_process", lambda events, attempts: (_ for _ in ()).throw(
        torch.AcceleratorError("CUDA error: an illegal memory access was encountered")))
    monkeypatch.setattr(tasks, "_hand_back", lambda events, attempts, why: handed_back.extend(events))
    batch = [_event("a"), _event("b"), _event("c")]
    with pytest.raises(Exited) as info:
        tasks._process_or_isolate(batch, {})
    assert info.value.args == (75,) and handed_back == batch
    with engine.connect() as conn:
        recorded = conn.scalar(sa.text("SELECT count(*) FROM failures WHERE event_key = ANY(:keys)"),
                               {"keys": [e.event_id for e in batch]})
    assert recorded == 0


def test_running_out_of_device_memory_is_not_a_broken_device(tasks, monkeypatch):
    """Out of memory is the batch's size, not the device: one by one, the photos go through."""
    processed = []

    def process(events: list[PhotoUploaded], attempts: dict[str, int]) -> None:
        if len(events) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        processed.extend(e.photo_id for e in events)

    monkeypatch.setattr(tasks, "_process", process)
    tasks._process_or_isolate([_event("a"), _event("b")], {})
    assert processed == ["a", "b"]


def _request(args, kwargs) -> SimpleNamespace:
    return SimpleNamespace(args=args, kwargs=kwargs)


def test_a_message_that_cannot_be_read_is_refused_alone(tasks, monkeypatch):
    good, odd = _event("good").model_dump(mode="json"), _event("odd").model_dump(mode="json")
    parse_event = tasks.parse_event

    def parse_with_a_bug(kind, payload, **kwargs):
        if payload is odd:
            raise RuntimeError("a bug in reading one event")
        return parse_event(kind, payload, **kwargs)

    monkeypatch.setattr(tasks, "parse_event", parse_with_a_bug)
    requests = [_request([good], {}), _request(5, {}), _request({"a": 1}, {}), _request([good], ["event"]),
                _request([odd], {})]
    events, bad, _ = tasks._split(requests)
    assert [e.photo_id for e in events] == ["good"]
    assert [payload for payload, _ in bad[:3]] == [{"_args": 5, "_kwargs": {}}, {"_args": {"a": 1}, "_kwargs": {}},
                                                   {"_args": [good], "_kwargs": ["event"]}]
    assert all(reason.startswith("malformed event: event_id: Field required") for _, reason in bad[:3])
    assert bad[3] == (odd, "malformed event: reading it failed unexpectedly: RuntimeError: a bug in reading one event")


class Exited(BaseException):
    """os._exit, made catchable."""


def _deletion_during_an_outage(tasks, monkeypatch, send_task, event: dict | None = None,
                               retries: int = 3) -> tuple[dict, BaseException]:
    """Runs the deletion task as a worker does, with the database down and the broker answering ``send_task``."""
    def exit_(code: int) -> None:
        raise Exited(code)

    def database_unavailable(*args, **kwargs) -> None:
        raise InfrastructureError("database unavailable")

    monkeypatch.setattr(os, "_exit", exit_)
    monkeypatch.setattr(tasks, "delete_photo", database_unavailable)
    monkeypatch.setattr(tasks, "record_failure", database_unavailable)
    monkeypatch.setattr(tasks.app, "send_task", send_task)
    event = event or {"event_id": uuid.uuid4().hex, "user_id": "poison_user", "photo_id": "p"}
    task = tasks.photo_deleted
    task.push_request(id=uuid.uuid4().hex, args=[event], kwargs={}, retries=retries, called_directly=False,
                      delivery_info={"exchange": "", "routing_key": "landmarks"})
    try:
        with pytest.raises((Exited, Retry)) as info:
            task.run(event)
    finally:
        task.pop_request()
    return event, info.value


def test_a_deletion_the_broker_cannot_take_back_is_redelivered_not_lost(tasks, monkeypatch):
    def broker_out_of_memory(*args, **kwargs):
        raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")

    _, outcome = _deletion_during_an_outage(tasks, monkeypatch, broker_out_of_memory)
    # Celery's retry would have raised Reject(requeue=False): the deletion acknowledged, and lost.
    assert isinstance(outcome, Exited) and outcome.args == (75,)  # unacknowledged: Redis redelivers it


@pytest.mark.parametrize("event", [None, {"user_id": "poison_user", "photo_id": "no event id"}],
                         ids=["deletion", "malformed deletion"])
def test_a_deletion_during_an_outage_is_retried_later(tasks, monkeypatch, event):
    """Deleting, or recording why a deletion cannot be done: either way, not acknowledged without a trace."""
    sent = []
    event, outcome = _deletion_during_an_outage(
        tasks, monkeypatch, lambda name, args, kwargs, **options: sent.append((name, list(args), options["countdown"])),
        event)
    assert isinstance(outcome, Retry) and sent == [(tasks.DELETED, [event], 8)]


def test_a_deletion_retried_after_an_outage_comes_back_before_the_visibility_timeout(tasks, monkeypatch):
    """Waiting for its countdown, the retry is held unacknowledged: past the visibility timeout Redis would hand a
    copy to a second worker, and the deletion would be retried twice over."""
    sent = []
    monkeypatch.setattr(tasks, "_settings", tasks._settings.model_copy(update={"visibility_timeout_s": 10}))
    _, outcome = _deletion_during_an_outage(
        tasks, monkeypatch, lambda name, args, kwargs, **options: sent.append(options["countdown"]), retries=8)
    assert isinstance(outcome, Retry) and sent == [5.0]  # not 2**8 s
