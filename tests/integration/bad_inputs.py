"""The bad-input corpus of tests/integration/test_bad_inputs.py: hostile and odd photo files, URIs and raw
event payloads, each with the outcome the fleet owes it: a recorded failure whose reason names the problem,
or processed (an odd but valid photo is recognised like any other photo, never a crash)."""

from __future__ import annotations

import io
import json
import os
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

import shared.imaging  # noqa: F401  (registers the HEIF/AVIF opener and saver of pillow-heif)
from shared.events import event_key

UPLOADED, DELETED = "landmarks.photo_uploaded", "landmarks.photo_deleted"
# The worker of the test runs with these limits (LANDMARKS_FETCH_MAX_BYTES, LANDMARKS_FETCH_TIMEOUT_S).
FETCH_MAX_BYTES = 5 * 1024 * 1024
FETCH_TIMEOUT_S = 2
# A fetch the storage may answer later is tried again this often, after this long (LANDMARKS_FETCH_RETRIES,
# LANDMARKS_FETCH_RETRY_DELAY_S), before the photo is recorded as failed.
FETCH_RETRIES = 1
FETCH_RETRY_DELAY_S = 0.5
# An HTTP handler that stalls or drips holds its socket this long at most, so the test ends promptly.
SERVER_HOLD_S = 8.0


# ---- what each input must end as --------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    outcome: str  # "failure" | "processed"
    stage: str | None = None  # of a failure: validate | fetch | decode
    words: tuple[str, ...] = ()  # each in the failure reason, case-insensitive
    landmark: bool = False  # processed and tagged with the landmark of the good photo it shows
    no_gps: bool = False  # processed, with no position recorded (0/0, NaN or out-of-range GPS)


def failure(stage: str, *words: str) -> Expect:
    return Expect("failure", stage, words)


def processed(*, landmark: bool = False, no_gps: bool = False) -> Expect:
    return Expect("processed", landmark=landmark, no_gps=no_gps)


# ---- what goes on the wire ---------------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """A task's positional and keyword arguments, exactly as the producer passes them to send_task."""

    args: list
    kwargs: dict
    task: str = UPLOADED

    @property
    def payload(self) -> Any:
        """What the worker parses, after kombu's JSON round trip (mirrors workers.tasks._payload)."""
        args, kwargs = json.loads(json.dumps(self.args)), json.loads(json.dumps(self.kwargs))
        if len(args) == 1 and not kwargs:
            return args[0]
        if not args and set(kwargs) == {"event"}:
            return kwargs["event"]
        return {"_args": args, "_kwargs": kwargs}


@dataclass
class Ctx:
    root: Path  # the worker's file root: generated files are written here
    outside: Path  # a folder outside every file root, holding a real photo
    user: str
    good: Path  # a photo the model tags with its landmark
    http: str  # base URL of the test's HTTP server on 127.0.0.1


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Ctx], Send]
    expect: Expect


@dataclass
class Item:
    name: str
    send: Send
    expect: Expect

    @property
    def key(self) -> str:
        """The failures row's event_key (the writer stores NUL as U+FFFD)."""
        return event_key(self.send.payload).replace("\x00", "\ufffd")

    @property
    def event_id(self) -> str | None:
        payload = self.send.payload
        if isinstance(payload, str):  # the worker also takes an event as a JSON string
            try:
                payload = json.loads(payload)
            except ValueError:
                return None
        value = payload.get("event_id") if isinstance(payload, dict) else None
        return value.replace("\x00", "\ufffd") if isinstance(value, str) else None


def upload(ctx: Ctx, uri: str, **fields: Any) -> dict:
    return {"event_id": uuid.uuid4().hex, "user_id": ctx.user, "photo_id": uuid.uuid4().hex[:12], "uri": uri,
            "uploaded_at": "2026-11-26T10:00:00Z", **fields}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:60]


def file_case(name: str, make: Callable[[], bytes], expect: Expect, suffix: str = ".jpg", **fields: Any) -> Case:
    """A generated file under the file root, sent as an otherwise valid upload."""
    def build(ctx: Ctx) -> Send:
        path = ctx.root / f"{_slug(name)}{suffix}"
        path.write_bytes(make())
        return Send([upload(ctx, path.as_uri(), **fields)], {})
    return Case(name, build, expect)


def uri_case(name: str, uri: Callable[[Ctx], str], expect: Expect) -> Case:
    return Case(name, lambda ctx: Send([upload(ctx, uri(ctx))], {}), expect)


def event_case(name: str, change: Callable[[dict], Any], expect: Expect, task: str = UPLOADED) -> Case:
    """A valid upload of the good photo, changed by ``change`` (which returns the payload to send)."""
    return Case(name, lambda ctx: Send([change(upload(ctx, ctx.good.as_uri()))], {}, task), expect)


def raw_case(name: str, send: Callable[[Ctx], Send], expect: Expect) -> Case:
    return Case(name, send, expect)


def with_fields(**fields: Any) -> Callable[[dict], dict]:
    return lambda event: {**event, **fields}


def without(*names: str) -> Callable[[dict], dict]:
    return lambda event: {k: v for k, v in event.items() if k not in names}


# ---- image bytes ---------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(width: int = 160, height: int = 120) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def jpeg() -> bytes:
    return encode(gradient(), "JPEG", quality=90)


def png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose IHDR claims another size, with a correct CRC: only the header lies."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 header claims another size."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def corrupt_scan() -> bytes:
    """A JPEG whose entropy-coded scan data is overwritten with a byte ramp."""
    data = jpeg()
    start = data.index(b"\xff\xda") + 20
    return data[:start] + bytes(range(256)) * 3 + data[start + 768:]


def sixteen_bit_png() -> bytes:
    array = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    return encode(Image.fromarray(array), "PNG")


def palette_png_with_transparency() -> bytes:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 20, 40))
    return encode(img, "PNG", transparency=1)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("RGB", (40, 40), (0, 255, 0))]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_jpeg(*, gps: dict | None = None, orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    if gps is not None:
        exif.get_ifd(0x8825).update(gps)
    return encode(gradient(), "JPEG", exif=exif.tobytes(), quality=90)


def big_exif(fmt: str, size: int = 1024 * 1024) -> bytes:
    """A photo carrying a 1 MB EXIF block (an ImageDescription); JPEG's APP1 stops at 64 KB, PNG/WebP do not."""
    exif = Image.Exif()
    exif[0x010E] = "x" * size
    return encode(gradient(), fmt, exif=exif.tobytes())


def corrupt_exif_jpeg() -> bytes:
    """A valid JPEG with an APP1 'Exif' segment of garbage right after SOI."""
    data = jpeg()
    garbage = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + bytes(range(200))
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage + data[2:]


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HTML = b"<!doctype html><html><head><title>Photo</title></head><body><img src=x.jpg></body></html>"
TEXT = b"this is a plain text file that pretends to be a photo\n"


# ---- the corpus -------------------------------------------------------------------------------------

_NULL_ISLAND = {1: "N", 2: (0.0, 0.0, 0.0), 3: "E", 4: (0.0, 0.0, 0.0)}
_NAN_GPS = {1: "N", 2: (IFDRational(0, 0), 0.0, 0.0), 3: "E", 4: (IFDRational(1, 0), 0.0, 0.0)}
_FAR_GPS = {1: "N", 2: (95.0, 0.0, 0.0), 3: "E", 4: (200.0, 0.0, 0.0)}
_ODD = "\u200f\u05e9\u05dc\u05d5\u05dd\u200d\U0001f469\u200d\U0001f4bb\ufeff\u202e"  # RTL, ZWJ, emoji, BOM, RLO


def _fifo(ctx: Ctx) -> str:
    os.mkfifo(ctx.root / "fifo.jpg")
    return (ctx.root / "fifo.jpg").as_uri()


def _link(ctx: Ctx, name: str, target: Path) -> str:
    (ctx.root / name).symlink_to(target)
    return (ctx.root / name).as_uri()


def _sparse(ctx: Ctx) -> str:
    path = ctx.root / "six_megabytes.jpg"
    with path.open("wb") as fh:
        fh.write(jpeg())
        fh.truncate(FETCH_MAX_BYTES + 1024 * 1024)
    return path.as_uri()


def _padded(uri: str, length: int) -> str:
    """``uri`` made ``length`` characters long with short path segments (no name over NAME_MAX)."""
    uri += "/segment" * ((length - len(uri)) // 8)
    return uri + "x" * (length - len(uri))


def _directory(ctx: Ctx) -> str:
    (ctx.root / "a_folder.jpg").mkdir()
    return (ctx.root / "a_folder.jpg").as_uri()


FILE_CASES = [
    file_case("zero bytes", lambda: b"", failure("decode", "not an image", "empty")),
    file_case("truncated JPEG", lambda: jpeg()[: len(jpeg()) // 2], failure("decode", "corrupt image", "truncated")),
    file_case("corrupt entropy data", corrupt_scan, failure("decode", "corrupt image")),
    file_case("random bytes after JPEG magic", lambda: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8,
              failure("decode", "image")),
    file_case("PNG bomb header 60000x60000", lambda: png_claiming(60000, 60000),
              failure("decode", "decompression bomb"), suffix=".png"),
    file_case("JPEG bomb header 65000x65000", lambda: jpeg_claiming(65000, 65000),
              failure("decode", "decompression bomb"), ),
    file_case("PNG header larger than its data", lambda: png_claiming(500, 500), failure("decode", "corrupt image"),
              suffix=".png"),
    file_case("truncated HEIC", lambda: encode(gradient(), "HEIF")[:300], failure("decode", "image"), suffix=".heic"),
    file_case("PDF posing as JPEG", lambda: PDF, failure("decode", "not an image")),
    file_case("HTML posing as JPEG", lambda: HTML, failure("decode", "not an image")),
    file_case("text posing as PNG", lambda: TEXT, failure("decode", "not an image"), suffix=".png"),
    file_case("SVG posing as image", lambda: b"<svg xmlns='http://www.w3.org/2000/svg'/>",
              failure("decode", "not an image")),
    file_case("EPS posing as image", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n", failure("decode", "not an image")),
    file_case("PDF sent as content_type image/jpeg", lambda: PDF, failure("decode", "not an image"),
              content_type="image/jpeg"),
    # Odd but valid: decode_image converts every mode to RGB and takes an animation's first frame.
    file_case("CMYK JPEG", lambda: encode(Image.new("CMYK", (80, 60), (0, 255, 255, 0)), "JPEG"), processed()),
    file_case("16-bit PNG", sixteen_bit_png, processed(), suffix=".png"),
    file_case("grayscale JPEG", lambda: encode(gradient().convert("L"), "JPEG"), processed()),
    file_case("grayscale PNG", lambda: encode(gradient().convert("L"), "PNG"), processed(), suffix=".png"),
    file_case("1-bit PNG", lambda: encode(gradient().convert("1"), "PNG"), processed(), suffix=".png"),
    file_case("palette PNG with transparency", palette_png_with_transparency, processed(), suffix=".png"),
    file_case("RGBA PNG", lambda: encode(gradient().convert("RGBA"), "PNG"), processed(), suffix=".png"),
    file_case("animated GIF", lambda: animated("GIF"), processed(), suffix=".gif"),
    file_case("animated WebP", lambda: animated("WEBP"), processed(), suffix=".webp"),
    file_case("animated PNG", lambda: animated("PNG"), processed(), suffix=".png"),
    file_case("HEIC", lambda: encode(gradient(), "HEIF", quality=80), processed(), suffix=".heic"),
    file_case("AVIF", lambda: encode(gradient(), "AVIF", quality=80), processed(), suffix=".avif"),
    file_case("BMP", lambda: encode(gradient(), "BMP"), processed(), suffix=".bmp"),
    file_case("TIFF", lambda: encode(gradient(), "TIFF"), processed(), suffix=".tif"),
    file_case("progressive JPEG", lambda: encode(gradient(), "JPEG", progressive=True), processed()),
    # Pillow reads a PNG eXIf / WebP EXIF chunk of any size; a broken EXIF costs GPS, never the photo.
    file_case("1 MB EXIF block in PNG", lambda: big_exif("PNG"), processed(), suffix=".png"),
    file_case("1 MB EXIF block in WebP", lambda: big_exif("WEBP"), processed(), suffix=".webp"),
    file_case("corrupt EXIF block", corrupt_exif_jpeg, processed()),
    file_case("EXIF GPS 0/0", lambda: exif_jpeg(gps=_NULL_ISLAND), processed(no_gps=True)),
    file_case("EXIF GPS NaN (0/0 rationals)", lambda: exif_jpeg(gps=_NAN_GPS), processed(no_gps=True)),
    file_case("EXIF GPS out of range (95N 200E)", lambda: exif_jpeg(gps=_FAR_GPS), processed(no_gps=True)),
    file_case("EXIF orientation 9 (invalid)", lambda: exif_jpeg(orientation=9), processed()),
    file_case("EXIF orientation 6", lambda: exif_jpeg(orientation=6), processed()),
]

URI_CASES = [
    uri_case("missing file", lambda ctx: (ctx.root / "never_written.jpg").as_uri(), failure("fetch", "file not found")),
    uri_case("file over the size limit", _sparse, failure("fetch", "too large")),
    uri_case("a directory", _directory, failure("fetch", "not a regular file")),
    uri_case("a FIFO", _fifo, failure("fetch", "not a regular file")),
    uri_case(".. traversal out of the root", lambda ctx: f"file://{ctx.root}/../{ctx.outside.name}/photo.jpg",
             failure("fetch", "outside the allowed roots")),
    uri_case("%2e%2e traversal out of the root", lambda ctx: f"file://{ctx.root}/%2e%2e/{ctx.outside.name}/photo.jpg",
             failure("fetch", "outside the allowed roots")),
    uri_case("symlink to a file outside the root", lambda ctx: _link(ctx, "link_out.jpg", ctx.outside / "photo.jpg"),
             failure("fetch", "outside the allowed roots")),
    uri_case("symlink to a folder outside the root",
             lambda ctx: _link(ctx, "dir_out", ctx.outside) + "/photo.jpg",
             failure("fetch", "outside the allowed roots")),
    uri_case("symlink loop", lambda ctx: _link(ctx, "loop.jpg", ctx.root / "loop.jpg"), failure("fetch", "loop")),
    uri_case("/etc/passwd", lambda ctx: "file:///etc/passwd", failure("fetch", "outside the allowed roots")),
    uri_case("file URI naming a remote host", lambda ctx: "file://fileserver/share/photo.jpg",
             failure("fetch", "remote host")),
    uri_case("relative file URI", lambda ctx: "file:photo.jpg", failure("fetch", "absolute path")),
    uri_case("plain path without a scheme", lambda ctx: str(ctx.good), failure("fetch", "unsupported uri scheme")),
    uri_case("ftp://", lambda ctx: "ftp://127.0.0.1/photo.jpg", failure("fetch", "unsupported uri scheme", "ftp")),
    uri_case("s3://", lambda ctx: "s3://bucket/photo.jpg", failure("fetch", "unsupported uri scheme", "s3")),
    uri_case("data: URI", lambda ctx: "data:image/jpeg;base64,/9j/4AAQ", failure("fetch", "unsupported uri scheme")),
    uri_case("javascript: URI", lambda ctx: "javascript:alert(1)", failure("fetch", "unsupported uri scheme")),
    uri_case("gopher://", lambda ctx: "gopher://127.0.0.1:70/1", failure("fetch", "unsupported uri scheme")),
    uri_case("malformed IPv6 host", lambda ctx: "http://[::1/photo.jpg", failure("fetch", "malformed uri")),
    uri_case("URI of 4096 characters", lambda ctx: _padded((ctx.root / "deep").as_uri(), 4096),
             failure("fetch", "file not found")),
    # A preview is fetched instead of the original; one that cannot be used for good is no reason to fail the
    # photo, whose original is fetched in its place.
    Case("preview_uri used instead of the original",
         lambda ctx: Send([upload(ctx, (ctx.root / "original_gone.jpg").as_uri(), preview_uri=ctx.good.as_uri())], {}),
         processed(landmark=True)),
    Case("preview_uri with an unsupported scheme: the original is used",
         lambda ctx: Send([upload(ctx, ctx.good.as_uri(), preview_uri="ftp://127.0.0.1/p.jpg")], {}),
         processed(landmark=True)),
    Case("preview_uri not made yet: the original is used",
         lambda ctx: Send([upload(ctx, ctx.good.as_uri(), preview_uri=(ctx.root / "no_preview.jpg").as_uri())], {}),
         processed(landmark=True)),
    Case("preview_uri and uri both missing",
         lambda ctx: Send([upload(ctx, (ctx.root / "gone.jpg").as_uri(), preview_uri=(ctx.root / "no.jpg").as_uri())], {}),
         failure("fetch", "file not found", "gone.jpg")),
    uri_case("NUL inside the file URI", lambda ctx: ctx.good.as_uri() + "\x00.jpg", failure("validate", "uri")),
]

HTTP_CASES = [
    uri_case("http photo", lambda ctx: f"{ctx.http}/good.jpg", processed(landmark=True)),
    uri_case("http server stalls", lambda ctx: f"{ctx.http}/stall", failure("fetch", "timed out")),
    uri_case("http body drips past the deadline", lambda ctx: f"{ctx.http}/drip", failure("fetch", "timed out")),
    uri_case("http oversize body (Content-Length)", lambda ctx: f"{ctx.http}/big", failure("fetch", "too large")),
    uri_case("http oversize body (streamed)", lambda ctx: f"{ctx.http}/big-stream", failure("fetch", "too large")),
    uri_case("http 404", lambda ctx: f"{ctx.http}/missing.jpg", failure("fetch", "http 404")),
    uri_case("http 503 once, then served", lambda ctx: f"{ctx.http}/flaky.jpg", processed(landmark=True)),
    uri_case("http 503 every time", lambda ctx: f"{ctx.http}/unavailable.jpg", failure("fetch", "http 503")),
    # A preview its storage does not serve now is tried again like any photo; on its last attempt it is no
    # reason to fail the photo: the original is fetched in its place, and only a failure of the original is
    # the photo's.
    Case("preview_uri answered 503 every time: the original is used on the last attempt",
         lambda ctx: Send([upload(ctx, ctx.good.as_uri(), preview_uri=f"{ctx.http}/preview-unavailable.jpg")], {}),
         processed(landmark=True)),
    Case("preview_uri answered 503 every time, original 404: the original's failure is recorded",
         lambda ctx: Send([upload(ctx, f"{ctx.http}/missing-original.jpg",
                                  preview_uri=f"{ctx.http}/preview-unavailable-too.jpg")], {}),
         failure("fetch", "http 404", "missing-original.jpg")),
    uri_case("http HTML served as image/jpeg", lambda ctx: f"{ctx.http}/page", failure("decode", "not an image")),
    uri_case("http redirect to file://", lambda ctx: f"{ctx.http}/to-file",
             failure("fetch", "redirect", "file:///etc/passwd")),
    uri_case("http redirect to 10.0.0.1", lambda ctx: f"{ctx.http}/to-private", failure("fetch", "refused", "private")),
    uri_case("http 10.0.0.1 (SSRF)", lambda ctx: "http://10.0.0.1/x.jpg", failure("fetch", "refused", "private")),
    uri_case("http 169.254.169.254 (cloud metadata)", lambda ctx: "http://169.254.169.254/latest/meta-data/",
             failure("fetch", "refused", "link-local")),
    uri_case("http [::ffff:10.0.0.1]", lambda ctx: "http://[::ffff:10.0.0.1]/x.jpg",
             failure("fetch", "refused", "private")),
    uri_case("http 0.0.0.0", lambda ctx: "http://0.0.0.0/x.jpg", failure("fetch", "refused", "unspecified")),
    uri_case("http connection refused", lambda ctx: f"http://127.0.0.1:{_closed_port()}/x.jpg",
             failure("fetch", "cannot fetch")),
    uri_case("https to a plain-http server", lambda ctx: ctx.http.replace("http:", "https:") + "/good.jpg",
             failure("fetch", "cannot fetch")),
]


def _closed_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _args(*args: Any, **kwargs: Any) -> Callable[[Ctx], Send]:
    """Raw task arguments; a "GOOD" placeholder becomes a valid upload of the good photo."""
    def build(ctx: Ctx) -> Send:
        fill = lambda v: upload(ctx, ctx.good.as_uri()) if v == "GOOD" else v  # noqa: E731
        return Send([fill(a) for a in args], {k: fill(v) for k, v in kwargs.items()})
    return build


EVENT_CASES = [
    event_case("missing uri", without("uri"), failure("validate", "uri", "required")),
    event_case("missing uploaded_at", without("uploaded_at"), failure("validate", "uploaded_at", "required")),
    event_case("missing event_id", without("event_id"), failure("validate", "event_id", "required")),
    event_case("missing user_id and photo_id", without("user_id", "photo_id"),
               failure("validate", "user_id", "photo_id")),
    event_case("empty object", lambda e: {}, failure("validate", "event_id", "required")),
    event_case("user_id is a number", with_fields(user_id=42), failure("validate", "user_id", "string")),
    event_case("event_id is null", with_fields(event_id=None), failure("validate", "event_id")),
    event_case("uri is a list", lambda e: {**e, "uri": [e["uri"]]}, failure("validate", "uri")),
    event_case("gps is a string", with_fields(gps="48.85,2.29"), failure("validate", "gps")),
    event_case("gps lat NaN", with_fields(gps={"lat": float("nan"), "lon": 2.0}), failure("validate", "gps.lat")),
    event_case("gps lon Infinity", with_fields(gps={"lat": 1.0, "lon": float("inf")}), failure("validate", "gps.lon")),
    event_case("gps lat 91", with_fields(gps={"lat": 91, "lon": 0}), failure("validate", "gps.lat", "90")),
    event_case("gps lon -181", with_fields(gps={"lat": 0, "lon": -181}), failure("validate", "gps.lon", "180")),
    event_case("uploaded_at 'yesterday'", with_fields(uploaded_at="yesterday"), failure("validate", "uploaded_at")),
    event_case("1 MB user_id", with_fields(user_id="u" * 1024 * 1024), failure("validate", "user_id", "256")),
    event_case("uri of 5000 characters", lambda e: {**e, "uri": e["uri"] + "x" * 5000},
               failure("validate", "uri", "4096")),
    event_case("content_type of 300 characters", with_fields(content_type="image/" + "j" * 300),
               failure("validate", "content_type", "255")),
    event_case("content_type is a number", with_fields(content_type=42), failure("validate", "content_type")),
    event_case("whitespace-only user_id", with_fields(user_id=" \t "), failure("validate", "user_id")),
    event_case("NUL inside a malformed event", lambda e: {**without("uri")(e), "user_id": "a\x00b", "note": "\x00"},
               failure("validate", "uri", "required")),
    raw_case("payload is a list", _args(["GOOD"]), failure("validate", "json object", "list")),
    raw_case("payload is not JSON", _args("{not json"), failure("validate", "not json")),
    raw_case("payload is a number", _args(42), failure("validate", "json object", "int")),
    raw_case("payload is null", _args(None), failure("validate", "json object", "nonetype")),
    raw_case("extra positional argument", _args("GOOD", "extra"), failure("validate", "event_id", "required")),
    raw_case("unknown keyword argument", _args("GOOD", priority="high"), failure("validate", "event_id", "required")),
    raw_case("no arguments at all", _args(), failure("validate", "event_id", "required")),
    Case("deletion without photo_id", lambda ctx: Send([without("photo_id")(upload(ctx, "x"))], {}, DELETED),
         failure("validate", "photo_id", "required")),
    Case("deletion payload is a list", lambda ctx: Send([[1, 2]], {}, DELETED), failure("validate", "json object")),
    # Odd but valid events: processed like any other (the photo is the good one, so it is tagged).
    event_case("content_type text/html on a JPEG", with_fields(content_type="text/html"), processed(landmark=True)),
    event_case("NUL inside content_type", with_fields(content_type="image/jpeg\x00"), processed(landmark=True)),
    event_case("event gps 0/0 (no fix)", with_fields(gps={"lat": 0.0, "lon": 0.0}),
               processed(landmark=True, no_gps=True)),
    event_case("RTL marks, ZWJ and emoji in ids", lambda e: {**e, "user_id": e["user_id"] + _ODD,
                                                           "photo_id": _ODD + e["photo_id"]}, processed(landmark=True)),
    event_case("256 emoji as photo_id", with_fields(photo_id="\U0001f5fc" * 256), processed(landmark=True)),
    event_case("unknown extra fields", with_fields(future={"nested": [1, 2]}, x=None), processed(landmark=True)),
    event_case("uploaded_at as epoch seconds", with_fields(uploaded_at=1764151200), processed(landmark=True)),
    # Refused: stored, they would be years Python cannot read back from PostgreSQL (0 BC, 10000 AD).
    event_case("uploaded_at in year 1, UTC+14", with_fields(uploaded_at="0001-01-01T00:00:00+14:00"),
               failure("validate", "uploaded_at")),
    event_case("uploaded_at in year 9999, UTC-12", with_fields(uploaded_at="9999-12-31T23:59:59-12:00"),
               failure("validate", "uploaded_at")),
    raw_case("event as a JSON string", lambda ctx: Send([json.dumps(upload(ctx, ctx.good.as_uri()))], {}),
             processed(landmark=True)),
    raw_case("event as keyword argument", _args(event="GOOD"), processed(landmark=True)),
    event_case("NUL inside user_id", lambda e: {**e, "user_id": e["user_id"] + "\x00"}, failure("validate", "user_id")),
    event_case("NUL inside photo_id", lambda e: {**e, "photo_id": "\x00" + e["photo_id"]},
               failure("validate", "photo_id")),
    event_case("NUL inside event_id", lambda e: {**e, "event_id": e["event_id"] + "\x00"},
               failure("validate", "event_id")),
    # The album's links would not route (a newline) or a browser would drop the segment ("..").
    event_case("newline inside photo_id", lambda e: {**e, "photo_id": "line\nbreak"}, failure("validate", "photo_id")),
    event_case("user_id '..'", with_fields(user_id=".."), failure("validate", "user_id")),
    Case("deletion with NUL inside user_id",
         lambda ctx: Send([{"event_id": uuid.uuid4().hex, "user_id": ctx.user + "\x00", "photo_id": "p"}], {}, DELETED),
         failure("validate", "user_id")),
]

CASES = FILE_CASES + URI_CASES + HTTP_CASES + EVENT_CASES


def build(ctx: Ctx) -> list[Item]:
    return [Item(c.name, c.build(ctx), c.expect) for c in CASES]
