"""The album read API and the Attractions web page: FastAPI over the album views (docs/albums.md).

Every /v1 request is authorised for one user (shared.api.auth): album paths must name that user (403
otherwise) and photo paths are looked up among that user's photos only (another user's photo id is a
404, so ids do not leak). Endpoints are plain `def`s: FastAPI runs them in its threadpool, on the
synchronous SQLAlchemy engine. Errors are JSON: {"error": "<code>", "detail": <message or list>}.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import numpy as np
from fastapi import Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel
from sqlalchemy import Engine, select, text
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import imaging
from shared.api.auth import AuthError, bearer, check_key, check_user_id, verify_token
from shared.db import albums
from shared.db.models import ModelVersion, Photo, PhotoTag
from shared.db.session import transaction
from shared.errors import DecodeError, FetchError, InfrastructureError
from shared.fetch import fetch_bytes
from shared.settings import Settings

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_SIDE = 1024
DEFAULT_PAGE, MAX_PAGE = 50, 200
JPEG_QUALITY = 85
# Photos this process decodes at once. An album page asks for its tiles together, and a photo in a format
# without scaled decoding (PNG, WebP, HEIC, AVIF, TIFF) is decoded at full size before it is shrunk: 4 bytes a
# pixel, and Pillow's WebP decoder holds about four such buffers (48 MP: ~740 MB). Unbounded, a page of such
# tiles took the API pod's memory many times over; the other requests wait for a slot (deploy sizes the pod for two).
MAX_CONCURRENT_DECODES = 2
_decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


# ---- response models (they document the API in /openapi.json) ---------------------------------


class LandmarkAlbumOut(BaseModel):
    landmark_id: int
    name: str
    city: str
    country: str
    photo_count: int
    cover_photo_id: str
    cover_url: str
    latest_uploaded_at: datetime | None


class CityOut(BaseModel):
    country: str
    city: str
    landmark_count: int
    photo_count: int
    latest_uploaded_at: datetime | None
    landmarks: list[LandmarkAlbumOut]


class AttractionsOut(BaseModel):
    user: str
    cities: list[CityOut]


class PhotoOut(BaseModel):
    photo_id: str
    uploaded_at: datetime
    score: float
    method: str
    rank: int
    image_url: str
    heatmap_url: str


class PhotoPageOut(BaseModel):
    user: str
    landmark: LandmarkAlbumOut
    photos: list[PhotoOut]
    next_cursor: str | None


class ErrorOut(BaseModel):
    error: str
    detail: Any = None


# 422 listed too: FastAPI would document its own validation body, which the handler below replaces.
ERRORS = {code: {"model": ErrorOut} for code in (400, 401, 403, 404, 422, 502, 503)}


# ---- helpers -------------------------------------------------------------------------------------


def photo_url(photo_id: str, kind: str = "image") -> str:
    return f"/v1/photos/{quote(photo_id, safe='')}/{kind}"


def encode_cursor(uploaded_at: datetime, photo_id: str) -> str:
    raw = json.dumps([uploaded_at.isoformat(), photo_id], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def storable(text: str) -> bool:
    """Whether PostgreSQL can hold `text` (no NUL, no lone surrogate), as it holds every id it stores.

    Anything else makes the driver raise, so callers treat it as an id that names nothing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (uploaded_at, photo_id) of a next_cursor; 400 bad_cursor unless it is well-formed."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, photo_id = json.loads(raw)  # RecursionError on deeply nested arrays
        if not isinstance(stamp, str) or not isinstance(photo_id, str) or not storable(photo_id):
            raise ValueError
        when = datetime.fromisoformat(stamp)
        if when.tzinfo is None:
            raise ValueError
        # In UTC: Python accepts offsets up to ±24 h, PostgreSQL only up to ±16 h.
        when = when.astimezone(UTC)
    except (ValueError, TypeError, OverflowError, RecursionError):  # binascii.Error is a ValueError
        raise ApiError(400, "bad_cursor", "cursor is not one this API returned; start again without it") from None
    return when, photo_id


# Image and heatmap URLs stay the same when a photo is re-uploaded or another model version becomes
# active: browsers keep the bytes but revalidate every time (no-cache), and a matching ETag is a 304
# that skips the fetch, the decode and the CAM.
def entity_tag(*parts: object) -> str:
    """A weak ETag of what a response's bytes are made from (its bytes may differ by Pillow version)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode("ascii")).hexdigest()[:32]
    return f'W/"{digest}"'


def cache_headers(etag: str) -> dict[str, str]:
    return {"Cache-Control": "private, no-cache", "ETag": etag}


def not_modified(request: Request, etag: str) -> Response | None:
    """A 304 when the request's If-None-Match names `etag` (weak comparison), else None."""
    header = request.headers.get("if-none-match")
    if header is None:
        return None
    sent = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    if "*" in sent or etag.removeprefix("W/") in sent:
        return Response(status_code=304, headers=cache_headers(etag))
    return None


def _landmark_out(lm: albums.LandmarkAlbum) -> LandmarkAlbumOut:
    return LandmarkAlbumOut(**asdict(lm), cover_url=photo_url(lm.cover_photo_id))


def _open_image(data: bytes, settings: Settings, max_side: int) -> Image.Image:
    """Decoded, EXIF-oriented RGB image with its longer side at most `max_side`."""
    return imaging.decode_for_display(data, settings.max_image_pixels, max_side)


class ModelCache:
    """The active model version's network, loaded once per version on CPU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: tuple[str, Any, Any] | None = None

    def get(self, version: str, checkpoint: str):  # noqa: ANN201
        with self._lock:
            if self._loaded is None or self._loaded[0] != version:
                from shared.model import load_checkpoint
                self._loaded = None  # drop the old version before loading the new one
                try:
                    net, meta, _ = load_checkpoint(Path(checkpoint), map_location="cpu")
                except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
                    # The error names server paths and OS details: logged for operators, not sent to users.
                    log.error("cannot load the checkpoint of model version %r: %s", version, exc)
                    raise ApiError(503, "model_unavailable",
                                   "the active model cannot be loaded; try again later") from None
                self._loaded = (version, net.eval(), meta)
            return self._loaded[1], self._loaded[2]


# ---- who is asking ---------------------------------------------------------------------------------


def current_user(request: Request) -> str:
    """The one user this request is authorised for: the trusted gateway header, else the bearer token."""
    header, token_key = request.app.state.user_header, request.app.state.token_key
    if header and (value := request.headers.get(header)) is not None:
        return header_user(header, value)
    try:
        token = bearer(request.headers.get("authorization"))
        if token is None:
            raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
        if token_key is None:
            raise AuthError("bearer tokens are not accepted here: requests come through the gateway")
        return verify_token(token_key, token)
    except AuthError as exc:
        raise ApiError(401, "unauthorized", str(exc), {"WWW-Authenticate": 'Bearer realm="landmarks"'}) from None


def header_user(header: str, value: str) -> str:
    """The user id in the gateway header. It carries UTF-8, as bearer tokens do; Starlette decodes header
    values as latin-1, so the bytes are recovered and decoded again ("josé" would read "josÃ©")."""
    try:
        return check_user_id(value.encode("latin-1").decode("utf-8").strip())
    except UnicodeDecodeError:
        raise ApiError(401, "unauthorized", f"gateway header {header}: not UTF-8") from None
    except ValueError as exc:
        raise ApiError(401, "unauthorized", f"gateway header {header}: {exc}") from None


User = Annotated[str, Depends(current_user)]


# ---- the app ---------------------------------------------------------------------------------------


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    token_key: bytes | None = None,
    trusted_user_header: str | None = None,
) -> FastAPI:
    """The API and the page. Give a token key (bearer tokens), a trusted header name (a gateway in front
    of this service sets it to the user id and strips it from client requests), or both."""
    if token_key is None and not trusted_user_header:
        raise ValueError("configure a token key (LANDMARKS_API_TOKEN_KEY) or a trusted user header "
                         "(LANDMARKS_API_USER_HEADER): every request must be authorised for one user")
    if token_key is not None:
        check_key(token_key)
    header = trusted_user_header.strip().lower() if trusted_user_header else None
    models = ModelCache()

    app = FastAPI(
        title="Landmarks album API",
        version="1",
        description="A user's Attractions album (cities → landmarks → photos), read from the album views. "
                    "Authorise with `Authorization: Bearer base64url(user).base64url(hmac_sha256(key, user))`.",
    )
    app.state.settings, app.state.engine = settings, engine
    app.state.token_key, app.state.user_header = token_key, header

    # ---- errors as JSON
    def _error(status: int, error: str, detail: Any, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.detail, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"where": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg")} for e in exc.errors()]
        return _error(422, "invalid_request", detail)

    @app.exception_handler(InfrastructureError)
    async def _infra(request: Request, exc: InfrastructureError) -> JSONResponse:
        log.warning("infrastructure error: %s", exc)
        return _error(503, "unavailable", "the album database is unavailable; try again shortly")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "internal_error", "unexpected server error")

    def same_user(user: str, authed: str) -> None:
        if user != authed:
            raise ApiError(403, "forbidden", "this token is for another user: you can read only your own albums")

    def owned_photo(authed: str, photo_id: str) -> Photo:
        """Every photo route's lookup: the user's photo, else 404 (also for ids no photo can have)."""
        photo = None
        if storable(photo_id):
            with transaction(engine) as session:
                photo = session.execute(
                    select(Photo.__table__).where(Photo.user_id == authed, Photo.photo_id == photo_id)
                ).one_or_none()
        if photo is None or photo.status == "deleted" or not photo.uri:
            raise ApiError(404, "photo_not_found", f"no photo {photo_id!r} in your library")
        return photo

    def load_image(photo: Photo, max_side: int) -> Image.Image:
        try:
            data = fetch_bytes(photo.uri, settings)
        except FetchError as exc:
            log.warning("photo %s of %s: %s", photo.photo_id, photo.user_id, exc)
            raise ApiError(502, "photo_unavailable", "the photo's bytes cannot be fetched from storage") from None
        try:
            with _decode_slots:
                return _open_image(data, settings, max_side)
        except DecodeError as exc:
            raise ApiError(502, "photo_undecodable", str(exc)) from None

    def active_model(authed: str, photo_id: str) -> tuple[Any, int | None]:
        """The active model version (version, checkpoint) and the photo's best landmark in it, if tagged."""
        with transaction(engine) as session:
            active = session.execute(
                select(ModelVersion.version, ModelVersion.checkpoint).where(ModelVersion.is_active)
            ).one_or_none()
            if active is None:
                raise ApiError(503, "no_active_model", "no model version is active: publish one first")
            top = session.scalar(
                select(PhotoTag.landmark_id)
                .where(PhotoTag.user_id == authed, PhotoTag.photo_id == photo_id,
                       PhotoTag.model_version == active.version)
                .order_by(PhotoTag.rank).limit(1)
            )
        return active, top

    # ---- routes
    @app.get("/healthz", tags=["ops"], responses={503: {"model": ErrorOut}})
    def healthz() -> dict[str, str]:
        """Liveness and database reachability (no authorisation)."""
        with transaction(engine) as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok"}

    @app.get("/v1/me", tags=["albums"], responses={401: {"model": ErrorOut}})
    def me(authed: User) -> dict[str, str]:
        """The user this request is authorised for."""
        return {"user": authed}

    # {user:path}: user ids may contain "/" (events allow it) and %2F is decoded before routing, so the
    # user is everything before the fixed suffix, as photo ids are in the photo routes.
    @app.get("/v1/users/{user:path}/attractions", response_model=AttractionsOut, tags=["albums"], responses=ERRORS)
    def attractions(user: Annotated[str, PathParam(max_length=256)], authed: User) -> AttractionsOut:
        """The Attractions album: cities (by country, city), each with its landmark albums, biggest first."""
        same_user(user, authed)
        with transaction(engine) as session:
            albums.begin_snapshot(session)  # its landmark albums and cities from one snapshot
            cities = albums.attractions(session, user)
        return AttractionsOut(user=user, cities=[
            CityOut(country=c.country, city=c.city, landmark_count=c.landmark_count, photo_count=c.photo_count,
                    latest_uploaded_at=c.latest_uploaded_at, landmarks=[_landmark_out(lm) for lm in c.landmarks])
            for c in cities
        ])

    @app.get("/v1/users/{user:path}/landmarks/{landmark_id}/photos", response_model=PhotoPageOut, tags=["albums"],
             responses=ERRORS)
    def landmark_photos(
        user: Annotated[str, PathParam(max_length=256)],
        landmark_id: int,
        authed: User,
        cursor: Annotated[str | None, Query(max_length=2048, description="next_cursor of the previous page")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
    ) -> PhotoPageOut:
        """One page of a landmark album, newest first (keyset pagination: pass `next_cursor` back)."""
        same_user(user, authed)
        after = decode_cursor(cursor) if cursor else None
        lm = albums.album_landmarks.c
        with transaction(engine) as session:
            albums.begin_snapshot(session)  # the album's photo_count and its page from one snapshot
            row = session.execute(
                select(albums.album_landmarks).where(lm.user_id == user, lm.landmark_id == landmark_id)
            ).one_or_none()
            if row is None:
                raise ApiError(404, "album_not_found", f"you have no photos of landmark {landmark_id}")
            page = albums.landmark_photos(session, user, landmark_id, limit=limit + 1, after=after)
        more = len(page) > limit
        page = page[:limit]
        landmark = albums.LandmarkAlbum(row.landmark_id, row.name, row.city, row.country, row.photo_count,
                                        row.cover_photo_id, row.latest_uploaded_at)
        return PhotoPageOut(
            user=user,
            landmark=_landmark_out(landmark),
            photos=[PhotoOut(photo_id=p.photo_id, uploaded_at=p.uploaded_at, score=p.score, method=p.method,
                             rank=p.rank, image_url=photo_url(p.photo_id), heatmap_url=photo_url(p.photo_id, "heatmap"))
                    for p in page],
            next_cursor=encode_cursor(*page[-1].cursor) if more else None,
        )

    image_responses = {**ERRORS, 200: {"content": {"image/jpeg": {}}, "description": "JPEG"}}

    @app.get("/v1/photos/{photo_id:path}/image", tags=["photos"], response_class=Response, responses=image_responses)
    def photo_image(
        photo_id: str,
        request: Request,
        authed: User,
        max_side: Annotated[int, Query(ge=32, le=MAX_SIDE, description="longest side in pixels")] = MAX_SIDE,
    ) -> Response:
        """One of your photos as JPEG, EXIF-oriented, longest side at most `max_side` (≤ 1024) pixels.

        Revalidate with If-None-Match: the ETag changes when the photo is re-uploaded."""
        photo = owned_photo(authed, photo_id)
        etag = entity_tag("image", photo.uri, photo.uploaded_at, max_side, JPEG_QUALITY)
        if (cached := not_modified(request, etag)) is not None:
            return cached
        img = load_image(photo, max_side)
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True, progressive=True)
        return Response(buffer.getvalue(), media_type="image/jpeg", headers=cache_headers(etag))

    heatmap_responses = {**ERRORS, 200: {"content": {"image/png": {}}, "description": "PNG"}}

    @app.get("/v1/photos/{photo_id:path}/heatmap", tags=["photos"], response_class=Response,
             responses=heatmap_responses)
    def photo_heatmap(
        photo_id: str,
        request: Request,
        authed: User,
        max_side: Annotated[int, Query(ge=32, le=MAX_SIDE, description="longest side in pixels")] = MAX_SIDE,
    ) -> Response:
        """The active model's class activation map over your photo, PNG (same size as /image).

        The model sees the photo's centred square; that region carries the map, the rest is dimmed.
        Revalidate with If-None-Match: the ETag changes with the photo and with the active model version."""
        photo = owned_photo(authed, photo_id)
        active, top = active_model(authed, photo_id)
        etag = entity_tag("heatmap", photo.uri, photo.uploaded_at, max_side, active.version, top)
        if (cached := not_modified(request, etag)) is not None:
            return cached
        net, meta = models.get(active.version, active.checkpoint)
        png = heatmap_png(net, meta, load_image(photo, max_side), landmark_id=top)
        return Response(png, media_type="image/png", headers=cache_headers(etag))

    # ---- the page
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def heatmap_png(net: Any, meta: Any, img: Image.Image, landmark_id: int | None = None) -> bytes:
    """CAM over the model's centre crop of `img`, blended onto `img` (outside the crop dimmed)."""
    from shared.cam import class_activation_map, overlay_png

    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    size = int(meta.input_size)
    pixels = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)
    class_index = None
    # A checkpoint that records its classes' landmark ids gets the map of the photo's tagged landmark.
    classes = (meta.extra or {}).get("class_landmark_ids")
    if landmark_id is not None and isinstance(classes, list) and landmark_id in classes:
        class_index = classes.index(landmark_id)
    cam = class_activation_map(net, pixels, meta.mean, meta.std, class_index=class_index)
    return overlay_png(np.asarray(img, dtype=np.uint8), cam, box=box)
