"""The fault suite: 1,000 upload events in flight per case through a real worker, Redis, PostgreSQL and
Milvus, and one fault injected mid-stream. Every event must end processed exactly once or recorded as a
failure with its reason; each case prints one row (see the end of the pytest run)."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from shared.db import migrate
from shared.db.session import make_engine
from shared.index import LandmarkIndex
from shared.publish import publish_model
from shared.stack import start_postgres, start_redis, stop_postgres, stop_redis

from faults import (FaultStack, Ledger, MilvusServer, Producer, SupervisedWorker, applied_in_logs,
                    broker_event_ids, make_events, outcome_ids)
from ops_fleet import build_model, fleet_env, free_port, photo_set, wait

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

EVENTS = 1000
BAD_EVENTS = 20  # corrupt or missing files among them: they must end as recorded failures
FAULT_AFTER = 250  # processed events before the fault is injected, so it lands mid-stream
DRAIN_TIMEOUT_S = 420

ROWS: list[str] = []  # printed by tests/conftest.py's terminal summary


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> FaultStack:
    root = tmp_path_factory.mktemp("faultstack")
    server_url = start_postgres(root / "pg")
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text('CREATE DATABASE "faults"'))
    database_url = admin.url.set(database="faults").render_as_string(hide_password=False)
    admin.dispose()
    migrate.upgrade(database_url)
    milvus = MilvusServer(root / "milvus", free_port(), root / "milvus.log")
    milvus.start()
    yield FaultStack(root, database_url, start_redis(root / "redis"), milvus)
    milvus.stop()
    stop_redis(root / "redis")
    stop_postgres(root / "pg")


@pytest.fixture(scope="module")
def engine(stack):
    eng = make_engine(stack.database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    return photo_set(tmp_path_factory.mktemp("faultphotos"), n_landmarks=3, n_everyday=5)


@pytest.fixture(scope="module")
def published(stack, engine, photos, tmp_path_factory) -> str:
    version = f"faults_{uuid.uuid4().hex[:6]}"
    model = build_model(photos, tmp_path_factory.mktemp("faultmodels"), version)
    publish_model(model, engine, LandmarkIndex(stack.milvus.uri))
    return version


class Case:
    """One fault case: its queue, worker, producer and events; ``ledger()`` accounts for every event."""

    def __init__(self, name: str, stack: FaultStack, engine: sa.Engine, photos: dict, home: Path) -> None:
        self.name, self.stack, self.engine = name, stack, engine
        tag = uuid.uuid4().hex[:6]
        self.env = fleet_env(stack.database_url, stack.broker_url, stack.milvus.uri, photos["root"], home,
                             LANDMARKS_BATCH_SIZE=32, LANDMARKS_LOG_JSON=1)
        self.log = home / "worker.log"
        self.events, self.bad_ids = make_events(photos, EVENTS, BAD_EVENTS, tag)
        self.ids = [e["event_id"] for e in self.events]
        self.producer = Producer(stack.broker_url, self.env["LANDMARKS_QUEUE"])
        self.worker = SupervisedWorker(self.env, self.log).start()
        self.settled_at_fault = EVENTS  # set by wait_for_mid_stream

    def settled(self) -> int:
        processed, failed = outcome_ids(self.engine, self.ids)
        return len(processed | failed)

    def wait_until_settled(self, at_least: int = EVENTS, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        wait(lambda: self.settled() >= at_least, f"{at_least} events settled ({self.name})", timeout_s)

    def wait_for_mid_stream(self) -> None:
        """Returns once FAULT_AFTER events are settled, while others are still in flight."""
        self.wait_until_settled(FAULT_AFTER)
        self.settled_at_fault = self.settled()

    def ledger(self) -> Ledger:
        processed, failed = outcome_ids(self.engine, self.ids)
        missing = set(self.ids) - processed - failed
        in_broker: set[str] = set()
        for _ in range(3):  # a message moving between the queue and the unacked set is seen on a retry
            if not missing - in_broker:
                break
            in_broker |= broker_event_ids(self.stack.redis(), self.env["LANDMARKS_QUEUE"]) & missing
            time.sleep(0.2)
        applied = applied_in_logs(self.log, 0)
        return Ledger(self.name, len(self.ids), self.producer.refused, len(processed), len(failed),
                      len(in_broker), len(missing - in_broker),
                      max(0, applied - len(processed | failed)), self.worker.restarts)

    def close(self) -> None:
        self.worker.stop()
        self.producer.close()


@pytest.fixture
def case(request, stack, engine, photos, published, tmp_path):
    made: list[Case] = []

    def make(name: str) -> Case:
        made.append(Case(name, stack, engine, photos, tmp_path))
        return made[-1]
    yield make
    for c in made:
        c.close()


def _settle_and_check(c: Case) -> Ledger:
    c.wait_until_settled()
    ledger = c.ledger()
    ROWS.append(ledger.row())
    print(ledger.row())
    processed, failed = outcome_ids(c.engine, c.ids)
    assert c.settled_at_fault < EVENTS, "the fault came after the stream had ended"
    assert (ledger.lost, ledger.duplicated) == (0, 0), ledger.row()
    assert failed == c.bad_ids, "exactly the corrupt and missing files end as recorded failures"
    assert len(processed) == EVENTS - BAD_EVENTS
    return ledger


def _reasons(engine: sa.Engine, ids: set[str]) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.text("SELECT reason FROM failures WHERE event_key = ANY(:ids)"),
                                 {"ids": list(ids)}))


def test_worker_sigkilled_mid_batch(case):
    c = case("SIGKILL worker")
    c.producer.send_all(c.events)
    c.wait_for_mid_stream()
    c.worker.signal_and_restart(signal.SIGKILL)
    _settle_and_check(c)
    assert all(r for r in _reasons(c.engine, c.bad_ids)), "every failure carries its reason"


def test_worker_sigtermed_finishes_or_returns_its_batch(case):
    c = case("SIGTERM worker")
    c.producer.send_all(c.events)
    c.wait_for_mid_stream()
    exit_code = c.worker.signal_and_restart(signal.SIGTERM)
    assert exit_code == 0, "a warm shutdown exits cleanly"
    _settle_and_check(c)


def test_redis_restarted_mid_stream(case):
    c = case("Redis restart (AOF)")
    sender = threading.Thread(target=c.producer.send_all, args=(c.events,), kwargs={"per_second": 100})
    sender.start()
    c.wait_for_mid_stream()
    c.stack.restart_redis(down_s=3)
    sender.join(240)
    assert not sender.is_alive()
    ledger = _settle_and_check(c)
    assert ledger.refused_by_broker > 0, "the stream really ran into the restart"


def test_postgres_stopped_for_10_seconds(case):
    c = case("PostgreSQL down 10 s")
    c.producer.send_all(c.events)
    c.wait_for_mid_stream()
    c.stack.stop_postgres()
    time.sleep(10)
    c.stack.start_postgres()
    _settle_and_check(c)


def test_milvus_unavailable_for_10_seconds(case):
    c = case("Milvus down 10 s")
    c.producer.send_all(c.events)
    c.wait_for_mid_stream()
    c.stack.milvus.stop()
    time.sleep(10)
    c.stack.milvus.start()
    _settle_and_check(c)


def test_milvus_unavailable_for_good_keeps_every_event_in_the_broker(case):
    """While Milvus stays down nothing is tagged, nothing is dropped and no good photo is marked failed:
    the events wait in the broker; when it comes back they drain."""
    c = case("Milvus down for good")
    c.producer.send_all(c.events)
    c.wait_for_mid_stream()
    c.stack.milvus.stop()
    try:
        time.sleep(90)  # longer than a batch's 60 s of retries, so events have been handed back
        during = c.ledger()
        ROWS.append(during.row() + "  (while down, 90 s)")
        print(during.row())
        processed, failed = outcome_ids(c.engine, c.ids)
        assert during.lost == 0 and during.in_broker > 0, during.row()
        assert failed <= c.bad_ids, "no good photo is failed because Milvus is down"
        assert during.processed + during.failures + during.in_broker == EVENTS
    finally:
        c.stack.milvus.start()
    _settle_and_check(c)
