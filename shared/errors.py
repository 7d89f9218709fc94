"""Errors that end one photo's processing with a recorded reason, not the whole batch."""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    VALIDATE = "validate"
    FETCH = "fetch"
    DECODE = "decode"
    EMBED = "embed"
    SEARCH = "search"
    WRITE = "write"


class PhotoError(Exception):
    """One photo cannot be processed; the reason is stored in the failures table."""

    stage: Stage = Stage.VALIDATE

    def __init__(self, reason: str):
        reason = " ".join(str(reason).split())  # one line, whatever a library's message held
        super().__init__(reason)
        self.reason = reason


class InvalidEvent(PhotoError):
    stage = Stage.VALIDATE


class FetchError(PhotoError):
    """``transient``: the storage may answer later (refused or reset connection, timeout, HTTP 429/5xx); the
    worker tries the photo again before recording it failed. Otherwise the URI itself is at fault."""

    stage = Stage.FETCH

    def __init__(self, reason: str, *, transient: bool = False):
        super().__init__(reason)
        self.transient = transient


class DecodeError(PhotoError):
    stage = Stage.DECODE


class InfrastructureError(Exception):
    """A shared dependency (database, broker, Milvus) is unavailable: retry the batch, never drop it."""
