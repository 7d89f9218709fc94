"""HMAC-SHA256 signatures on events, so workers act only on events the upload pipeline sent."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import InvalidEvent

if TYPE_CHECKING:
    from pydantic import SecretStr

    from shared.settings import Settings

SIGNATURE_FIELD = "signature"
VERSION = "v1="
MIN_KEY_BYTES = 16
# Sample values (deploy/ once shipped CHANGE_ME_TO_32_RANDOM_BYTES) pass the length check, and anyone who read
# them could sign with them.
PLACEHOLDER_MARKERS = ("change_me", "changeme", "replace-with", "example", "placeholder")
# A random key of 16 bytes or more has far more; "k" * 32 or "0123456" repeated is no secret.
MIN_DISTINCT_BYTES = 8


class SigningKeyError(ValueError):
    """The signing key settings are unusable; a worker must not start (nor run unsigned) with them."""


def canonical_bytes(payload: dict[str, Any]) -> bytes:
    """What is signed: the event without its signature, as compact JSON with sorted keys, in UTF-8."""
    unsigned = {k: v for k, v in payload.items() if k != SIGNATURE_FIELD}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def signature(payload: dict[str, Any], key: bytes) -> str:
    return VERSION + hmac.new(key, canonical_bytes(payload), hashlib.sha256).hexdigest()


def sign_event(payload: dict[str, Any], key: bytes) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise TypeError(f"an event to sign must be a dict, got {type(payload).__name__}")
    return {**payload, SIGNATURE_FIELD: signature(payload, key)}


def verify_event(payload: Any, key: bytes, *previous_keys: bytes) -> None:
    if not isinstance(payload, dict):
        raise InvalidEvent(f"malformed event: expected a JSON object, got {type(payload).__name__}")
    claimed = payload.get(SIGNATURE_FIELD)
    if claimed is None:
        raise InvalidEvent("unsigned event refused: signing is required")
    if not isinstance(claimed, str) or not claimed.startswith(VERSION):
        raise InvalidEvent(f"forged or altered event: unsupported signature format (expected {VERSION}<hex>)")
    try:
        expected = [signature(payload, k) for k in (key, *previous_keys)]
    except (TypeError, ValueError):  # e.g. a lone surrogate that has no UTF-8 form
        raise InvalidEvent("malformed event: cannot be encoded canonically for its signature") from None
    except RecursionError:  # orjson reads 1024 levels of nesting, json.dumps gives up sooner
        raise InvalidEvent("malformed event: nested too deeply to be encoded canonically for its signature") from None
    # Every key is compared, so the time taken does not tell which one nearly matched.
    matches = [hmac.compare_digest(claimed.encode(), e.encode()) for e in expected]
    if not any(matches):
        raise InvalidEvent("forged or altered event: signature mismatch")


def verification_keys(settings: Settings) -> tuple[bytes, ...]:
    """The current key, then the previous one; empty when events are not signed."""
    current = _current_key(settings)
    previous = _secret_bytes(settings.event_signing_previous_key, "LANDMARKS_EVENT_SIGNING_PREVIOUS_KEY")
    if current is None:
        if previous is not None:
            raise SigningKeyError("LANDMARKS_EVENT_SIGNING_PREVIOUS_KEY is set without a current signing key")
        return ()
    return (current,) if previous is None else (current, previous)


def signing_key(settings: Settings) -> bytes | None:
    keys = verification_keys(settings)
    return keys[0] if keys else None


def event_signer(settings: Settings) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """What every producer of ours (enqueue, backfill, demo, bench) applies to an event before sending:
    signing with the current key when one is configured, since workers then refuse unsigned events."""
    key = signing_key(settings)
    return (lambda payload: sign_event(payload, key)) if key else (lambda payload: payload)


def _current_key(settings: Settings) -> bytes | None:
    inline = _secret_bytes(settings.event_signing_key, "LANDMARKS_EVENT_SIGNING_KEY")
    path = settings.event_signing_key_file
    if path is None:
        return inline
    if inline is not None:
        raise SigningKeyError("set LANDMARKS_EVENT_SIGNING_KEY or LANDMARKS_EVENT_SIGNING_KEY_FILE, not both")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        # Never fall back to unsigned: a missing secret mount must stop the worker, not open it up.
        raise SigningKeyError(f"cannot read LANDMARKS_EVENT_SIGNING_KEY_FILE {path}: {exc.strerror}") from None
    return _checked(raw.rstrip(b"\r\n"), f"LANDMARKS_EVENT_SIGNING_KEY_FILE {path}")


def _secret_bytes(secret: SecretStr | None, name: str) -> bytes | None:
    return None if secret is None else _checked(secret.get_secret_value().encode(), name)


def weak_key_problem(key: bytes) -> str | None:
    """Why ``key`` is no secret (too short, a placeholder, too few distinct bytes), None if it may be one."""
    if len(key) < MIN_KEY_BYTES:
        return f"is shorter than {MIN_KEY_BYTES} bytes"
    lowered = key.lower()
    marker = next((m for m in PLACEHOLDER_MARKERS if m.encode() in lowered), None)
    if marker is not None:
        return f"is a placeholder (it contains {marker!r}), not a secret"
    if len(set(key)) < MIN_DISTINCT_BYTES:
        return f"has fewer than {MIN_DISTINCT_BYTES} distinct bytes, so it is not random"
    return None


def _checked(key: bytes, name: str) -> bytes:
    if (problem := weak_key_problem(key)) is not None:
        raise SigningKeyError(f"{name} {problem} (e.g. use `openssl rand -hex 32`)")
    return key
