"""The v1 event contract: required fields, ignored extras, clear reasons for malformed events."""

import sys
from datetime import datetime, timedelta, timezone

import pytest

from shared.errors import InvalidEvent
from shared.events import PhotoDeleted, PhotoUploaded, event_key, parse_event

GOOD = {"event_id": "e1", "user_id": "u1", "photo_id": "p1", "uri": "file:///x.jpg",
        "uploaded_at": "2026-11-26T10:00:00Z"}


def test_a_valid_event_parses_and_unknown_fields_are_ignored():
    event = parse_event(PhotoUploaded, {**GOOD, "future_field": {"x": 1}, "gps": {"lat": 1.5, "lon": -2}})
    assert event.photo_id == "p1" and event.gps.lat == 1.5


@pytest.mark.parametrize("payload, words", [
    ({k: v for k, v in GOOD.items() if k != "uri"}, ["uri", "required"]),
    ({**GOOD, "user_id": 42}, ["user_id"]),
    ({**GOOD, "user_id": "x" * 1_000_000}, ["user_id", "256"]),
    ({**GOOD, "uploaded_at": "yesterday"}, ["uploaded_at"]),
    ({**GOOD, "gps": {"lat": 91, "lon": 0}}, ["gps.lat"]),
    ({**GOOD, "gps": {"lat": float("nan"), "lon": 0}}, ["gps.lat"]),
    ({**GOOD, "photo_id": "line\nbreak"}, ["photo_id", "control characters"]),
    ({**GOOD, "user_id": ".."}, ["user_id", "browsers drop"]),
    ({**GOOD, "photo_id": "."}, ["photo_id", "browsers drop"]),
    ([GOOD], ["JSON object"]),
    ("{not json", ["not JSON"]),
])
def test_malformed_events_get_a_clear_reason(payload, words):
    with pytest.raises(InvalidEvent) as info:
        parse_event(PhotoUploaded, payload)
    assert info.value.reason.startswith("malformed event")
    for word in words:
        assert word in info.value.reason


@pytest.mark.parametrize("stamp", ["2026-11-26T10:00:00", "2026-11-26"])
def test_an_upload_time_without_an_offset_is_utc(stamp):
    # Left naive, PostgreSQL would read it in its session's zone, and a naive and an aware time of the
    # same photo in one batch could not even be compared.
    event = parse_event(PhotoUploaded, {**GOOD, "uploaded_at": stamp})
    assert event.uploaded_at.utcoffset() == timedelta(0)
    assert event.uploaded_at == datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc)
    aware = parse_event(PhotoUploaded, {**GOOD, "uploaded_at": "2026-11-26T12:00:00+02:00"})
    assert aware.uploaded_at.utcoffset() == timedelta(hours=2)


def test_deleted_event_needs_only_ids():
    assert parse_event(PhotoDeleted, {"event_id": "e", "user_id": "u", "photo_id": "p"}).photo_id == "p"


@pytest.mark.parametrize("field, value", [("uri", "file:///x.jpg"), ("preview_uri", None),
                                          ("uploaded_at", "2026-11-26T10:00:00Z")])
def test_a_deletion_carrying_an_upload_field_is_malformed(field, value):
    """A signature covers the body, not the task: a signed upload sent as a deletion must not delete."""
    with pytest.raises(InvalidEvent) as info:
        parse_event(PhotoDeleted, {"event_id": "e", "user_id": "u", "photo_id": "p", field: value})
    assert info.value.reason == (f"malformed event: event: a deletion must not carry an upload's fields ({field}): "
                                 "refused as a possible upload sent as a deletion")
    with pytest.raises(InvalidEvent, match=r"upload's fields \(uploaded_at, uri\)"):
        parse_event(PhotoDeleted, GOOD)
    # A deletion's own problems are reported as before.
    with pytest.raises(InvalidEvent, match="^malformed event: photo_id: Field required$"):
        parse_event(PhotoDeleted, {k: v for k, v in GOOD.items() if k != "photo_id"})


def test_a_photo_stored_under_an_id_uploads_now_refuse_can_still_be_deleted():
    for photo_id in (".", "tab\there"):
        assert parse_event(PhotoDeleted, {"event_id": "e", "user_id": "u", "photo_id": photo_id}).photo_id == photo_id


def test_event_key_is_the_event_id_or_a_stable_hash():
    assert event_key(GOOD) == "e1"
    odd = {"user_id": "u", "x": [1, 2]}
    assert event_key(odd) == event_key(dict(reversed(list(odd.items())))) != event_key({"user_id": "v"})
    assert event_key({"event_id": "x" * 10_000}).startswith("sha256:")


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_json_nested_deeper_than_python_reads_is_malformed():
    with pytest.raises(InvalidEvent, match="^malformed event: JSON nested too deeply$"):
        parse_event(PhotoUploaded, "[" * 100_000 + "]" * 100_000)


def test_event_key_of_a_payload_nested_deeper_than_json_dumps_walks():
    # orjson, the broker's decoder, reads 1,024 levels: json.dumps gives up at the recursion limit (1,000 unless
    # a library loaded earlier in the run raised it).
    depth = sys.getrecursionlimit() + 50
    key = event_key({"user_id": "u", "x": nested(depth)})
    assert key.startswith("sha256:") and key == event_key({"x": nested(depth), "user_id": "u"})
    assert key != event_key({"user_id": "v", "x": nested(depth)})
