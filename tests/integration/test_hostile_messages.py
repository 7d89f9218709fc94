"""Hostile task messages through a real worker, in one batch with valid uploads: JSON nested nearly as deep as
the broker's decoder reads (orjson: 1,024 levels; json.dumps and repr give up sooner), lone surrogates (the
broker's json.loads keeps an escaped "\\ud800"; PostgreSQL can store neither), and arguments that are not a
list or a dict. Each becomes a failures row with its reason, the valid uploads are tagged, and the worker
neither exits nor loses the batch, signed or not."""

from __future__ import annotations

import sys
import uuid
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from shared.db.albums import photo_report
from shared.db.session import transaction
from shared.events import event_key
from shared.signing import sign_event

import ops_fleet as fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "test-hostile-key-" + uuid.uuid4().hex
DEPTH = 1015  # with the task body's own 3 levels, just under orjson's 1,024
# What a worker without LANDMARKS_EVENT_SIGNING_KEY logs as it starts (workers/tasks.py).
UNSIGNED_WARNING = "LANDMARKS_EVENT_SIGNING_KEY (or LANDMARKS_EVENT_SIGNING_KEY_FILE) is not set: event signing is off"
# What the worker's log shows when a task, not an event, went wrong: celery-batches' "Error: ..." for an
# exception that escaped the batch (which it then acknowledges), a give-up, or an exit for redelivery.
TASK_ERRORS = ("Error: ", "failed unexpectedly", "still failing after", "CRITICAL", "exiting so the broker")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    return fleet.photo_set(tmp_path_factory.mktemp("photos"), n_landmarks=2, n_everyday=0)


@pytest.fixture(scope="module")
def model_version(photos, engine, milvus_uri, tmp_path_factory) -> str:
    return fleet.publish_tiny_model(photos, engine, milvus_uri, tmp_path_factory.mktemp("models"), "hostile")


def _deep(depth: int = DEPTH) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@contextmanager
def _deep_recursion():
    """The producer's json.dumps walks the nesting too."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


class Producer:
    def __init__(self, env: dict) -> None:
        self.app = Celery(broker=env["LANDMARKS_BROKER_URL"])
        self.app.conf.update(task_serializer="json")
        self.queue = env["LANDMARKS_QUEUE"]

    def send(self, event: Any) -> None:
        with _deep_recursion():
            self.app.send_task(fleet.UPLOADED, args=[event], queue=self.queue)

    def send_raw(self, args: Any, kwargs: Any, task: str = fleet.UPLOADED) -> None:
        """A message as a hand-written producer may send it: Celery's send_task insists on a list and a dict."""
        message = self.app.amqp.create_task_message(uuid.uuid4().hex, task, [], {})
        message = message._replace(body=(args, kwargs, message.body[2]))
        with self.app.producer_or_acquire() as publisher:
            self.app.amqp.send_task_message(publisher, task, message, queue=self.queue)

    def close(self) -> None:
        self.app.close()


def _failures(engine, keys: list[str]) -> dict[str, Any]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT event_key, event_id, user_id, stage, reason, payload FROM failures "
                                    "WHERE event_key = ANY(:k)"), {"k": keys}).all()
    return {r.event_key: r for r in rows}


def _tagged(engine, user: str, photo_ids: list[str]) -> bool:
    with transaction(engine) as session:
        reports = [photo_report(session, user, p) for p in photo_ids]
    return all(r is not None and r["status"] == "tagged" for r in reports)


def _run(env: dict, engine, tmp_path, goods: list[dict], send_bad, keys: list[str]) -> tuple[dict, str]:
    """Sends the valid uploads and the hostile messages (one batch: the worker starts after), then waits
    until the uploads are tagged and every hostile message has its failures row."""
    producer = Producer(env)
    log = tmp_path / "worker.log"
    worker = None
    try:
        producer.send(goods[0])
        send_bad(producer)
        producer.send(goods[1])
        worker = fleet.start_worker(env, log)
        user = goods[0]["user_id"]
        fleet.wait(lambda: _tagged(engine, user, [g["photo_id"] for g in goods]) and
                   len(_failures(engine, keys)) == len(keys), "the uploads tagged and a failure per hostile message",
                   timeout_s=90, worker=worker)
        assert worker.poll() is None
        return _failures(engine, keys), log.read_text(errors="replace")
    finally:
        if worker is not None:
            fleet.stop(worker)
        producer.close()


def _assert_no_task_error(log: str) -> None:
    for words in TASK_ERRORS:
        assert words not in log, f"the worker logged {words!r}: {log[-3000:]}"


def test_hostile_messages_are_recorded_and_their_batch_mates_tagged(photos, model_version, database_url,
                                                                    broker_url, milvus_uri, engine, tmp_path):
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home")
    user = f"hostile_{uuid.uuid4().hex[:6]}"
    goods = [fleet.event(user, path) for path in photos["firsts"]]
    deep = {**fleet.event(user, photos["firsts"][0]), "uri": None, "x": _deep()}
    surrogate_user = fleet.event(user + "\ud800", photos["firsts"][0])
    surrogate_id = {**fleet.event(user, photos["firsts"][0]), "event_id": uuid.uuid4().hex + "\udfff",
                    "note\ud800": "caf\udce9"}
    not_a_list, kwargs_a_list = (5, {}), ([goods[0]], ["event"])

    def send_bad(producer: Producer) -> None:
        for event in (deep, surrogate_user, surrogate_id):
            producer.send(event)
        for args, kwargs in (not_a_list, kwargs_a_list):
            producer.send_raw(args, kwargs)

    raw_keys = [event_key({"_args": args, "_kwargs": kwargs}) for args, kwargs in (not_a_list, kwargs_a_list)]
    surrogate_key = surrogate_id["event_id"][:-1] + "\ufffd"  # stored with U+FFFD for the lone surrogate
    keys = [deep["event_id"], surrogate_user["event_id"], surrogate_key, *raw_keys]
    failures, log = _run(env, engine, tmp_path, goods, send_bad, keys)

    assert failures[deep["event_id"]].stage == "validate"
    assert failures[deep["event_id"]].reason == "malformed event: uri: Input should be a valid string"
    assert "unserialisable" in failures[deep["event_id"]].payload  # repr() of it would recurse too deep
    assert failures[surrogate_user["event_id"]].user_id == user + "\ufffd"
    assert "user_id: Input should be a valid string, unable to parse raw data as a unicode string" in \
        failures[surrogate_user["event_id"]].reason
    row = failures[surrogate_key]
    assert row.event_id == surrogate_key and row.payload["note\ufffd"] == "caf\ufffd"
    assert row.reason.startswith("malformed event: event_id: Input should be a valid string")
    for key in raw_keys:
        assert failures[key].reason.startswith("malformed event: event_id: Field required")
    assert failures[raw_keys[0]].payload == {"_args": 5, "_kwargs": {}}
    _assert_no_task_error(log)


def test_hostile_messages_are_refused_when_events_are_signed(photos, model_version, database_url, broker_url,
                                                            milvus_uri, engine, tmp_path):
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home",
                          LANDMARKS_EVENT_SIGNING_KEY=KEY)
    user = f"hostile_sig_{uuid.uuid4().hex[:6]}"
    sign = lambda event: sign_event(event, KEY.encode())  # noqa: E731
    goods = [sign(fleet.event(user, path)) for path in photos["firsts"]]
    with _deep_recursion():
        deep = sign({**fleet.event(user, photos["firsts"][0]), "x": _deep()})  # signed by the right key
    surrogate = {**fleet.event(user, photos["firsts"][0]), "caption": "\ud83d", "signature": "v1=" + "0" * 64}
    not_a_list = (uuid.uuid4().int % 10**9, {})  # a key of its own: the test above recorded (5, {}) already

    def send_bad(producer: Producer) -> None:
        producer.send(deep)
        producer.send(surrogate)
        producer.send_raw(*not_a_list)

    raw_key = event_key({"_args": not_a_list[0], "_kwargs": not_a_list[1]})
    failures, log = _run(env, engine, tmp_path, goods, send_bad, [deep["event_id"], surrogate["event_id"], raw_key])

    assert failures[deep["event_id"]].reason == \
        "malformed event: nested too deeply to be encoded canonically for its signature"
    assert failures[surrogate["event_id"]].reason == \
        "malformed event: cannot be encoded canonically for its signature"
    assert failures[surrogate["event_id"]].payload["caption"] == "\ufffd"
    assert failures[raw_key].reason == "unsigned event refused: signing is required"
    _assert_no_task_error(log)
    assert UNSIGNED_WARNING not in log


def test_deletions_with_the_wrong_arguments_are_recorded(photos, model_version, database_url, broker_url,
                                                         milvus_uri, engine, tmp_path):
    """A deletion's arguments are read like an upload's: with a signature of its own, the task failed on a message
    with none, two, or a keyword other than ``event`` before its body ran, and Celery acknowledged it with no
    failures row: the deletion silently lost, the photo still tagged."""
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home")
    user = f"hostile_del_{uuid.uuid4().hex[:6]}"
    goods = [fleet.event(user, path) for path in photos["firsts"]]
    deletion = lambda: {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": goods[0]["photo_id"]}  # noqa: E731
    wrong = [([], {}), ([deletion(), "extra"], {}), ([], {"payload": deletion()}), ([], deletion())]
    keys = [event_key({"_args": args, "_kwargs": kwargs}) for args, kwargs in wrong]
    with engine.begin() as conn:  # no arguments at all: the same key every run (and the upload test's)
        conn.execute(sa.text("DELETE FROM failures WHERE event_key = :k"), {"k": keys[0]})

    def send_bad(producer: Producer) -> None:
        for args, kwargs in wrong:
            producer.send_raw(args, kwargs, task=fleet.DELETED)

    failures, log = _run(env, engine, tmp_path, goods, send_bad, keys)

    for key in keys:
        assert failures[key].stage == "validate"
        assert failures[key].reason.startswith("malformed event: event_id: Field required")
    with engine.connect() as conn:
        tasks = conn.scalars(sa.text("SELECT task FROM failures WHERE event_key = ANY(:k)"), {"k": keys}).all()
    assert tasks == [fleet.DELETED] * len(keys)
    assert failures[keys[2]].payload == {"_args": [], "_kwargs": {"payload": wrong[2][1]["payload"]}}
    _assert_no_task_error(log)
    # This worker runs without LANDMARKS_EVENT_SIGNING_KEY: it says so, once, as it starts.
    assert log.count(UNSIGNED_WARNING) == 1, log[-3000:]
    assert log.index(UNSIGNED_WARNING) < log.index(" ready.")  # Celery's "celery@host ready."
