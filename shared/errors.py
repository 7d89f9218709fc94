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
        super().__init__(reason)
        self.reason = reason


class InvalidEvent(PhotoError):
    stage = Stage.VALIDATE


class FetchError(PhotoError):
    stage = Stage.FETCH


class DecodeError(PhotoError):
    stage = Stage.DECODE


class InfrastructureError(Exception):
    """A shared dependency (database, broker, Milvus) is unavailable: retry the batch, never drop it."""
