"""Per-user authorisation: a bearer token signed with a configured key, or a trusted gateway header.

Token format: ``base64url(user_id) "." base64url(HMAC-SHA256(key, user_id))``, both without padding.
A token names exactly one user and never expires by itself: rotate the key to revoke them all (an
upstream gateway that mints short-lived tokens can add expiry in front of this service).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from shared.events import MAX_ID_LENGTH, id_problem
from shared.signing import weak_key_problem


class AuthError(Exception):
    """A request that carries no usable identity (HTTP 401)."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(key: bytes, user_id: str) -> bytes:
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).digest()


def check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes):
        raise ValueError(f"the API token key (LANDMARKS_API_TOKEN_KEY) must be bytes, got {type(key).__name__}")
    if (problem := weak_key_problem(key)) is not None:
        # A placeholder copied from an example would let anyone who read it mint a token for any user.
        raise ValueError(f"LANDMARKS_API_TOKEN_KEY {problem} (e.g. use `openssl rand -hex 32`)")
    return key


def make_token(key: bytes, user_id: str) -> str:
    """The bearer token that authorises `user_id` (and only them)."""
    check_user_id(user_id)
    return f"{_b64encode(user_id.encode('utf-8'))}.{_b64encode(_signature(check_key(key), user_id))}"


def verify_token(key: bytes, token: str) -> str:
    """The user a token authorises; AuthError if it is malformed or not signed with `key`."""
    parts = token.strip().split(".")
    if len(parts) != 2:
        raise AuthError("malformed token: expected base64url(user).base64url(signature)")
    try:
        user_id = _b64decode(parts[0]).decode("utf-8")
        signature = _b64decode(parts[1])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise AuthError("malformed token: not base64url") from None
    # Compare before looking at the user id, so a forged token learns nothing more.
    if not hmac.compare_digest(signature, _signature(key, user_id)):
        raise AuthError("invalid token signature")
    check_user_id(user_id, error=AuthError)
    return user_id


def check_user_id(user_id: str, error: type[Exception] = ValueError) -> str:
    if not user_id or len(user_id) > MAX_ID_LENGTH or id_problem(user_id) is not None:
        raise error(f"invalid user id: 1 to {MAX_ID_LENGTH} printable characters, not '.' or '..'")
    return user_id


def bearer(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer …` header, None if there is no such header."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("the Authorization header must be 'Bearer <token>'")
    return token.strip()
