"""What recognition decided for one photo: the record the tag writer stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from shared.errors import Stage
from shared.events import GeoPoint, PhotoUploaded


class PhotoStatus(StrEnum):
    PENDING = "pending"
    TAGGED = "tagged"
    NO_LANDMARK = "no_landmark"
    FAILED = "failed"
    DELETED = "deleted"


class Method(StrEnum):
    GEO = "geo"              # accepted inside the 1x1 km square with t_geo
    REFERENCE = "reference"  # no GPS: passed t_global and reference verification t_ref


class GpsSource(StrEnum):
    EXIF = "exif"
    EVENT = "event"


@dataclass(frozen=True)
class Tag:
    landmark_id: int
    score: float
    method: Method


@dataclass(frozen=True)
class Failure:
    stage: Stage
    reason: str
    transient: bool = False  # the storage may answer later (shared.errors.FetchError)


@dataclass
class PhotoOutcome:
    event: PhotoUploaded
    status: PhotoStatus
    tags: list[Tag] = field(default_factory=list)  # best first
    failure: Failure | None = None
    gps: GeoPoint | None = None
    gps_source: GpsSource | None = None
