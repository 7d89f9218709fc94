"""A batch that fails with an unexpected error (not an outage) is retried event by event: the poisonous
event is recorded as a failure with its reason, its batch-mates are processed, nothing loops forever."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from shared.events import PhotoUploaded
from shared.settings import get_settings

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


def _event(photo_id: str) -> PhotoUploaded:
    return PhotoUploaded(event_id=uuid.uuid4().hex, user_id="poison_user", photo_id=photo_id,
                         uri="file:///nowhere.jpg", uploaded_at="2026-11-27T10:00:00Z")


def test_one_poisonous_event_is_recorded_and_its_batch_mates_processed(tasks, engine, monkeypatch):
    processed, handed_back = [], []

    def process(events: list[PhotoUploaded]) -> None:
        if any(e.photo_id == "poison" for e in events):
            raise ValueError("A string literal cannot contain NUL (0x00) characters.")
        processed.extend(e.photo_id for e in events)

    monkeypatch.setattr(tasks, "_process", process)
    monkeypatch.setattr(tasks, "_hand_back", handed_back.extend)
    batch = [_event("a"), _event("poison"), _event("b"), _event("c")]
    tasks._process_or_isolate(batch)
    assert processed == ["a", "b", "c"] and handed_back == []
    with engine.connect() as conn:
        reason = conn.scalar(sa.text("SELECT reason FROM failures WHERE event_key = :k"),
                             {"k": batch[1].event_id})
    assert reason.startswith("processing failed unexpectedly: ValueError: A string literal cannot contain NUL")


def test_an_outage_still_hands_the_whole_batch_back(tasks, monkeypatch):
    from shared.errors import InfrastructureError
    handed_back = []
    monkeypatch.setattr(tasks, "INFRA_RETRY_S", 0.0)
    monkeypatch.setattr(tasks, "_process", lambda events: (_ for _ in ()).throw(InfrastructureError("Milvus down")))
    monkeypatch.setattr(tasks, "_hand_back", handed_back.extend)
    batch = [_event("x"), _event("y")]
    tasks._process_or_isolate(batch)
    assert handed_back == batch
