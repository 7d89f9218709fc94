"""Signed events: HMAC-SHA256 over canonical JSON, the reasons for refusals, and where keys come from."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from shared.errors import InvalidEvent
from shared.events import PhotoDeleted, PhotoUploaded, parse_event
from shared.settings import Settings
from shared.signing import (
    SigningKeyError,
    canonical_bytes,
    event_signer,
    sign_event,
    signing_key,
    verification_keys,
    verify_event,
)

KEY = b"current-signing-key-5f3a9c1e7b"
OLD_KEY = b"previous-signing-key-d84e26b0"
EVENT = {"event_id": "e1", "user_id": "u1", "photo_id": "p1", "uri": "https://photos.example.com/p1.jpg",
         "uploaded_at": "2026-11-26T10:00:00Z", "gps": {"lat": 48.8584, "lon": 2.2945}, "caption": "Tour Eiffel ✓"}
DELETION = {"event_id": "e2", "user_id": "u1", "photo_id": "p1"}


def settings(**values) -> Settings:
    base = {"event_signing_key": None, "event_signing_key_file": None, "event_signing_previous_key": None}
    return Settings(**{**base, **values})


def test_sign_then_verify_round_trips() -> None:
    signed = sign_event(EVENT, KEY)
    assert signed["signature"].startswith("v1=") and len(signed["signature"]) == 3 + 64
    assert {k: v for k, v in signed.items() if k != "signature"} == EVENT
    verify_event(signed, KEY)
    verify_event(json.loads(json.dumps(signed)), KEY)  # survives the broker's JSON round trip


def test_signing_does_not_change_the_input_and_re_signing_replaces_the_signature() -> None:
    signed = sign_event(EVENT, KEY)
    assert "signature" not in EVENT
    assert sign_event(signed, KEY) == signed
    verify_event(sign_event({**signed, "signature": "v1=stale"}, KEY), KEY)


@pytest.mark.parametrize("change", [
    {"photo_id": "someone-elses"},
    {"user_id": "u2"},
    {"uri": "http://169.254.169.254/latest/meta-data/"},
    {"gps": {"lat": 48.8585, "lon": 2.2945}},
    {"extra": "added"},
])
def test_an_altered_event_is_forged(change: dict) -> None:
    altered = {**sign_event(EVENT, KEY), **change}
    with pytest.raises(InvalidEvent, match="^forged or altered event: signature mismatch$"):
        verify_event(altered, KEY)


def test_a_removed_field_is_forged() -> None:
    signed = sign_event(EVENT, KEY)
    del signed["gps"]
    with pytest.raises(InvalidEvent, match="signature mismatch"):
        verify_event(signed, KEY)


def test_another_key_is_forged() -> None:
    with pytest.raises(InvalidEvent, match="signature mismatch"):
        verify_event(sign_event(EVENT, b"x" * 32), KEY)


def test_a_missing_signature_is_refused() -> None:
    with pytest.raises(InvalidEvent, match="^unsigned event refused: signing is required$"):
        verify_event(dict(EVENT), KEY)


@pytest.mark.parametrize("claimed", ["", "deadbeef", "v2=" + "0" * 64, 42, ["v1=00"], "v1=ünïcode"])
def test_a_malformed_signature_is_forged(claimed) -> None:
    with pytest.raises(InvalidEvent, match="^forged or altered event"):
        verify_event({**EVENT, "signature": claimed}, KEY)


@pytest.mark.parametrize("payload", [[EVENT], "a string", None, 3])
def test_a_payload_that_is_not_an_object_is_malformed(payload) -> None:
    with pytest.raises(InvalidEvent, match="malformed event: expected a JSON object"):
        verify_event(payload, KEY)
    with pytest.raises(TypeError):
        sign_event(payload, KEY)


def test_canonical_form_ignores_key_order_and_the_signature() -> None:
    shuffled = dict(reversed(list(EVENT.items())))
    shuffled["gps"] = {"lon": 2.2945, "lat": 48.8584}
    assert canonical_bytes(shuffled) == canonical_bytes(EVENT) == canonical_bytes({**EVENT, "signature": "v1=x"})
    verify_event({**shuffled, "signature": sign_event(EVENT, KEY)["signature"]}, KEY)
    text = canonical_bytes(EVENT).decode()
    assert ", " not in text and ": " not in text and "✓" in text  # compact, sorted, UTF-8 not \u escapes
    assert text.startswith('{"caption":')


def test_a_payload_that_cannot_be_encoded_is_malformed() -> None:
    with pytest.raises(InvalidEvent, match="malformed event"):
        verify_event({**EVENT, "caption": "\ud800", "signature": "v1=" + "0" * 64}, KEY)


def test_the_previous_key_still_verifies() -> None:
    old = sign_event(EVENT, OLD_KEY)
    verify_event(old, KEY, OLD_KEY)
    with pytest.raises(InvalidEvent, match="signature mismatch"):
        verify_event(old, KEY)


# ---- parse_event with keys -----------------------------------------------------------------------


def test_parse_event_verifies_before_validating_when_given_keys() -> None:
    signed = sign_event(EVENT, KEY)
    assert parse_event(PhotoUploaded, signed, keys=(KEY,)).photo_id == "p1"
    assert parse_event(PhotoUploaded, json.dumps(signed), keys=(KEY,)).photo_id == "p1"
    with pytest.raises(InvalidEvent, match="unsigned event refused"):
        parse_event(PhotoUploaded, EVENT, keys=(KEY,))
    # A forged event is refused as forged even when it is also malformed.
    with pytest.raises(InvalidEvent, match="signature mismatch"):
        parse_event(PhotoUploaded, {**signed, "uri": None}, keys=(KEY,))
    deleted = sign_event(DELETION, KEY)
    assert parse_event(PhotoDeleted, deleted, keys=(OLD_KEY, KEY)).photo_id == "p1"


def test_a_signed_upload_is_no_signed_deletion() -> None:
    """The signature covers the body, not the task it is sent to: anyone who can write to the broker could
    re-send a queued upload to landmarks.photo_deleted, and the photo would be deleted."""
    upload = sign_event(EVENT, KEY)
    with pytest.raises(InvalidEvent) as info:
        parse_event(PhotoDeleted, upload, keys=(KEY,))
    assert info.value.reason.startswith("malformed event: ")
    assert "a deletion must not carry an upload's fields (uploaded_at, uri)" in info.value.reason
    # Even signed without uploaded_at, a deletion carrying the photo's storage URI is refused.
    assert "(preview_uri)" in _refusal(sign_event({**DELETION, "preview_uri": "https://x.test/p.jpg"}, KEY))
    assert parse_event(PhotoDeleted, sign_event(DELETION, KEY), keys=(KEY,)).photo_id == "p1"


def _refusal(deletion: dict) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_event(PhotoDeleted, deletion, keys=(KEY,))
    return info.value.reason


def test_without_keys_the_signature_is_ignored() -> None:
    assert parse_event(PhotoUploaded, {**EVENT, "signature": "v1=anything"}).photo_id == "p1"
    assert parse_event(PhotoUploaded, EVENT).photo_id == "p1"


# ---- keys from settings ---------------------------------------------------------------------------


def test_no_key_means_signing_is_off() -> None:
    assert verification_keys(settings()) == ()
    assert signing_key(settings()) is None


def test_inline_key_and_previous_key() -> None:
    s = settings(event_signing_key=KEY.decode(), event_signing_previous_key=OLD_KEY.decode())
    assert verification_keys(s) == (KEY, OLD_KEY)
    assert signing_key(s) == KEY


def test_key_file_with_a_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "signing-key"
    path.write_bytes(KEY + b"\n")
    s = settings(event_signing_key_file=path)
    assert verification_keys(s) == (KEY,)
    verify_event(sign_event(EVENT, signing_key(s)), *verification_keys(s))


def test_key_from_the_environment_stays_out_of_reprs(monkeypatch) -> None:
    monkeypatch.setenv("LANDMARKS_EVENT_SIGNING_KEY", "s3cr3t-" + KEY.decode())
    s = Settings()
    assert signing_key(s) == b"s3cr3t-" + KEY
    assert "s3cr3t" not in repr(s) and "s3cr3t" not in str(s.model_dump())


@pytest.mark.parametrize(("values", "words"), [
    ({"event_signing_key": "short"}, ["LANDMARKS_EVENT_SIGNING_KEY", "shorter than 16"]),
    ({"event_signing_key": ""}, ["shorter than 16"]),
    ({"event_signing_previous_key": OLD_KEY.decode()}, ["PREVIOUS_KEY", "without a current"]),
    ({"event_signing_key": KEY.decode(), "event_signing_key_file": "/run/secrets/key"}, ["not both"]),
    ({"event_signing_key_file": "/nonexistent/signing-key"}, ["cannot read", "/nonexistent/signing-key"]),
])
def test_unusable_key_settings_are_errors_not_unsigned_mode(values: dict, words: list[str]) -> None:
    with pytest.raises(SigningKeyError) as info:
        verification_keys(settings(**values))
    for word in words:
        assert word in str(info.value)


# The sample values deploy/k8s/base/secret.yaml and deploy/fleet.env.example once shipped, and keys that are no secret.
@pytest.mark.parametrize(("key", "problem"), [
    ("CHANGE_ME_TO_32_RANDOM_BYTES", "placeholder (it contains 'change_me')"),
    ("replace-with-a-random-secret-of-32-bytes", "placeholder (it contains 'replace-with')"),
    ("changeme-changeme-0123456789", "placeholder (it contains 'changeme')"),
    ("an-EXAMPLE-signing-key-0123456789", "placeholder (it contains 'example')"),
    ("Placeholder_0123456789abcdef", "placeholder (it contains 'placeholder')"),
    ("k" * 32, "fewer than 8 distinct bytes"),
    ("0123456" * 5, "fewer than 8 distinct bytes"),
])
def test_a_placeholder_or_non_random_key_is_refused_naming_its_variable(tmp_path: Path, key: str, problem: str) -> None:
    for values, variable in (({"event_signing_key": key}, "LANDMARKS_EVENT_SIGNING_KEY "),
                             ({"event_signing_key": KEY.decode(), "event_signing_previous_key": key},
                              "LANDMARKS_EVENT_SIGNING_PREVIOUS_KEY "),
                             ({"event_signing_key_file": tmp_path / "key"}, "LANDMARKS_EVENT_SIGNING_KEY_FILE ")):
        (tmp_path / "key").write_text(key + "\n")
        with pytest.raises(SigningKeyError) as info:
            verification_keys(settings(**values))
        assert str(info.value).startswith(variable) and problem in str(info.value)


def test_keys_our_tests_and_tools_generate_and_one_just_at_the_limits_are_accepted() -> None:
    import secrets
    import uuid
    for key in ("test-signing-key-" + uuid.uuid4().hex, "s3cr3t-" + KEY.decode(), secrets.token_hex(16),
                secrets.token_urlsafe(32), "01234567" * 2):
        assert verification_keys(settings(event_signing_key=key)) == (key.encode(),)


def test_an_empty_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(b"\n")
    with pytest.raises(SigningKeyError, match="shorter than 16"):
        verification_keys(settings(event_signing_key_file=tmp_path / "key"))


def test_our_producers_sign_only_when_a_key_is_configured() -> None:
    assert event_signer(settings())(EVENT) == EVENT
    signed = event_signer(settings(event_signing_key=KEY.decode()))(EVENT)
    verify_event(signed, KEY)
    assert "signature" not in EVENT


@pytest.mark.parametrize(("keys", "warned"), [((), True), ((KEY,), False)])
def test_a_worker_without_a_signing_key_says_so_once_at_start(monkeypatch, caplog, keys, warned) -> None:
    from celery import signals

    from workers import tasks
    monkeypatch.setattr(tasks, "_signing_keys", keys)
    with caplog.at_level(logging.WARNING, logger="workers.tasks"):
        signals.worker_init.send(sender=None)  # what Celery sends once, as the worker starts
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warned:
        assert len(warnings) == 1
        assert "LANDMARKS_EVENT_SIGNING_KEY" in warnings[0] and "accepts unsigned events" in warnings[0]
    else:
        assert warnings == []


def test_a_payload_nested_too_deep_to_encode_is_malformed() -> None:
    # orjson, the broker's decoder, reads 1,024 levels: json.dumps gives up at Python's recursion limit, 1,000
    # by default, but torch.compile raises it to 2,000 for the rest of the process (a full test run compiles).
    deep: list = []
    for _ in range(sys.getrecursionlimit() + 50):
        deep = [deep]
    with pytest.raises(InvalidEvent, match="^malformed event: nested too deeply to be encoded canonically"):
        verify_event({**EVENT, "x": deep, "signature": "v1=" + "0" * 64}, KEY)
