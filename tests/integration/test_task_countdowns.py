"""Every countdown a worker sends stays within half the broker's visibility timeout: a message waiting for its
countdown is held, unacknowledged, by the worker that took it, and past the timeout Redis hands a copy to a
second worker, which runs the event (and its chain of retries) a second time. The messages are read back from
the real broker, where a worker process sent them. (A deletion's retry: in
tests/integration/test_poison_isolation.py, since binding the Celery task configures the app.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime
from pathlib import Path

import pytest
import redis

from shared.events import PhotoUploaded
from shared.stack import redis_client_url
from workers import tasks

from ops_fleet import queued_messages  # tests/integration helpers

SHORT_VISIBILITY_S = 10  # the lowest LANDMARKS_VISIBILITY_TIMEOUT_S allowed
FETCH_RETRY_DELAY_S = 1  # a first fetch retry waits less than the bound, a fourth one (8 s) more
MALFORMED = {"event_id": "no-photo-" + uuid.uuid4().hex}

# What a worker process runs when it sends events round again: workers.tasks imported under the settings in
# its environment (its Celery app configures itself from them, as a worker's does), the events read from stdin.
SEND_AGAIN = """
import json, sys, time
from shared.events import PhotoUploaded
from workers import tasks
todo = json.load(sys.stdin)
before = time.time()
tasks._hand_back([PhotoUploaded(**e) for e in todo["outage"]], {}, "an outage")
tasks._try_fetching_later([PhotoUploaded(**e) for e in todo["not_served"]], todo["fetch_attempts"])
tasks._send_malformed_again([(payload, "malformed event") for payload in todo["malformed"]], "an outage")
print(json.dumps([before, time.time()]))
"""


def _event(photo_id: str, source: str = "live") -> PhotoUploaded:
    prefix = "backfill-" if source == "backfill" else ""
    return PhotoUploaded(event_id=prefix + uuid.uuid4().hex, user_id="countdown_user", photo_id=photo_id,
                         uri="file:///nowhere.jpg", uploaded_at="2026-11-27T10:00:00Z")


def _worker_env(queue: str, database_url: str, broker_url: str, milvus_uri: str) -> dict[str, str]:
    """A worker's settings, with event signing off (test_poison_isolation.py hands back signed events)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANDMARKS_")}
    return {**env, "LANDMARKS_HOME": os.environ["LANDMARKS_HOME"], "LANDMARKS_DATABASE_URL": database_url,
            "LANDMARKS_BROKER_URL": broker_url, "LANDMARKS_MILVUS_URI": milvus_uri, "LANDMARKS_QUEUE": queue,
            "LANDMARKS_VISIBILITY_TIMEOUT_S": str(SHORT_VISIBILITY_S),
            "LANDMARKS_FETCH_RETRY_DELAY_S": str(FETCH_RETRY_DELAY_S)}


@pytest.fixture(scope="module")
def sent(database_url, broker_url, milvus_uri) -> dict:
    """What a worker process under a visibility timeout of 10 s sent to the broker: the messages on its live
    and backfill queues, and the times before and after it sent them."""
    queue = f"lm_test_{uuid.uuid4().hex[:8]}"
    queues = {"live": queue, "backfill": f"{queue}_backfill"}
    events = {"outage": [_event("live"), _event("old", "backfill")], "not_served": [_event("soon"), _event("late")]}
    todo = {kind: [e.model_dump(mode="json") for e in batch] for kind, batch in events.items()}
    todo |= {"fetch_attempts": {events["not_served"][1].event_id: 3}, "malformed": [MALFORMED]}
    client = redis.Redis.from_url(redis_client_url(broker_url))
    try:
        done = subprocess.run([sys.executable, "-c", SEND_AGAIN], input=json.dumps(todo), capture_output=True,
                              text=True, env=_worker_env(queue, database_url, broker_url, milvus_uri),
                              cwd=Path(__file__).resolve().parents[2], timeout=120)
        assert done.returncode == 0, done.stderr
        before, after = json.loads(done.stdout.strip().splitlines()[-1])
        yield {"events": events, "before": before, "after": after,
               "queued": {source: queued_messages(client, name) for source, name in queues.items()}}
    finally:
        client.delete(*[key for name in queues.values()
                        for key in (name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")])
        client.close()


def _message(sent: dict, source: str, event_id: str) -> tuple[dict, dict]:
    """The (headers, event) of the one message for ``event_id`` on the live or the backfill queue."""
    found = [message for message in sent["queued"][source] if message[1]["event_id"] == event_id]
    assert len(found) == 1, f"{len(found)} messages for {event_id} on the {source} queue"
    return found[0]


def _waits(sent: dict, headers: dict) -> tuple[float, float]:
    """The least and the most the message's countdown can have been: its ETA less the times after and before
    the worker process sent it."""
    eta = datetime.fromisoformat(headers["eta"]).timestamp()
    return eta - sent["after"], eta - sent["before"]


def test_a_countdown_is_at_most_half_the_visibility_timeout():
    assert tasks._bounded_countdown(900.0, 3600) == 900.0
    assert tasks._bounded_countdown(900.0, 600) == 300.0
    assert tasks._bounded_countdown(30.0, 10) == 5.0
    assert tasks._bounded_countdown(1.0, 10) == 1.0


@pytest.mark.integration
def test_events_handed_back_after_an_outage_come_back_before_the_visibility_timeout(sent):
    live, backfill = sent["events"]["outage"]
    for event, source in [(live, "live"), (backfill, "backfill")]:  # each to the queue it came from
        headers, body = _message(sent, source, event.event_id)
        assert body == event.model_dump(mode="json")  # unsigned, as signing is off
        least, most = _waits(sent, headers)
        assert least <= SHORT_VISIBILITY_S / 2 <= most  # not the 30 s a hand-back waits under the default timeout


@pytest.mark.integration
def test_photos_the_storage_did_not_serve_are_fetched_again_before_the_visibility_timeout(sent):
    soon, late = sent["events"]["not_served"]
    for event, wait_s, attempts in [(soon, FETCH_RETRY_DELAY_S, 1), (late, SHORT_VISIBILITY_S / 2, 4)]:
        headers, body = _message(sent, "live", event.event_id)  # 1 s * 2**3 = 8 s for the late one: cut to 5 s
        assert body == event.model_dump(mode="json") and headers[tasks.FETCH_ATTEMPTS_HEADER] == attempts
        least, most = _waits(sent, headers)
        assert least <= wait_s <= most


@pytest.mark.integration
def test_malformed_events_sent_again_come_back_before_the_visibility_timeout(sent):
    headers, body = _message(sent, "live", MALFORMED["event_id"])  # a malformed event has no trustworthy source
    assert body == MALFORMED
    least, most = _waits(sent, headers)
    assert least <= SHORT_VISIBILITY_S / 2 <= most


@pytest.mark.integration
def test_each_event_is_sent_once_to_the_queue_it_came_from(sent):
    assert {source: sorted(event["event_id"] for _, event in messages)
            for source, messages in sent["queued"].items()} == {
        "live": sorted([e.event_id for e in [sent["events"]["outage"][0], *sent["events"]["not_served"]]]
                       + [MALFORMED["event_id"]]),
        "backfill": [sent["events"]["outage"][1].event_id]}
