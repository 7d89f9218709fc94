"""Every countdown a worker sends stays within half the broker's visibility timeout: a message waiting for its
countdown is held, unacknowledged, by the worker that took it, and past the timeout Redis hands a copy to a
second worker, which runs the event (and its chain of retries) a second time. (A deletion's retry: in
tests/integration/test_poison_isolation.py, since binding the Celery task configures the app.)"""

from __future__ import annotations

import uuid

import pytest

from shared.events import PhotoUploaded
from workers import tasks

SHORT_VISIBILITY_S = 10  # the lowest LANDMARKS_VISIBILITY_TIMEOUT_S allowed


def _event(photo_id: str) -> PhotoUploaded:
    return PhotoUploaded(event_id=uuid.uuid4().hex, user_id="countdown_user", photo_id=photo_id,
                         uri="file:///nowhere.jpg", uploaded_at="2026-11-27T10:00:00Z")


@pytest.fixture
def sent(monkeypatch) -> list[float]:
    """The countdowns of the messages the worker sends, under a visibility timeout of 10 s."""
    countdowns: list[float] = []
    monkeypatch.setattr(tasks, "_settings", tasks._settings.model_copy(
        update={"visibility_timeout_s": SHORT_VISIBILITY_S, "fetch_retry_delay_s": 60.0}))
    monkeypatch.setattr(tasks.app, "send_task", lambda name, *args, **options: countdowns.append(options["countdown"]))
    return countdowns


def test_a_countdown_is_at_most_half_the_visibility_timeout():
    assert tasks._bounded_countdown(900.0, 3600) == 900.0
    assert tasks._bounded_countdown(900.0, 600) == 300.0
    assert tasks._bounded_countdown(30.0, 10) == 5.0
    assert tasks._bounded_countdown(1.0, 10) == 1.0


def test_events_handed_back_after_an_outage_come_back_before_the_visibility_timeout(sent):
    tasks._hand_back([_event("a"), _event("b")], {}, "an outage")
    assert sent == [5.0, 5.0]  # not the 30 s a hand-back waits under the default timeout


def test_photos_the_storage_did_not_serve_are_fetched_again_before_the_visibility_timeout(sent):
    event = _event("flaky")
    tasks._try_fetching_later([event], {event.event_id: 3})  # 60 s * 2**3: 480 s
    assert sent == [5.0]


def test_malformed_events_sent_again_come_back_before_the_visibility_timeout(sent):
    tasks._send_malformed_again([({"event_id": "no-photo"}, "malformed event: photo_id: Field required")],
                                "an outage")
    assert sent == [5.0]
