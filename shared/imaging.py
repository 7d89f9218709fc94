"""Photo bytes → model-ready square RGB pixels plus EXIF GPS; every bad input is a DecodeError."""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pillow_heif
from PIL import Image, UnidentifiedImageError

from shared.errors import DecodeError
from shared.events import GeoPoint

try:
    from PIL import AvifImagePlugin
except ImportError:  # Pillow before 11.2 opens no AVIF of its own
    AvifImagePlugin = None

pillow_heif.register_heif_opener()
# _open checks every photo against the worker's own limit (LANDMARKS_MAX_IMAGE_PIXELS); Pillow's fixed one
# would refuse photos above 179 MP whatever the setting says, and warn on stderr above 89 MP.
Image.MAX_IMAGE_PIXELS = None

# Only formats photos arrive in: Image.open would otherwise also try EPS (runs Ghostscript) and friends.
# MPO (multi-picture JPEG) has no opener of its own; the JPEG opener returns it.
Image.init()
FORMATS = tuple(f for f in ("JPEG", "PNG", "WEBP", "GIF", "HEIF", "AVIF", "BMP", "TIFF") if f in Image.OPEN)
_JPEG_FORMATS = ("JPEG", "MPO")
# A progressive JPEG is decoded scan by scan, and real ones have about 10. A file of thousands of repeated
# scans, a few bytes each, held a decode process for minutes (2.9 MB: 74 s); it is refused from its bytes.
MAX_JPEG_SCANS = 100
_BOX_FORMATS = ("HEIF", "AVIF")  # ISO base media files: a sequence of sized boxes
# A HEIF thumbnail stands in for the image only if it is at least this many times the model's input on each
# side: the last resample is then a real reduction, as Pillow's own thumbnail() has it (its reducing_gap),
# so the input is as sharp as the full image's. A thumbnail only just above the input is visibly softer.
HEIF_THUMBNAIL_GAP = 2

# What Pillow and pillow_heif raise on corrupt or truncated data.
_DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error,
    TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError, RuntimeError,
)
# What odd EXIF can raise while we read it.
_EXIF_ERRORS = (
    ValueError, TypeError, ZeroDivisionError, KeyError, IndexError, AttributeError,
    OverflowError, struct.error, OSError, SyntaxError, EOFError, UnicodeError,
)

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_GPS_IFD = 0x8825
_ORIENTATION = 0x0112


@dataclass
class DecodedImage:
    # (size, size, 3) uint8 RGB from the CPU; from a device decoder (shared/device_decode.py) a torch tensor
    # (3, size, size) on the model's device, which this module never imports.
    pixels: np.ndarray | Any
    gps: GeoPoint | None
    width: int  # of the original image, after EXIF orientation
    height: int
    format: str


@dataclass
class EncodedJpeg:
    """A JPEG left whole for a device decoder (shared/device_decode.py): its bytes and what its header says.
    The header is read on the CPU, so the photo's GPS, size and bomb check do not depend on the decoder.
    ``data`` is bytes, or a uint8 array when the pool handed it over in shared memory (shared/spill.py)."""
    data: bytes | np.ndarray
    gps: GeoPoint | None
    width: int  # after EXIF orientation, as DecodedImage's
    height: int
    orientation: int  # EXIF 1..8: the device decoder applies it to the pixels


def probe_jpeg(data: bytes, *, max_pixels: int, progressive: bool) -> EncodedJpeg | None:
    """The photo as an EncodedJpeg when a device JPEG decoder can take it: a JPEG in RGB or greyscale, and
    progressive only if ``progressive``. None for everything else (other formats, CMYK), which the CPU
    decodes. Raises DecodeError as decode_image does (unreadable header, decompression bomb)."""
    img = _open(data, max_pixels)
    if img.format not in _JPEG_FORMATS or img.mode not in ("RGB", "L"):
        return None
    if img.info.get("progressive") and not progressive:
        return None
    if not _scan_is_closed(data):
        return None  # cut short: Pillow says so, where a GPU codec may fill in the rest and go on
    exif = _exif(img)
    orientation = _orientation(exif)
    width, height = img.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return EncodedJpeg(data, exif_gps(exif), width, height, orientation)


def _scan_is_closed(data: bytes) -> bool:
    """Whether the end-of-image marker (FF D9) follows the JPEG's last start-of-scan (FF DA). A file cut
    short in transit has none there: the one in its EXIF thumbnail comes before its scans, and coded data
    never holds either pair. Data appended after the end (a second picture, a phone's trailer) is allowed,
    unless it holds FF DA itself: that photo goes to the pool, as a cut one does (a BlackBerry's, among the
    real photos of the tests). Almost every file ends with the marker, so the search runs only for the
    others."""
    if data.endswith(b"\xff\xd9"):
        return True
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda")


def one_thread_per_decode() -> None:
    """For a pool that already runs a decode on every core (shared/loading.py): libheif would split each
    HEIC's tiles over threads of its own (pillow_heif's DECODE_THREADS, 4), and Pillow's AVIF decoder a photo
    over one thread per core; under a full pool those threads only take turns on the cores. The real photos'
    decodes took about an eighth more CPU that way (BENCHMARKS.md, twenty-sixth session)."""
    pillow_heif.options.DECODE_THREADS = 1
    if AvifImagePlugin is not None:
        AvifImagePlugin.DEFAULT_MAX_THREADS = 1


def decode_image(data: bytes, *, size: int, max_pixels: int) -> DecodedImage:
    img = _open(data, max_pixels)
    fmt = img.format or "unknown"
    width, height = img.size
    if fmt in _BOX_FORMATS and not _boxes_are_whole(data):
        raise DecodeError("corrupt image: truncated HEIF (its last box ends past the end of the file)")
    exif = _exif(img)
    # Pillow turns a TIFF itself (its size at open is already turned); pillow_heif clears the tag.
    orientation = 1 if fmt == "TIFF" else _orientation(exif)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    try:
        if fmt in _JPEG_FORMATS:
            # DCT scaling: decode at 1/2, 1/4 or 1/8 scale, never below `size` on either side.
            img.draft("RGB", (size, size))
        elif fmt == "HEIF":
            # A phone's HEIC embeds a thumbnail (an iPhone's: 320x240): decoded instead of the 12 MP image
            # when it is a scaled copy (pillow_heif checks crop, rotation, colour profile) at least
            # HEIF_THUMBNAIL_GAP times `size` on each side: a few ms against about 300 (HEVC has no
            # reduced-scale decode; `landmarks bench --size real` reports the cost by format).
            img.draft("RGB", (size * HEIF_THUMBNAIL_GAP, size * HEIF_THUMBNAIL_GAP))
        img.load()
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        pixels = _square_rgb(img, size)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise DecodeError(f"corrupt image: {_message(exc)}") from None
    return DecodedImage(pixels, exif_gps(exif), width, height, fmt)


def _open(data: bytes, max_pixels: int) -> Image.ImageFile.ImageFile:
    if len(data) == 0:  # bytes, or a uint8 array (a JPEG handed back by the device decoder)
        raise DecodeError("not an image: empty data")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise DecodeError("not an image: unrecognised format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise DecodeError(f"corrupt image: {_message(exc)}") from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise DecodeError(f"corrupt image: size {width}x{height}")
    # Checked from the header alone, before any pixel is decoded.
    if width * height > max_pixels:
        raise DecodeError(
            f"decompression bomb: {width}x{height} pixels exceeds limit {max_pixels}"
        )
    # Baseline JPEGs, the most photos by far, are decoded in one pass: only progressive ones are counted.
    if img.format in _JPEG_FORMATS and img.info.get("progressive"):
        scans = _scan_count(data)
        if scans > MAX_JPEG_SCANS:
            raise DecodeError(
                f"decompression bomb: {scans} scans in a progressive JPEG exceeds limit {MAX_JPEG_SCANS}"
            )
    return img


def _scan_count(data: bytes | np.ndarray) -> int:
    """Start-of-scan markers (FF DA) in a JPEG. Coded data never holds the pair (an FF there is followed by
    00), so only an embedded thumbnail's few scans are counted beside the photo's."""
    return (data if isinstance(data, bytes) else bytes(data)).count(b"\xff\xda")


def _boxes_are_whole(data: bytes) -> bool:
    """Whether every top-level box of an ISO base media file (HEIF, AVIF) ends within the data. A HEIC cut
    short in transit decodes without an error, its missing tiles made up, so the cut is found here."""
    offset, end = 0, len(data)
    while end - offset >= 8:
        size = int.from_bytes(data[offset:offset + 4], "big")
        if size == 1 and end - offset >= 16:  # a 64-bit size follows the type
            size = int.from_bytes(data[offset + 8:offset + 16], "big")
        elif size == 0:  # the box runs to the end of the file
            return True
        if size < 8 or offset + size > end:
            return not _box_type(data[offset + 4:offset + 8])  # bytes after the last box are no box cut short
        offset += size
    return True


def _box_type(raw: bytes) -> bool:
    """Whether four bytes read as a box type (ftyp, meta, mdat...): printable ASCII."""
    return all(32 <= b < 127 for b in raw)


def _exif(img: Image.Image) -> Image.Exif | None:
    try:
        return img.getexif()
    except _EXIF_ERRORS:
        return None  # Broken EXIF costs us orientation and GPS, not the photo.


def _orientation(exif: Image.Exif | None) -> int:
    try:
        value = exif.get(_ORIENTATION, 1) if exif is not None else 1
        return value if isinstance(value, int) else 1
    except _EXIF_ERRORS:
        return 1


def _square_rgb(img: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 RGB of the image's centre square."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        # Resized in its own mode, then scaled: scaled first, a 100 MP 16-bit image cost 2 GB of int64.
        small = Image.fromarray(_to_uint8(np.asarray(_square(img, size))), "L")
        return np.array(small.convert("RGB"), dtype=np.uint8)
    if _has_alpha(img):
        # Composited after the resize (Pillow resizes RGBA premultiplied), so a 100 MP PNG costs one full-size
        # copy, not four.
        small = _square(img if mode == "RGBA" else img.convert("RGBA"), size)
        return np.array(_over_white(small).convert("RGB"), dtype=np.uint8)
    return np.array(_square(img if img.mode == "RGB" else img.convert("RGB"), size), dtype=np.uint8)


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _over_white(rgba: Image.Image) -> Image.Image:
    """Transparent pixels over white: they would otherwise show whatever colour they happen to store."""
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    # 16-bit (and 32-bit 'I' holding 16-bit PNG data): scale 0..65535 to 0..255 instead of clipping.
    if array.dtype.kind == "f":
        return np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    wide = np.clip(array.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _square(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`, centre crop, in one resample."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)
    # Pillow cannot reduce() 16-bit modes; resampled in one step they cost no more (measured: faster).
    reducing_gap = None if img.mode.startswith("I;16") else 3.0
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=reducing_gap)


def _message(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def exif_gps(exif: Mapping[int, Any] | Image.Exif | None) -> GeoPoint | None:
    """GPS from a Pillow Exif (or a plain {tag: value} GPS IFD); None when absent or implausible."""
    try:
        gps = _gps_ifd(exif)
        if not gps:
            return None
        if _text(gps.get(9)) == "V":
            return None  # GPSStatus "void": the receiver had no fix, the position is a stale one
        lat = _coordinate(gps.get(2), gps.get(1), positive="N", negative="S")
        lon = _coordinate(gps.get(4), gps.get(3), positive="E", negative="W")
        if lat is None or lon is None or (lat == 0.0 and lon == 0.0):
            return None  # 0/0 is what cameras without a fix write.
        return GeoPoint(lat=lat, lon=lon)  # validates range and finiteness
    except _EXIF_ERRORS:  # pydantic's ValidationError is a ValueError
        return None


def _gps_ifd(exif: Any) -> Mapping[int, Any] | None:
    if exif is None:
        return None
    if isinstance(exif, Image.Exif):
        return exif.get_ifd(_GPS_IFD)
    nested = exif.get(_GPS_IFD)
    return nested if isinstance(nested, Mapping) else exif


def _coordinate(value: Any, ref: Any, *, positive: str, negative: str) -> float | None:
    degrees = _dms(value)
    if degrees is None:
        return None
    ref = _text(ref)
    if ref == positive or (ref == "" and degrees == 0.0):  # the equator needs no N or S
        return degrees
    if ref == negative:
        return -degrees
    # A reference missing, or neither N/S (E/W), leaves the sign unknown: read as N and E, a photo of Sydney
    # would be placed off Japan, over the event's own (right) position.
    return None


def _text(value: Any) -> str | None:
    """An EXIF ASCII tag, stripped and upper-cased: "" when absent, None when it is not text."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return value.strip("\x00 ").upper() if isinstance(value, str) else None


def _dms(value: Any) -> float | None:
    parts = value if isinstance(value, (tuple, list)) else (value,)
    if value is None or isinstance(value, (str, bytes)) or not 1 <= len(parts) <= 3:
        return None
    # Some cameras write minutes or seconds they do not have as 0/0: that is 0, not an unknown position.
    numbers = [float(parts[0])] + [0.0 if _zero_over_zero(p) else float(p) for p in parts[1:]]
    if not all(math.isfinite(n) and n >= 0 for n in numbers):
        return None
    return sum(n / 60**i for i, n in enumerate(numbers))


def _zero_over_zero(value: Any) -> bool:
    """An EXIF rational 0/0 (Pillow's IFDRational reads it as NaN)."""
    return getattr(value, "numerator", None) == 0 and getattr(value, "denominator", None) == 0


# --- photos shown to people (the album API): any size, oriented, 8-bit RGB ------------------------------

def decode_for_display(data: bytes, max_pixels: int, max_side: int) -> Image.Image:
    """Decoded, EXIF-oriented RGB image with its longer side at most ``max_side``; DecodeError otherwise.

    Shrunk as it is decoded (JPEG) or right after (other formats), and only then turned and converted: each
    of those copies the whole image, which at full size doubled a large photo's memory."""
    try:
        img = _open(data, max_pixels)  # size and scan limits, from the header alone
        # Read before shrinking, from the header; Pillow turns a TIFF's pixels by its tag itself as it loads them.
        orientation = 1 if img.format == "TIFF" else _orientation(_exif(img))
        img = _shrunk(img, max_side)
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        return _flat_rgb(img)
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on corrupt data
        raise DecodeError(f"corrupt image: {type(exc).__name__}: {exc}"[:300]) from None


def _shrunk(img: Image.Image, max_side: int) -> Image.Image:
    """``img`` with its longer side at most ``max_side``, in its own mode. The box is square, so it is the same
    bound whether or not the EXIF orientation turns the image by 90° afterwards."""
    if img.format in _JPEG_FORMATS:
        img.draft("RGB", (max_side, max_side))  # DCT scaling: never below max_side
    if img.mode in ("P", "PA", "1"):
        # Resampled in these modes, pixels would be picked, not averaged: converted first.
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    # Pillow cannot reduce() 16-bit modes: they are resampled in one step.
    reducing_gap = None if img.mode.startswith("I;16") else 3.0
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=reducing_gap)
    return img


def _flat_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of a shrunk image: 16-bit and float greys scaled, as for the model, not clipped to white;
    transparent pixels over white, not whatever colour they happen to store."""
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(img))).convert("RGB")
    if _has_alpha(img):
        img = _over_white(img.convert("RGBA"))
    return img.convert("RGB")
