"""workers/broker.loads: the standard JSON decoder where kombu's object hook would change nothing, kombu's
where it would."""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timezone

import pytest
from kombu.utils.json import dumps, loads as kombu_loads

from workers.broker import loads

MESSAGES = [
    {"body": "eyJhIjogMX0=", "headers": {"task": "landmarks.photo_uploaded", "retries": 0, "eta": None},
     "properties": {"delivery_tag": "abc", "delivery_info": {"exchange": "", "routing_key": "q"}}},
    [[{"event_id": "e1", "gps": {"lat": 48.85, "lon": 2.29}}], {}, {"chain": None}],
    {"taken_at": datetime(2026, 11, 27, tzinfo=timezone.utc), "id": uuid.UUID(int=7), "raw": b"\x00\xff"},
    {"caption": "Kölner Dom", "note": "a \"quoted\" __type__ in a string"},
]


@pytest.mark.parametrize("message", MESSAGES)
def test_decodes_what_kombu_encoded_as_kombu_does(message):
    text = dumps(message)
    assert loads(text) == kombu_loads(text) == message
    assert loads(text.encode()) == message  # bodies can arrive as bytes


def test_an_escaped_type_marker_is_still_read_by_kombus_hook():
    text = '{"\\u005f_type__": "datetime", "__value__": "2026-11-27T00:00:00+00:00"}'
    assert loads(text) == kombu_loads(text) == datetime(2026, 11, 27, tzinfo=timezone.utc)


def test_plain_json_is_read_without_the_hook():
    assert loads(json.dumps({"a": [1, 2.5, None, True]})) == {"a": [1, 2.5, None, True]}


def test_what_python_encodes_and_orjson_refuses_is_still_read():
    """Python's encoder writes NaN and Infinity; a message holding them still decodes (the event's
    validation then refuses what it must) instead of failing at every redelivery."""
    decoded = loads(b'{"lat": NaN, "lon": Infinity}')
    assert math.isnan(decoded["lat"]) and decoded["lon"] == math.inf


def test_an_integer_past_64_bits_arrives_as_the_nearest_float():
    """No field of a message or an event is such a number; one that a broken producer sends decodes (a
    malformed event is then recorded) rather than blocking its batch."""
    assert loads('{"id": 123456789012345678901234567890}') == {"id": 1.2345678901234568e29}


def test_a_message_in_a_memoryview_decodes_and_broken_json_is_an_error():
    assert loads(memoryview(b'{"a": [1, 2]}')) == {"a": [1, 2]}
    with pytest.raises(ValueError):
        loads(b'{"a": ')
