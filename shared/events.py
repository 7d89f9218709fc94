"""Upload pipeline event schemas (version 1) and their validation."""

from __future__ import annotations

import hashlib
import json
import math
import re
import reprlib
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from shared.errors import InvalidEvent
from shared.signing import verify_event

MAX_ID_LENGTH = 256
MAX_URI_LENGTH = 4096
UPLOADED_YEARS = (1970, 2200)


class GeoPoint(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    lat: float = Field(ge=-90.0, le=90.0)
    lon: float = Field(ge=-180.0, le=180.0)

    @field_validator("lat", "lon")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @property
    def is_null_island(self) -> bool:
        # Cameras without a fix often write 0/0; nobody photographs landmarks there.
        return self.lat == 0.0 and self.lon == 0.0


def _no_nul(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL: one such id would fail its whole batch's transaction.
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


# One search instead of a Python step per character: every event's ids pass here (2 of the 5 µs it takes to read one).
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a user or photo id, None if it can. Both are path segments of the album API's
    URLs: a control character makes the photo's links unroutable, and browsers drop a "." or ".." segment."""
    if _CONTROL_CHARACTER.search(value):
        return "must not contain control characters"
    if value in (".", ".."):
        return f"cannot be {value!r} (browsers drop such a path segment)"
    return None


def _addressable(value: str) -> str:
    if (problem := id_problem(value)) is not None:
        raise ValueError(problem)
    return value


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    event_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    user_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    photo_id: str = Field(min_length=1, max_length=MAX_ID_LENGTH)

    _ids_without_nul = field_validator("event_id", "user_id", "photo_id")(_no_nul)


class PhotoUploaded(_Event):
    # Not on deletions: a photo stored before this rule must still be deletable.
    _ids_in_album_urls = field_validator("user_id", "photo_id")(_addressable)

    uri: str = Field(min_length=1, max_length=MAX_URI_LENGTH)
    uploaded_at: datetime
    content_type: str | None = Field(None, max_length=255)
    gps: GeoPoint | None = None
    preview_uri: str | None = Field(None, max_length=MAX_URI_LENGTH)

    _uris_without_nul = field_validator("uri", "preview_uri")(_no_nul)

    @field_validator("uploaded_at")
    @classmethod
    def _plausible_time(cls, value: datetime) -> datetime:
        # Year 1 or 9999 with an offset lands outside what Python can read back from PostgreSQL.
        if not UPLOADED_YEARS[0] <= value.year <= UPLOADED_YEARS[1]:
            raise ValueError(f"year {value.year} is outside {UPLOADED_YEARS[0]}-{UPLOADED_YEARS[1]}")
        # Without an offset it is read as UTC (docs/events.md): left naive, PostgreSQL would read it in its
        # session's time zone, and comparing it with an aware time of the same photo fails the batch.
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


# Fields only an upload has. A signature covers the whole body, not the task it was sent to: a deletion carrying
# them may be a signed upload re-sent to landmarks.photo_deleted by anyone who can write to the broker.
UPLOAD_ONLY_FIELDS = ("uri", "preview_uri", "uploaded_at")


class PhotoDeleted(_Event):
    @model_validator(mode="wrap")
    @classmethod
    def _not_an_upload(cls, data: Any, handler: Any) -> PhotoDeleted:
        deleted = handler(data)  # a missing or bad id is reported first, as on any deletion
        carried = sorted(f for f in UPLOAD_ONLY_FIELDS if isinstance(data, dict) and f in data)
        if carried:
            raise PydanticCustomError(
                "upload_fields_on_deletion",
                "a deletion must not carry an upload's fields ({fields}): refused as a possible upload sent "
                "as a deletion", {"fields": ", ".join(carried)})
        return deleted


E = TypeVar("E", bound=_Event)


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        where = ".".join(str(p) for p in item["loc"]) or "event"
        parts.append(f"{where}: {item['msg']}")
    return "malformed event: " + "; ".join(parts)


def parse_event(kind: type[E], payload: Any, *, keys: Sequence[bytes] = ()) -> E:
    """With ``keys`` (current first), the payload must carry a valid signature from one of them."""
    if isinstance(payload, (str, bytes)):
        try:
            payload = json.loads(payload)
        except ValueError as exc:
            raise InvalidEvent(f"malformed event: not JSON ({exc})") from None
        except RecursionError:  # a string may nest deeper than json.loads walks
            raise InvalidEvent("malformed event: JSON nested too deeply") from None
    if not isinstance(payload, dict):
        raise InvalidEvent(f"malformed event: expected a JSON object, got {type(payload).__name__}")
    if keys:
        verify_event(payload, *keys)
    try:
        return kind.model_validate(payload)
    except ValidationError as exc:
        raise InvalidEvent(_describe(exc)) from None


def event_key(payload: Any) -> str:
    """A stable key for any payload, even one without a usable event_id (for dead letters)."""
    if isinstance(payload, dict):
        event_id = payload.get("event_id")
        if isinstance(event_id, str) and 0 < len(event_id) <= MAX_ID_LENGTH:
            return event_id
    try:
        raw = json.dumps(payload, sort_keys=True, default=str)
    except (TypeError, ValueError, RecursionError):  # e.g. nested deeper than json.dumps walks
        raw = payload_summary(payload)
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


# repr() recurses as deep as the payload nests (RecursionError); this stops at a fixed depth and length.
_SUMMARY = reprlib.Repr()
_SUMMARY.maxlevel, _SUMMARY.maxdict, _SUMMARY.maxlist, _SUMMARY.maxtuple = 8, 32, 32, 32
_SUMMARY.maxstring, _SUMMARY.maxlong, _SUMMARY.maxother = 256, 64, 64


def payload_summary(payload: Any) -> str:
    """A bounded, deterministic text for a payload JSON cannot carry (dict keys sorted, deep levels elided)."""
    return _SUMMARY.repr(payload)


def safe_field(payload: Any, name: str) -> str | None:
    """A field of a possibly malformed payload, only if it is a sane string (for failure rows)."""
    value = payload.get(name) if isinstance(payload, dict) else None
    return value if isinstance(value, str) and len(value) <= MAX_ID_LENGTH else None
