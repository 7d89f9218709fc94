"""PostgreSQL: schema, sessions, migrations, the tag writer and the album read side."""

from shared.db.models import Base, FailureRecord, Landmark, ModelVersion, Photo, PhotoTag, ProcessedEvent
from shared.db.session import make_engine, session_factory, transaction

__all__ = [
    "Base",
    "FailureRecord",
    "Landmark",
    "ModelVersion",
    "Photo",
    "PhotoTag",
    "ProcessedEvent",
    "make_engine",
    "session_factory",
    "transaction",
]
