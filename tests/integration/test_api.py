"""The album API against a real PostgreSQL: content from the views, keyset pages, per-user authorisation,
photo bytes and class activation maps."""

from __future__ import annotations

import base64
import io
import math
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageDraw
from sqlalchemy import text

from starlette.requests import Request

from shared.api import app as api_app
from shared.api.app import ApiError, create_app, current_user, decode_cursor, encode_cursor
from shared.api.auth import make_token, verify_token, AuthError
from shared.db import writer
from shared.db.session import transaction
from shared.events import PhotoDeleted, PhotoUploaded
from shared.model import LandmarkNet, ModelMeta, save_checkpoint
from shared.outcomes import Method, PhotoOutcome, PhotoStatus, Tag
from shared.settings import Settings

pytestmark = pytest.mark.integration

KEY = b"test-key-0123456789abcdef"
VERSION = "api_test_v1"  # shared by every populate() of a test session: one active version
T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)

# Ids far from those other tests use; upserted, so populating twice is harmless.
LANDMARKS = [
    {"id": 910001, "name": "Eiffel Tower", "city": "Paris", "country": "France", "region": 1, "lat": 48.8584, "lon": 2.2945},
    {"id": 910002, "name": "Louvre Pyramid", "city": "Paris", "country": "France", "region": 1, "lat": 48.8611, "lon": 2.3358},
    {"id": 910003, "name": "Colosseum", "city": "Rome", "country": "Italy", "region": 2, "lat": 41.8902, "lon": 12.4922},
    {"id": 910004, "name": "Big Ben", "city": "London", "country": "United Kingdom", "region": 1, "lat": 51.5007, "lon": -0.1246},
    {"id": 910005, "name": "Trevi Fountain", "city": "Rome", "country": "Italy", "region": 2, "lat": 41.9009, "lon": 12.4833},
]
EIFFEL, LOUVRE, COLOSSEUM, BIG_BEN, TREVI = (lm["id"] for lm in LANDMARKS)
SKIES = {EIFFEL: (120, 170, 230), LOUVRE: (250, 190, 140), COLOSSEUM: (140, 200, 240), BIG_BEN: (170, 180, 200),
         TREVI: (120, 210, 220)}


@dataclass
class Library:
    """What populate() wrote: users, their photos (id → landmark ids), files, the checkpoint."""
    root: Path
    alice: str
    bob: str
    carol: str
    checkpoint: Path
    photos: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    uploaded: dict[str, datetime] = field(default_factory=dict)
    rotated: str = ""
    deleted: str = ""
    missing_file: str = ""

    @property
    def settings(self) -> Settings:
        return Settings(file_roots=str(self.root))


def _paint(landmark_id: int, variant: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A postcard-like picture: a sky, the ground and a silhouette per landmark."""
    w, h = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    sky = SKIES[landmark_id]
    shade = 1.0 - 0.06 * (variant % 5)
    for y in range(h):
        t = y / h
        draw.line([(0, y), (w, y)], fill=tuple(int(c * shade * (1 - 0.35 * t) + 60 * t) for c in sky))
    draw.rectangle([0, int(h * 0.78), w, h], fill=(90, 120, 80) if landmark_id != TREVI else (200, 190, 170))
    cx = int(w * (0.35 + 0.06 * (variant % 5)))
    dark = (45, 45, 60)
    if landmark_id == EIFFEL:
        draw.polygon([(cx, int(h * 0.08)), (cx - 110, int(h * 0.8)), (cx - 60, int(h * 0.8)), (cx, int(h * 0.45)),
                      (cx + 60, int(h * 0.8)), (cx + 110, int(h * 0.8))], fill=dark)
        draw.rectangle([cx - 70, int(h * 0.5), cx + 70, int(h * 0.53)], fill=dark)
    elif landmark_id == LOUVRE:
        draw.polygon([(cx, int(h * 0.25)), (cx - 170, int(h * 0.8)), (cx + 170, int(h * 0.8))], fill=(150, 180, 200),
                     outline=(70, 80, 100))
        for i in range(1, 6):
            draw.line([(cx - 170 + i * 57, int(h * 0.8)), (cx, int(h * 0.25))], fill=(90, 100, 120), width=2)
    elif landmark_id == COLOSSEUM:
        draw.ellipse([cx - 200, int(h * 0.35), cx + 200, int(h * 0.95)], fill=(190, 150, 110))
        for row in range(3):
            for i in range(9):
                x = cx - 170 + i * 40
                y = int(h * (0.42 + row * 0.1))
                draw.rectangle([x, y, x + 18, y + 28], fill=(110, 80, 60))
    elif landmark_id == BIG_BEN:
        draw.rectangle([cx - 35, int(h * 0.18), cx + 35, int(h * 0.8)], fill=(150, 120, 80))
        draw.polygon([(cx - 35, int(h * 0.18)), (cx, int(h * 0.03)), (cx + 35, int(h * 0.18))], fill=(80, 70, 60))
        draw.ellipse([cx - 25, int(h * 0.24), cx + 25, int(h * 0.24) + 50], fill=(240, 235, 210), outline=dark)
    else:
        draw.rectangle([cx - 180, int(h * 0.3), cx + 180, int(h * 0.78)], fill=(225, 215, 195))
        for i in range(5):
            draw.rectangle([cx - 160 + i * 75, int(h * 0.34), cx - 140 + i * 75, int(h * 0.7)], fill=(200, 190, 170))
        draw.ellipse([cx - 150, int(h * 0.7), cx + 150, int(h * 0.95)], fill=(80, 190, 210))
    return img


def _jpeg(path: Path, img: Image.Image, orientation: int | None = None) -> None:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=88, exif=exif.tobytes())


def populate(engine, root: Path) -> Library:
    """Landmarks, an active model version with a tiny checkpoint, and three users' tagged photos."""
    tag = uuid.uuid4().hex[:8]
    lib = Library(root=root, alice=f"alice-{tag}", bob=f"bob-{tag}", carol=f"carol-{tag}",
                  checkpoint=root / "model" / "tiny.pt")
    meta = ModelMeta(version=VERSION, backbone="tiny", embedding_dim=32, n_landmarks=3, input_size=128)
    save_checkpoint(lib.checkpoint, LandmarkNet("tiny", 32, 3).eval(), meta)

    plan: dict[str, list[tuple[str, list[int]]]] = {
        # alice: 7 Eiffel (one also shows the Louvre), 2 more Louvre, 3 Colosseum, 1 Trevi
        lib.alice: [(f"eiffel-{i}", [EIFFEL] + ([LOUVRE] if i == 3 else [])) for i in range(7)]
        + [(f"louvre-{i}", [LOUVRE]) for i in range(2)]
        + [(f"colosseum-{i}", [COLOSSEUM]) for i in range(3)]
        + [("trevi-0", [TREVI]), ("beach-0", [])],
        lib.bob: [(f"bigben-{i}", [BIG_BEN]) for i in range(2)],
        lib.carol: [("gone-0", [COLOSSEUM])],
    }
    outcomes: list[PhotoOutcome] = []
    n = 0
    for user, photos in plan.items():
        lib.photos[user] = {}
        for photo_id, landmark_ids in photos:
            n += 1
            when = T0 + timedelta(days=n, minutes=7 * n)
            if photo_id == "eiffel-5":
                when = lib.uploaded[f"{user}/eiffel-4"]  # a tie on uploaded_at: photo_id breaks it
            path = root / user / f"{photo_id}.jpg"
            orientation = 6 if photo_id == "colosseum-1" else None
            if photo_id != "gone-0":  # carol's photo is tagged but its file is gone
                _jpeg(path, _paint(landmark_ids[0] if landmark_ids else TREVI, n), orientation)
            lib.photos[user][photo_id] = landmark_ids
            lib.uploaded[f"{user}/{photo_id}"] = when
            event = PhotoUploaded(event_id=f"{tag}-{n}", user_id=user, photo_id=photo_id, uri=path.as_uri(),
                                  uploaded_at=when)
            tags = [Tag(lm, 0.9 - 0.01 * (n % 7) - 0.1 * rank, Method.GEO if n % 2 else Method.REFERENCE)
                    for rank, lm in enumerate(landmark_ids)]
            status = PhotoStatus.TAGGED if tags else PhotoStatus.NO_LANDMARK
            outcomes.append(PhotoOutcome(event=event, status=status, tags=tags))
    lib.rotated, lib.missing_file = "colosseum-1", "gone-0"
    with transaction(engine) as session:
        writer.upsert_landmarks(session, LANDMARKS)
        writer.register_model_version(session, VERSION, backbone="tiny", embedding_dim=32, t_geo=0.5, t_global=0.8,
                                      t_ref=0.7, checkpoint=str(lib.checkpoint), metrics={}, activate=True)
        writer.write_outcomes(session, VERSION, outcomes)
    # alice deletes one more Colosseum photo after it was tagged: it leaves her albums.
    extra = PhotoUploaded(event_id=f"{tag}-x", user_id=lib.alice, photo_id="colosseum-9",
                          uri=(root / lib.alice / "colosseum-0.jpg").as_uri(), uploaded_at=T0 + timedelta(days=90))
    with transaction(engine) as session:
        writer.write_outcomes(session, VERSION, [PhotoOutcome(extra, PhotoStatus.TAGGED, [Tag(COLOSSEUM, 0.99, Method.GEO)])])
        writer.delete_photo(session, PhotoDeleted(event_id=f"{tag}-d", user_id=lib.alice, photo_id="colosseum-9"))
    lib.deleted = "colosseum-9"
    return lib


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def library(engine, tmp_path_factory) -> Library:
    return populate(engine, tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def client(engine, library):
    from fastapi.testclient import TestClient

    app = create_app(library.settings, engine, token_key=KEY)
    with TestClient(app) as c:
        yield c


def auth(user: str, key: bytes = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(key, user)}"}


def _db_landmarks(engine, user: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT landmark_id, name, city, country, photo_count, cover_photo_id, latest_uploaded_at"
            " FROM album_landmarks WHERE user_id = :u ORDER BY landmark_id"), {"u": user})]


def _db_cities(engine, user: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            "SELECT country, city, landmark_count, photo_count, latest_uploaded_at FROM album_cities"
            " WHERE user_id = :u ORDER BY country, city"), {"u": user})]


def _iso(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---- ops ----------------------------------------------------------------------------------------------


def test_healthz_needs_no_token(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_openapi_schema_lists_the_api(client):
    schema = client.get("/openapi.json").json()
    paths = set(schema["paths"])
    assert {"/v1/users/{user}/attractions", "/v1/users/{user}/landmarks/{landmark_id}/photos",
            "/v1/photos/{photo_id}/image", "/v1/photos/{photo_id}/heatmap", "/healthz"} <= paths
    assert "AttractionsOut" in schema["components"]["schemas"]
    # Clients generated from the schema must parse a validation error as the API sends it.
    for path in paths - {"/healthz"}:
        for operation in schema["paths"][path].values():
            if "422" in operation["responses"]:
                assert operation["responses"]["422"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorOut"}, path
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_page_and_static_files_are_served_without_a_token(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_unknown_route_is_a_json_404(client):
    response = client.get("/v1/nope", headers=auth("x"))
    assert response.status_code == 404 and response.json()["error"] == "not_found"


# ---- albums ------------------------------------------------------------------------------------------


def test_attractions_match_the_views(client, engine, library):
    response = client.get(f"/v1/users/{library.alice}/attractions", headers=auth(library.alice))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user"] == library.alice
    db_cities, db_landmarks = _db_cities(engine, library.alice), _db_landmarks(engine, library.alice)

    # Cities ordered by (country, city), with the views' counts.
    assert [(c["country"], c["city"]) for c in body["cities"]] == [("France", "Paris"), ("Italy", "Rome")]
    assert [(c["country"], c["city"], c["landmark_count"], c["photo_count"]) for c in body["cities"]] == [
        (c["country"], c["city"], c["landmark_count"], c["photo_count"]) for c in db_cities]
    for city, db_city in zip(body["cities"], db_cities):
        assert _iso(city["latest_uploaded_at"]) == db_city["latest_uploaded_at"]

    got = {lm["landmark_id"]: lm for c in body["cities"] for lm in c["landmarks"]}
    assert set(got) == {r["landmark_id"] for r in db_landmarks} == {EIFFEL, LOUVRE, COLOSSEUM, TREVI}
    for row in db_landmarks:
        lm = got[row["landmark_id"]]
        assert (lm["name"], lm["city"], lm["country"], lm["photo_count"], lm["cover_photo_id"]) == (
            row["name"], row["city"], row["country"], row["photo_count"], row["cover_photo_id"])
        assert _iso(lm["latest_uploaded_at"]) == row["latest_uploaded_at"]
        assert lm["cover_url"] == f"/v1/photos/{row['cover_photo_id']}/image"
    # Counts as planted: a photo of two Paris landmarks counts once for the city; the deleted photo is gone.
    assert got[EIFFEL]["photo_count"] == 7 and got[LOUVRE]["photo_count"] == 3 and got[COLOSSEUM]["photo_count"] == 3
    paris = body["cities"][0]
    assert paris["photo_count"] == 9 and paris["landmark_count"] == 2
    assert [lm["landmark_id"] for lm in paris["landmarks"]] == [EIFFEL, LOUVRE]  # biggest album first


def test_a_user_without_landmarks_gets_an_empty_album(client):
    response = client.get("/v1/users/nobody/attractions", headers=auth("nobody"))
    assert response.status_code == 200 and response.json() == {"user": "nobody", "cities": []}


def test_landmark_album_pages_return_each_photo_once_newest_first(client, engine, library):
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        response = client.get(f"/v1/users/{library.alice}/landmarks/{EIFFEL}/photos", params=params,
                              headers=auth(library.alice))
        assert response.status_code == 200, response.text
        body = response.json()
        pages += 1
        assert body["landmark"]["name"] == "Eiffel Tower" and body["landmark"]["photo_count"] == 7
        assert len(body["photos"]) <= 3
        seen += body["photos"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    ids = [p["photo_id"] for p in seen]
    assert pages == 3 and len(ids) == len(set(ids)) == 7
    assert set(ids) == {pid for pid, lms in library.photos[library.alice].items() if EIFFEL in lms}
    keys = [(_iso(p["uploaded_at"]), p["photo_id"]) for p in seen]
    assert keys == sorted(keys, reverse=True)  # newest first, photo_id DESC breaks the planted tie
    with engine.connect() as conn:
        expected = conn.execute(text(
            "SELECT photo_id FROM album_photos WHERE user_id = :u AND landmark_id = :l"
            " ORDER BY uploaded_at DESC, photo_id DESC"), {"u": library.alice, "l": EIFFEL}).scalars().all()
    assert ids == expected
    assert seen[0]["image_url"] == f"/v1/photos/{seen[0]['photo_id']}/image"
    assert seen[0]["heatmap_url"] == f"/v1/photos/{seen[0]['photo_id']}/heatmap"
    assert {p["method"] for p in seen} <= {"geo", "reference"}


def test_exact_page_boundary_has_no_empty_last_page(client, library):
    first = client.get(f"/v1/users/{library.alice}/landmarks/{COLOSSEUM}/photos", params={"limit": 3},
                       headers=auth(library.alice)).json()
    assert len(first["photos"]) == 3 and first["next_cursor"] is None


def test_bad_cursor_and_limits_are_clear_errors(client, library):
    url = f"/v1/users/{library.alice}/landmarks/{EIFFEL}/photos"
    response = client.get(url, params={"cursor": "not-a-cursor"}, headers=auth(library.alice))
    assert response.status_code == 400 and response.json()["error"] == "bad_cursor"
    response = client.get(url, params={"limit": 0}, headers=auth(library.alice))
    assert response.status_code == 422 and response.json()["error"] == "invalid_request"
    assert response.json()["detail"][0]["where"] == "query.limit"
    response = client.get(f"/v1/users/{library.alice}/landmarks/{BIG_BEN}/photos", headers=auth(library.alice))
    assert response.status_code == 404 and response.json()["error"] == "album_not_found"


def test_cursor_round_trip():
    when = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert decode_cursor(encode_cursor(when, "a/b é")) == (when, "a/b é")


# ---- authorisation --------------------------------------------------------------------------------


def test_token_round_trip_and_tampering():
    token = make_token(KEY, "alice")
    assert verify_token(KEY, token) == "alice"
    user_part, signature = token.split(".")
    forged = base64.urlsafe_b64encode(b"bob").rstrip(b"=").decode() + "." + signature
    for bad in (forged, token + "x", "alice", "", "a.b.c", make_token(b"another-key-0123456789", "alice")):
        with pytest.raises(AuthError):
            verify_token(KEY, bad)
    with pytest.raises(ValueError):
        make_token(b"short", "alice")
    for unaddressable in ("..", "tab\there", "x" * 257):  # an album no browser could open
        with pytest.raises(ValueError, match="invalid user id"):
            make_token(KEY, unaddressable)


PLACEHOLDERS = [b"CHANGE_ME_TO_32_RANDOM_BYTES", b"replace-with-a-random-secret-of-32-bytes"]  # deploy/ shipped them


@pytest.mark.parametrize("key", [*PLACEHOLDERS, b"k" * 32], ids=["secret.yaml", "fleet.env.example", "one-byte"])
def test_a_placeholder_token_key_mints_no_token_and_starts_no_api(engine, library, key):
    """Anyone who read the repository could mint a token for any user with the sample key deploy/ shipped."""
    with pytest.raises(ValueError, match="^LANDMARKS_API_TOKEN_KEY (is a placeholder|has fewer than 8 distinct)"):
        make_token(key, "alice")
    with pytest.raises(ValueError, match="^LANDMARKS_API_TOKEN_KEY "):
        create_app(library.settings, engine, token_key=key)


def test_serve_refuses_the_sample_token_key_naming_the_variable(tmp_path):
    env = {**os.environ, "LANDMARKS_HOME": str(tmp_path / "home"), "LANDMARKS_API_TOKEN_KEY": PLACEHOLDERS[0].decode(),
           "LANDMARKS_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres"}
    done = subprocess.run([sys.executable, "-m", "shared.cli", "serve", "--port", "1"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "LANDMARKS_API_TOKEN_KEY is a placeholder (it contains 'change_me'), not a secret" in done.stderr


def test_missing_token_is_401(client, library):
    response = client.get(f"/v1/users/{library.alice}/attractions")
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized" and "missing bearer token" in response.json()["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_bad_signature_is_401(client, library):
    for headers in (auth(library.alice, key=b"someone-elses-key-012345"),
                    {"Authorization": "Bearer garbage"},
                    {"Authorization": f"Basic {make_token(KEY, library.alice)}"}):
        response = client.get(f"/v1/users/{library.alice}/attractions", headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"] == "unauthorized"


def test_another_users_albums_are_403(client, library):
    headers = auth(library.bob)
    for url in (f"/v1/users/{library.alice}/attractions", f"/v1/users/{library.alice}/landmarks/{EIFFEL}/photos"):
        response = client.get(url, headers=headers)
        assert response.status_code == 403 and response.json()["error"] == "forbidden"
    # bob reads his own
    body = client.get(f"/v1/users/{library.bob}/attractions", headers=headers).json()
    assert [lm["name"] for c in body["cities"] for lm in c["landmarks"]] == ["Big Ben"]


def test_another_users_photo_is_404_not_403(client, library):
    for kind in ("image", "heatmap"):
        theirs = client.get(f"/v1/photos/eiffel-0/{kind}", headers=auth(library.bob))
        nothing = client.get(f"/v1/photos/no-such-photo/{kind}", headers=auth(library.bob))
        assert theirs.status_code == nothing.status_code == 404
        assert theirs.json()["error"] == nothing.json()["error"] == "photo_not_found"
        assert theirs.json()["detail"] == "no photo 'eiffel-0' in your library"


def test_a_deleted_photo_is_gone(client, library):
    response = client.get(f"/v1/photos/{library.deleted}/image", headers=auth(library.alice))
    assert response.status_code == 404


def test_me(client, library):
    assert client.get("/v1/me", headers=auth(library.carol)).json() == {"user": library.carol}


def test_trusted_gateway_header(engine, library):
    from fastapi.testclient import TestClient

    with pytest.raises(ValueError, match="token key"):
        create_app(library.settings, engine)
    app = create_app(library.settings, engine, trusted_user_header="X-Landmarks-User")
    with TestClient(app) as c:
        ok = c.get(f"/v1/users/{library.bob}/attractions", headers={"X-Landmarks-User": library.bob})
        assert ok.status_code == 200 and ok.json()["cities"][0]["city"] == "London"
        other = c.get(f"/v1/users/{library.alice}/attractions", headers={"X-Landmarks-User": library.bob})
        assert other.status_code == 403
        # Without a key, bearer tokens are not accepted at all.
        assert c.get(f"/v1/users/{library.bob}/attractions", headers=auth(library.bob)).status_code == 401
        assert c.get(f"/v1/users/{library.bob}/attractions").status_code == 401


# ---- photos ---------------------------------------------------------------------------------------------


def test_image_is_a_jpeg_of_at_most_1024_px(client, library):
    response = client.get("/v1/photos/eiffel-0/image", headers=auth(library.alice))
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(response.content))
    assert img.format == "JPEG" and img.size == (640, 480)
    small = Image.open(io.BytesIO(client.get("/v1/photos/eiffel-0/image", params={"max_side": 200},
                                             headers=auth(library.alice)).content))
    assert max(small.size) == 200


def test_large_photo_is_resized_and_exif_orientation_applied(client, library):
    big = library.root / library.alice / "eiffel-6.jpg"
    _jpeg(big, _paint(EIFFEL, 6, size=(2400, 1600)))
    img = Image.open(io.BytesIO(client.get("/v1/photos/eiffel-6/image", headers=auth(library.alice)).content))
    assert img.size == (1024, 683)
    rotated = Image.open(io.BytesIO(client.get(f"/v1/photos/{library.rotated}/image", headers=auth(library.alice)).content))
    assert rotated.size == (480, 640)  # orientation 6: stored landscape, shown portrait


def test_unfetchable_photo_is_502(client, library):
    response = client.get(f"/v1/photos/{library.missing_file}/image", headers=auth(library.carol))
    assert response.status_code == 502 and response.json()["error"] == "photo_unavailable"
    assert str(library.root) not in response.text  # storage paths stay server-side


def test_heatmap_is_a_png_the_size_of_the_image(client, library):
    response = client.get("/v1/photos/colosseum-0/heatmap", headers=auth(library.alice))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(response.content))
    assert img.format == "PNG" and img.size == (640, 480)
    again = client.get("/v1/photos/louvre-0/heatmap", params={"max_side": 320}, headers=auth(library.alice))
    assert Image.open(io.BytesIO(again.content)).size == (320, 240)


def test_heatmap_with_an_unloadable_checkpoint_is_503(engine, library, caplog):
    from fastapi.testclient import TestClient

    with engine.begin() as conn:
        conn.execute(text("UPDATE model_versions SET checkpoint = :c WHERE version = :v"),
                     {"c": str(library.root / "missing.pt"), "v": VERSION})
    try:
        with TestClient(create_app(library.settings, engine, token_key=KEY)) as c:
            response = c.get("/v1/photos/eiffel-1/heatmap", headers=auth(library.alice))
        assert response.status_code == 503 and response.json()["error"] == "model_unavailable"
        # The loader's error names the server's path: it is logged, the user gets a generic detail.
        assert "missing.pt" not in response.text and str(library.root) not in response.text
        assert any("missing.pt" in record.getMessage() for record in caplog.records)
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE model_versions SET checkpoint = :c WHERE version = :v"),
                         {"c": str(library.checkpoint), "v": VERSION})


# Quadrants of a large picture as stored, before its EXIF orientation: a colour each.
QUADRANTS = {"top_left": (220, 30, 30), "top_right": (30, 200, 40), "bottom_left": (30, 40, 220),
             "bottom_right": (230, 220, 30)}


def _quadrants(size: tuple[int, int]) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size)
    for name, colour in QUADRANTS.items():
        left = 0 if name.endswith("left") else w // 2
        top = 0 if name.startswith("top") else h // 2
        img.paste(colour, (left, top, left + w // 2, top + h // 2))
    return img


def _save(path: Path, img: Image.Image, fmt: str, orientation: int | None = None) -> Path:
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"compress_level": 1} if fmt == "PNG" else {"quality": 90, "method": 0}
    img.save(path, format=fmt, exif=exif.tobytes(), **extra)
    return path


def _colour_at(img: Image.Image, x: float, y: float) -> tuple[int, ...]:
    return img.getpixel((int(img.width * x), int(img.height * y)))


def _close(colour: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return max(abs(a - b) for a, b in zip(colour, expected)) <= 30


# Orientation 6 is shown turned 90° clockwise, 8 counter-clockwise: where each stored corner is then seen.
SHOWN_CORNERS = {
    6: {"top_left": "top_right", "top_right": "bottom_right", "bottom_right": "bottom_left", "bottom_left": "top_left"},
    8: {"top_left": "bottom_left", "top_right": "top_left", "bottom_right": "top_right", "bottom_left": "bottom_right"},
}


@pytest.mark.parametrize(("fmt", "orientation"), [("PNG", 6), ("WEBP", 8)])
def test_a_large_rotated_non_jpeg_is_shrunk_and_still_turned(client, engine, library, fmt, orientation):
    user = f"gil-{library.alice}"
    path = _save(library.root / "extra" / uuid.uuid4().hex / f"big.{fmt.lower()}", _quadrants((6000, 4000)), fmt,
                 orientation)
    _upload(engine, library, user, "big-0", [TREVI], T0, path=path)
    response = client.get("/v1/photos/big-0/image", params={"max_side": 360}, headers=auth(user))
    assert response.status_code == 200, response.text
    img = Image.open(io.BytesIO(response.content)).convert("RGB")
    assert img.size == (240, 360)  # stored landscape, shown portrait
    for stored, shown in SHOWN_CORNERS[orientation].items():
        x = 0.25 if shown.endswith("left") else 0.75
        y = 0.25 if shown.startswith("top") else 0.75
        assert _close(_colour_at(img, x, y), QUADRANTS[stored]), (stored, shown, _colour_at(img, x, y))


# The peak resident memory of this process's own address space (VmHWM): getrusage's ru_maxrss would also
# count the forking pytest process's peak, which Linux carries across exec.
_PEAK = """
import io, re, sys
from PIL import Image
from shared.api.app import _open_image
from shared.settings import Settings

def peak_kib():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read())[1])

data = open(sys.argv[2], "rb").read()
before = peak_kib()
if sys.argv[1] == "decode":
    Image.open(io.BytesIO(data)).load()
else:
    img = _open_image(data, Settings(), 360)
    assert img.size == (360, 240) and img.mode == "RGB", (img.size, img.mode)
print(peak_kib() - before)
"""


def _peak_kib(how: str, path: Path) -> int:
    """How much a fresh process's peak memory grows (KiB) while it decodes the file at `path`."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _PEAK, how, str(path)], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(root)}, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak memory from Linux's /proc")
def test_a_large_png_costs_one_full_size_decode_not_more(tmp_path):
    path = _save(tmp_path / "big.png", _quadrants((6000, 4000)), "PNG")
    full_size_kib = 6000 * 4000 * 4 // 1024  # Pillow keeps RGB in 4 bytes a pixel
    decoded, served = _peak_kib("decode", path), _peak_kib("serve", path)
    # The decode itself is needed; turning and converting the full-size picture doubled it.
    assert served - decoded < full_size_kib // 4, (decoded, served)


def test_an_album_page_of_tiles_decodes_a_bounded_number_at_once(client, library, monkeypatch):
    active, most = 0, 0
    lock = threading.Lock()
    decode = api_app._open_image

    def slow_decode(*args, **kwargs):
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        try:
            time.sleep(0.2)  # long enough for the page's requests to overlap
            return decode(*args, **kwargs)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(api_app, "_open_image", slow_decode)
    tiles = [f"eiffel-{i}" for i in range(5)] + ["louvre-0", "louvre-1", "trevi-0"]
    with ThreadPoolExecutor(len(tiles)) as pool:
        statuses = list(pool.map(lambda p: client.get(f"/v1/photos/{p}/image", params={"max_side": 200},
                                                      headers=auth(library.alice)).status_code, tiles))
    assert statuses == [200] * len(tiles)
    assert most == api_app.MAX_CONCURRENT_DECODES  # they ran together, up to the bound and no further


def test_a_16_bit_photo_is_scaled_not_clipped_to_white(client, engine, library):
    user = f"hal-{library.alice}"
    path = library.root / "extra" / uuid.uuid4().hex / "grey16.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((300, 400), 40000, dtype=np.uint16)).save(path)  # 61% of full scale
    _upload(engine, library, user, "grey-0", [TREVI], T0, path=path)
    img = Image.open(io.BytesIO(client.get("/v1/photos/grey-0/image", headers=auth(user)).content)).convert("RGB")
    assert img.size == (400, 300) and _close(_colour_at(img, 0.5, 0.5), (156, 156, 156))


def test_photo_ids_with_slashes_and_spaces(client, engine, library):
    path = library.root / library.alice / "odd.jpg"
    _jpeg(path, _paint(TREVI, 2))
    event = PhotoUploaded(event_id=f"odd-{library.alice}", user_id=library.alice, photo_id="trip/2024 01.jpg",
                          uri=path.as_uri(), uploaded_at=T0 - timedelta(days=400))
    with transaction(engine) as session:
        writer.write_outcomes(session, VERSION, [PhotoOutcome(event, PhotoStatus.TAGGED, [Tag(TREVI, 0.5, Method.GEO)])])
    page = client.get(f"/v1/users/{library.alice}/landmarks/{TREVI}/photos", headers=auth(library.alice)).json()
    odd = [p for p in page["photos"] if p["photo_id"] == "trip/2024 01.jpg"]
    assert odd and odd[0]["image_url"] == "/v1/photos/trip%2F2024%2001.jpg/image"
    response = client.get(odd[0]["image_url"], headers=auth(library.alice))
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert math.isfinite(page["photos"][0]["score"])


# ---- malformed input is a 4xx, never a 500 ------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _upload(engine, lib: Library, user: str, photo_id: str, landmark_ids: list[int], when: datetime,
            picture: Image.Image | None = None, path: Path | None = None) -> None:
    """One photo of `user`, tagged by the active version (a re-upload when the photo exists): the file at
    `path` if given, else a JPEG of `picture`."""
    if path is None:
        path = lib.root / "extra" / uuid.uuid4().hex / f"{photo_id.replace('/', '_')}.jpg"
        _jpeg(path, picture or _paint(landmark_ids[0] if landmark_ids else TREVI, 1))
    event = PhotoUploaded(event_id=uuid.uuid4().hex, user_id=user, photo_id=photo_id, uri=path.as_uri(),
                          uploaded_at=when)
    tags = [Tag(lm, 0.8, Method.GEO) for lm in landmark_ids]
    status = PhotoStatus.TAGGED if tags else PhotoStatus.NO_LANDMARK
    with transaction(engine) as session:
        writer.write_outcomes(session, VERSION, [PhotoOutcome(event, status, tags)])


MALFORMED_CURSORS = {
    "nested": b"[" * 1100,  # json.loads: RecursionError
    "offset_out_of_years": b'["0001-01-01T00:00:00+05:00","x"]',  # before year 1 in UTC
    "nul_in_photo_id": b'["2024-01-01T00:00:00+00:00","x\\u0000"]',
    "lone_surrogate": b'["2024-01-01T00:00:00+00:00","\\ud800"]',
    "not_a_pair": b'{"a":1}',
    "number_stamp": b'[1,"x"]',
}


@pytest.mark.parametrize("raw", MALFORMED_CURSORS.values(), ids=MALFORMED_CURSORS.keys())
def test_malformed_cursors_are_400_bad_cursor(client, library, raw):
    response = client.get(f"/v1/users/{library.alice}/landmarks/{EIFFEL}/photos", params={"cursor": _b64(raw)},
                          headers=auth(library.alice))
    assert response.status_code == 400, response.text
    assert response.json() == {"error": "bad_cursor",
                               "detail": "cursor is not one this API returned; start again without it"}


def test_a_cursor_in_another_time_zone_pages_like_the_one_issued(client, library):
    """Even at an offset PostgreSQL refuses (beyond ±16 h; Python allows ±24 h): the API compares in UTC."""
    url = f"/v1/users/{library.alice}/landmarks/{EIFFEL}/photos"
    first = client.get(url, params={"limit": 2}, headers=auth(library.alice)).json()
    when, photo_id = decode_cursor(first["next_cursor"])
    shifted = when.astimezone(timezone(timedelta(hours=20, minutes=30)))
    pages = [client.get(url, params={"limit": 2, "cursor": cursor}, headers=auth(library.alice)).json()["photos"]
             for cursor in (first["next_cursor"], encode_cursor(shifted, photo_id))]
    assert pages[0] and pages[0] == pages[1]


@pytest.mark.parametrize("kind", ["image", "heatmap"])
def test_a_photo_id_postgresql_cannot_hold_is_404(client, library, kind):
    response = client.get(f"/v1/photos/eiffel-0%00x/{kind}", headers=auth(library.alice))
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "photo_not_found"


# ---- who is asking: UTF-8 user ids, user ids with "/" ------------------------------------------------------


def test_trusted_gateway_header_carries_utf8(engine, library):
    from fastapi.testclient import TestClient

    user = f"josé-{library.alice}"
    _upload(engine, library, user, "p-0", [BIG_BEN], T0)
    app = create_app(library.settings, engine, trusted_user_header="X-Landmarks-User")
    with TestClient(app) as c:
        utf8 = {"X-Landmarks-User": user.encode("utf-8")}
        assert c.get("/v1/me", headers=utf8).json() == {"user": user}
        album = c.get(f"/v1/users/{quote(user, safe='')}/attractions", headers=utf8)
        assert album.status_code == 200, album.text
        assert [city["city"] for city in album.json()["cities"]] == ["London"]
    # Bytes that are not UTF-8 (httpx would re-encode them, so the request is built by hand).
    latin1 = Request({"type": "http", "app": app, "headers": [(b"x-landmarks-user", user.encode("latin-1"))]})
    with pytest.raises(ApiError) as refused:
        current_user(latin1)
    assert (refused.value.status, refused.value.detail) == (401, "gateway header x-landmarks-user: not UTF-8")


def test_a_user_id_with_a_slash_reaches_their_albums(client, engine, library):
    user = f"team/{library.bob}"
    _upload(engine, library, user, "p/0", [EIFFEL], T0)
    path = f"/v1/users/{quote(user, safe='')}"
    album = client.get(f"{path}/attractions", headers=auth(user))
    assert album.status_code == 200, album.text
    assert album.json()["user"] == user
    assert [lm["name"] for c in album.json()["cities"] for lm in c["landmarks"]] == ["Eiffel Tower"]
    page = client.get(f"{path}/landmarks/{EIFFEL}/photos", headers=auth(user))
    assert page.status_code == 200, page.text
    assert [p["photo_id"] for p in page.json()["photos"]] == ["p/0"]
    assert client.get(page.json()["photos"][0]["image_url"], headers=auth(user)).status_code == 200
    # Still one user per request: bob is not "team/bob", nor the reverse.
    assert client.get(f"{path}/attractions", headers=auth(library.bob)).status_code == 403
    assert client.get(f"/v1/users/{library.bob}/attractions", headers=auth(user)).status_code == 403


# ---- one snapshot per Attractions page ------------------------------------------------------------------------


def test_attractions_do_not_show_a_city_committed_between_their_two_reads(client, engine, library):
    """The page reads landmark albums, then cities: a photo committed in between must not show a city
    without its landmarks (READ COMMITTED would), nor a landmark without its city."""
    from sqlalchemy import event

    user = f"erin-{library.alice}"
    _upload(engine, library, user, "paris-0", [EIFFEL], T0)
    armed = [True]

    def commit_a_rome_photo_before_the_cities(conn, cursor, statement, *args) -> None:
        if armed[0] and "album_cities" in statement:
            armed[0] = False
            _upload(engine, library, user, "rome-0", [COLOSSEUM], T0 + timedelta(days=1))

    event.listen(engine, "before_cursor_execute", commit_a_rome_photo_before_the_cities)
    try:
        during = client.get(f"/v1/users/{user}/attractions", headers=auth(user)).json()
    finally:
        event.remove(engine, "before_cursor_execute", commit_a_rome_photo_before_the_cities)
    assert not armed[0], "the Rome photo was not committed during the request"
    cards = lambda body: [(c["city"], [lm["name"] for lm in c["landmarks"]]) for c in body["cities"]]  # noqa: E731
    assert cards(during) == [("Paris", ["Eiffel Tower"])]
    after = client.get(f"/v1/users/{user}/attractions", headers=auth(user)).json()
    assert cards(after) == [("Paris", ["Eiffel Tower"]), ("Rome", ["Colosseum"])]


def test_the_snapshot_does_not_outlive_the_read(engine, database_url):
    """The pool's connection is read-write, READ COMMITTED again after a read in a snapshot."""
    from shared.db import albums
    from shared.db.session import make_engine

    one = make_engine(database_url, pool_size=1, max_overflow=0)
    try:
        with transaction(one) as session:
            albums.begin_snapshot(session)
            albums.attractions(session, "nobody")
            assert session.execute(text("SHOW transaction_isolation")).scalar() == "repeatable read"
        with transaction(one) as session:
            assert session.execute(text("SHOW transaction_isolation")).scalar() == "read committed"
            assert session.execute(text("SHOW transaction_read_only")).scalar() == "off"
    finally:
        one.dispose()


# ---- caching: the same URL, new bytes --------------------------------------------------------------------------


def test_a_reuploaded_photo_is_not_served_from_the_browser_cache(client, engine, library):
    user = f"fay-{library.alice}"
    _upload(engine, library, user, "p-0", [TREVI], T0, _paint(TREVI, 1, size=(640, 480)))
    first = client.get("/v1/photos/p-0/image", headers=auth(user))
    assert first.status_code == 200
    assert first.headers["cache-control"] == "private, no-cache" and first.headers["etag"].startswith('W/"')
    revalidate = auth(user) | {"If-None-Match": first.headers["etag"]}
    unchanged = client.get("/v1/photos/p-0/image", headers=revalidate)
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["etag"] == first.headers["etag"]

    _upload(engine, library, user, "p-0", [TREVI], T0 + timedelta(hours=1), _paint(TREVI, 1, size=(300, 400)))
    fresh = client.get("/v1/photos/p-0/image", headers=revalidate)
    assert fresh.status_code == 200 and Image.open(io.BytesIO(fresh.content)).size == (300, 400)
    assert fresh.headers["etag"] != first.headers["etag"]


def test_a_heatmap_is_not_served_from_the_browser_cache_after_a_model_switch(client, engine, library):
    first = client.get("/v1/photos/eiffel-2/heatmap", headers=auth(library.alice))
    assert first.status_code == 200 and first.headers["cache-control"] == "private, no-cache"
    revalidate = auth(library.alice) | {"If-None-Match": first.headers["etag"]}
    assert client.get("/v1/photos/eiffel-2/heatmap", headers=revalidate).status_code == 304
    with transaction(engine) as session:
        writer.register_model_version(session, f"{VERSION}_next", backbone="tiny", embedding_dim=32, t_geo=0.5,
                                      t_global=0.8, t_ref=0.7, checkpoint=str(library.checkpoint), metrics={},
                                      activate=True)
    try:
        switched = client.get("/v1/photos/eiffel-2/heatmap", headers=revalidate)
        assert switched.status_code == 200 and switched.headers["content-type"] == "image/png"
        assert switched.headers["etag"] != first.headers["etag"]
    finally:
        with transaction(engine) as session:
            writer.activate_model_version(session, VERSION)
