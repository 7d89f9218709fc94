"""decode_image and exif_gps on generated images: formats, orientation, modes, bombs, corrupt data, GPS."""

from __future__ import annotations

import io
import math
import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, JpegImagePlugin
from PIL.TiffImagePlugin import IFDRational

from shared.errors import DecodeError
from shared.events import GeoPoint
from shared.imaging import MAX_JPEG_SCANS, DecodedImage, EncodedJpeg, decode_image, exif_gps, probe_jpeg

SIZE = 64
LIMIT = 10_000_000
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(width: int = 160, height: int = 120) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def quadrant(width: int = 128, height: int = 128) -> Image.Image:
    """Blue, with the top-left quadrant red: shows where orientation moved the stored corner."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height // 2))
    return img


def with_exif(img: Image.Image, *, orientation: int | None = None, gps: dict | None = None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    if gps is not None:
        exif.get_ifd(0x8825).update(gps)
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95)


def decode(data: bytes, **kwargs) -> DecodedImage:
    return decode_image(data, size=kwargs.pop("size", SIZE), max_pixels=kwargs.pop("max_pixels", LIMIT))


def corner_colours(pixels: np.ndarray) -> dict[str, tuple[int, ...]]:
    h = pixels.shape[0] // 4
    corners = {
        "tl": pixels[:h, :h], "tr": pixels[:h, -h:], "bl": pixels[-h:, :h], "br": pixels[-h:, -h:],
    }
    return {name: tuple(int(v) for v in block.reshape(-1, 3).mean(axis=0).round()) for name, block in corners.items()}


def is_red(colour: tuple[int, ...]) -> bool:
    return colour[0] > 200 and colour[2] < 60


# ---- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "params", "expected"),
    [
        ("JPEG", {"quality": 90}, "JPEG"),
        ("PNG", {}, "PNG"),
        ("WEBP", {"quality": 90}, "WEBP"),
        ("HEIF", {"quality": 90}, "HEIF"),
        ("GIF", {}, "GIF"),
        ("BMP", {}, "BMP"),
        ("TIFF", {}, "TIFF"),
    ],
)
def test_formats_decode_to_square_uint8(fmt: str, params: dict, expected: str) -> None:
    src = gradient(160, 120)
    out = decode(encode(src, fmt, **params))
    assert out.pixels.shape == (SIZE, SIZE, 3)
    assert out.pixels.dtype == np.uint8
    assert (out.width, out.height, out.format) == (160, 120, expected)
    assert out.gps is None
    # The content survives: a centre crop of a horizontal gradient still rises left to right in red.
    assert out.pixels[:, -4:, 0].mean() > out.pixels[:, :4, 0].mean() + 100


def test_centre_crop_keeps_the_middle() -> None:
    img = Image.new("RGB", (300, 100), BLUE)
    img.paste(RED, (100, 0, 200, 100))  # the middle third, exactly the centre square
    out = decode(encode(img, "PNG"))
    assert is_red(tuple(out.pixels.reshape(-1, 3).mean(axis=0)))


def test_small_image_is_upscaled() -> None:
    out = decode(encode(gradient(20, 10), "PNG"))
    assert out.pixels.shape == (SIZE, SIZE, 3)
    assert (out.width, out.height) == (20, 10)


def test_jpeg_uses_draft_mode_no_smaller_than_size(monkeypatch) -> None:
    requested = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        requested.append(size)
        result = original(self, mode, size)
        assert min(self.size) >= 224  # draft never goes below the requested side
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = decode_image(encode(gradient(2000, 1000), "JPEG"), size=224, max_pixels=LIMIT)
    assert requested == [(224, 224)]
    assert out.pixels.shape == (224, 224, 3)
    assert (out.width, out.height) == (2000, 1000)


# ---- orientation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "red_corner", "swapped"),
    [
        (1, "tl", False), (2, "tr", False), (3, "br", False), (4, "bl", False),
        (5, "tl", True), (6, "tr", True), (7, "br", True), (8, "bl", True),
    ],
)
def test_exif_orientation(orientation: int, red_corner: str, swapped: bool) -> None:
    # Square, so cropping cannot hide a corner; size reporting is checked on a wide image below.
    colours = corner_colours(decode(with_exif(quadrant(), orientation=orientation)).pixels)
    assert [name for name, colour in colours.items() if is_red(colour)] == [red_corner]
    wide = decode(with_exif(gradient(160, 120), orientation=orientation))
    assert (wide.width, wide.height) == ((120, 160) if swapped else (160, 120))


@pytest.mark.parametrize(
    ("orientation", "red_corner", "swapped"),
    [(1, "tl", False), (3, "br", False), (6, "tr", True), (8, "bl", True)],
)
def test_tiff_orientation_is_applied_once(orientation: int, red_corner: str, swapped: bool) -> None:
    # Pillow turns a TIFF itself as it loads it: turned again, a 6 came out upside down and unswapped.
    def tiff(img: Image.Image) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = orientation
        return encode(img, "TIFF", exif=exif)
    colours = corner_colours(decode(tiff(quadrant())).pixels)
    assert [name for name, colour in colours.items() if is_red(colour)] == [red_corner]
    wide = decode(tiff(gradient(160, 120)))
    assert (wide.width, wide.height) == ((120, 160) if swapped else (160, 120))


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_invalid_orientation_is_ignored(orientation: int) -> None:
    out = decode(with_exif(gradient(160, 120), orientation=orientation))
    assert (out.width, out.height) == (160, 120)


# ---- modes --------------------------------------------------------------------------------


def test_cmyk_jpeg() -> None:
    img = Image.new("CMYK", (80, 60), (0, 255, 255, 0))  # pure red in CMYK
    out = decode(encode(img, "JPEG", quality=95))
    assert out.pixels.shape == (SIZE, SIZE, 3)
    assert is_red(tuple(out.pixels.reshape(-1, 3).mean(axis=0)))


def test_16_bit_png_is_scaled_not_clipped() -> None:
    array = np.zeros((40, 40), dtype=np.uint16)
    array[:, 20:] = 32768  # half brightness: clipping would make this white
    array[:, :20] = 65535
    data = encode(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode(data)
    assert out.pixels.shape == (SIZE, SIZE, 3)
    assert abs(int(out.pixels[SIZE // 2, -1, 0]) - 128) <= 2
    assert int(out.pixels[SIZE // 2, 0, 0]) == 255


def _scaled_then_resized(data: bytes) -> np.ndarray:
    """What decode_image gave for a 16-bit or float greyscale image before it resized first: the whole
    image scaled to 8 bits, then resized."""
    array = np.asarray(Image.open(io.BytesIO(data)))
    if array.dtype.kind == "f":
        scaled = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    else:
        scaled = ((np.clip(array.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    img = Image.fromarray(scaled, "L").convert("RGB")
    side = min(img.size)
    left, top = (img.width - side) / 2, (img.height - side) / 2
    box = (left, top, left + side, top + side)
    return np.array(img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0))


def _waves(width: int, height: int) -> np.ndarray:
    """16-bit greyscale with detail in both directions, over the whole range."""
    y, x = np.mgrid[0:height, 0:width]
    return (32768 + 30000 * np.sin(x / 9.0) * np.cos(y / 13.0)).astype(np.uint16)


@pytest.mark.parametrize(("fmt", "as_mode"), [("PNG", np.uint16), ("TIFF", np.uint16), ("TIFF", np.int32),
                                               ("TIFF", np.float32)])
def test_high_bit_depth_greyscale_gives_the_pixels_it_gave_before_it_was_resized_first(fmt: str, as_mode) -> None:
    array = _waves(300, 200)
    array = array / 257 if as_mode is np.float32 else array  # float images hold 0..255
    data = encode(Image.fromarray(array.astype(as_mode)), fmt)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I", "F")
    out = decode(data)
    assert out.pixels.shape == (SIZE, SIZE, 3)
    assert np.abs(out.pixels.astype(int) - _scaled_then_resized(data)).max() <= 1


def test_a_large_16_bit_image_is_never_copied_at_full_resolution() -> None:
    # 4000x3000: scaled before its resize, it cost a full-size int64 copy (96 MB) and more (228 MB at peak).
    width, height = 4000, 3000
    array = (np.arange(width, dtype=np.uint16) * 16)[None, :] + (np.arange(height, dtype=np.uint16) * 5)[:, None]
    data = encode(Image.fromarray(array), "PNG", compress_level=1)
    tracemalloc.start()
    try:
        out = decode(data, max_pixels=width * height)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.pixels.shape == (SIZE, SIZE, 3)
    assert peak < width * height * 2, f"{peak / 1e6:.0f} MB: a full-resolution copy"  # one uint16 copy


def test_grayscale() -> None:
    out = decode(encode(Image.new("L", (50, 70), 100), "PNG"))
    assert out.pixels.shape == (SIZE, SIZE, 3)
    assert np.all(out.pixels == 100)


def test_palette_with_transparency() -> None:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 20, 40))
    out = decode(encode(img, "PNG", transparency=1))  # green half transparent → white
    assert tuple(out.pixels[SIZE // 2, 0]) == (255, 255, 255)
    assert tuple(out.pixels[SIZE // 2, -1]) == RED


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    img.paste((0, 0, 0, 255), (20, 0, 40, 40))
    out = decode(encode(img.convert(mode), "PNG"))
    assert tuple(out.pixels[SIZE // 2, 0]) == (255, 255, 255)
    assert tuple(out.pixels[SIZE // 2, -1]) == (0, 0, 0)


def test_transparent_pixels_lend_no_colour_to_their_neighbours() -> None:
    # Transparent pixels that store red beside opaque blue: resized without premultiplied alpha, the
    # border would come out pink. Over white it must blend white and blue only (red == green).
    array = np.zeros((300, 300, 4), dtype=np.uint8)
    array[:, :, 0], array[:, 150:] = 255, (0, 0, 255, 255)
    out = decode(encode(Image.fromarray(array, "RGBA"), "PNG"), size=48)
    assert np.abs(out.pixels[..., 0].astype(int) - out.pixels[..., 1]).max() <= 2
    assert tuple(out.pixels[24, 0]) == (255, 255, 255) and tuple(out.pixels[24, -1]) == BLUE


def test_bilevel() -> None:
    out = decode(encode(Image.new("1", (30, 30), 1), "PNG"))
    assert np.all(out.pixels == 255)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_takes_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), GREEN)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = decode(data)
    assert is_red(tuple(out.pixels.reshape(-1, 3).mean(axis=0)))


# ---- bombs and bad data ---------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose IHDR is patched to claim another size (with a correct CRC)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def test_bomb_refused_from_header_by_our_limit() -> None:
    with pytest.raises(DecodeError, match=r"decompression bomb: 5000x4000 pixels exceeds limit 1000000"):
        decode_image(png_claiming(5000, 4000), size=SIZE, max_pixels=1_000_000)


def test_huge_bomb_refused() -> None:
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(png_claiming(60000, 60000), size=SIZE, max_pixels=100_000_000)


def test_no_pillow_bomb_warning_below_our_limit() -> None:
    # Someone running with -W error: Pillow's own warning (above 89 MP) must not refuse a photo that our
    # limit allows; this one is refused for what it is, a header claiming more than its data.
    data = png_claiming(10000, 10000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(DecodeError, match="corrupt image"):
            decode_image(data, size=SIZE, max_pixels=200_000_000)


def test_our_limit_not_pillows_decides_what_is_a_bomb() -> None:
    # 225 MP is above Pillow's own bomb limit (179 MP): with ours raised to 300 MP the photo is judged
    # by its data (this one claims more than it holds), not refused as a bomb.
    with pytest.raises(DecodeError, match="corrupt image"):
        decode_image(png_claiming(15000, 15000), size=SIZE, max_pixels=300_000_000)


def test_header_claiming_more_than_data_is_corrupt() -> None:
    with pytest.raises(DecodeError, match="corrupt image"):
        decode_image(png_claiming(500, 500), size=SIZE, max_pixels=LIMIT)


def _scans(data: bytes) -> list[bytes]:
    """Each scan of a JPEG: its start-of-scan segment and the coded data after it."""
    scans, at = [], 2
    while data[at + 1] != 0xD9:  # segment by segment to the end of the image
        end = at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        if data[at + 1] == 0xDA:  # coded data runs to the next marker that is no stuffed FF nor a restart
            while data[end] != 0xFF or data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 1
            scans.append(data[at:end])
        at = end
    return scans


def scan_bomb(repeats: int) -> bytes:
    """A progressive JPEG with its smallest AC scan (start of spectral selection > 0) repeated: each copy is
    a few bytes, and one more pass over the whole image for the decoder."""
    data = encode(Image.new("RGB", (64, 64), (120, 130, 140)), "JPEG", progressive=True, quality=90)
    scans = _scans(data)
    ac = [scan for scan in scans if scan[5 + 2 * scan[4]] > 0]
    last = data.index(scans[-1])
    return data[:last] + min(ac, key=len) * repeats + data[last:]


def test_a_progressive_jpeg_of_thousands_of_scans_is_refused_as_a_bomb() -> None:
    bomb = scan_bomb(2000)
    scans = len(_scans(bomb))
    assert scans > 2000
    with pytest.raises(DecodeError, match=rf"^decompression bomb: {scans} scans in a progressive JPEG"):
        decode(bomb)
    # The device decoder's path reads the header on the CPU: it refuses the bomb there too.
    with pytest.raises(DecodeError, match=rf"^decompression bomb: {scans} scans"):
        probe_jpeg(bomb, max_pixels=LIMIT, progressive=True)


def test_a_real_progressive_jpeg_decodes() -> None:
    data = encode(gradient(), "JPEG", progressive=True, quality=90)
    assert Image.open(io.BytesIO(data)).info.get("progressive")
    baseline = decode(encode(gradient(), "JPEG", quality=90)).pixels
    assert np.abs(decode(data).pixels.astype(int) - baseline).mean() < 2
    assert isinstance(probe_jpeg(data, max_pixels=LIMIT, progressive=True), EncodedJpeg)
    at_limit = scan_bomb(MAX_JPEG_SCANS - len(_scans(scan_bomb(0))))
    assert len(_scans(at_limit)) == MAX_JPEG_SCANS
    assert decode(at_limit).format == "JPEG"


def test_a_baseline_jpeg_is_not_counted_for_scans() -> None:
    # A baseline JPEG is decoded in one pass whatever its bytes hold: what looks like scan markers in its
    # metadata costs it nothing, and it is not searched for them (the hot path).
    data = encode(gradient(), "JPEG", quality=90, comment=b"\xff\xda" * (2 * MAX_JPEG_SCANS))
    assert data.count(b"\xff\xda") > MAX_JPEG_SCANS
    assert decode(data).format == "JPEG"


def _jpeg() -> bytes:
    return encode(gradient(160, 120), "JPEG", quality=90)


def _noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8), "RGB")


def _cut(data: bytes, share: float) -> bytes:
    return data[: int(len(data) * share)]


def test_a_heif_with_bytes_after_its_last_box_still_decodes() -> None:
    # A trailer that is no box (some writers pad or append) is not a box cut short.
    data = encode(_noise(), "HEIF") + b"\xff\xff\xff\xff\x00\x01\x02\x03\x04"
    assert decode(data).format == "HEIF"


@pytest.fixture(scope="module")
def phone_heic() -> bytes:
    """2400x1800 with a 320x240 thumbnail, as a phone writes its HEIC (an iPhone's: 4032x3024, 320x240)."""
    return encode(_camera_like(2400, 1800), "HEIF", quality=70, thumbnails=[320])


def _camera_like(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x // 7 + y // 5) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def _without_thumbnails(monkeypatch, data: bytes, size: int) -> DecodedImage:
    with monkeypatch.context() as patch:
        patch.setattr(pillow_heif.options, "THUMBNAILS", False)  # read at open: the image itself is decoded
        return decode(data, size=size)


def test_a_heic_is_decoded_from_its_thumbnail_when_that_is_twice_the_input(phone_heic, monkeypatch) -> None:
    # Far cheaper (a real iPhone photo: a few ms against about 300), and as sharp: the thumbnail is at
    # least twice the input on each side. The photo's size is still the image's.
    from_thumbnail = decode(phone_heic, size=120)  # 320x240 >= 2 x 120 on each side
    from_image = _without_thumbnails(monkeypatch, phone_heic, 120)
    assert not np.array_equal(from_thumbnail.pixels, from_image.pixels)  # another encode of the picture ...
    assert np.abs(from_thumbnail.pixels.astype(int) - from_image.pixels).mean() < 3  # ... of the same picture
    assert (from_thumbnail.width, from_thumbnail.height, from_thumbnail.format) == (2400, 1800, "HEIF")


def test_a_heic_whose_thumbnail_is_not_twice_the_input_is_decoded_from_the_image(phone_heic, monkeypatch) -> None:
    # Only just above the input, a thumbnail gives a visibly softer picture than the image does.
    assert np.array_equal(decode(phone_heic, size=121).pixels, _without_thumbnails(monkeypatch, phone_heic, 121).pixels)


def _corrupt_scan(data: bytes) -> bytes:
    start = data.index(b"\xff\xda") + 20
    return data[:start] + bytes(range(256)) * 3 + data[start + 768 :]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not an image"),
        (b"hello, this is plain text and not a photo", "not an image: unrecognised format"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not an image"),  # EPS would run Ghostscript
        (b"\xff\xd8\xff", "not an image"),
        (_jpeg()[: len(_jpeg()) // 2], "corrupt image: .*truncated"),
        (_jpeg()[:-2], "corrupt image"),
        (_corrupt_scan(_jpeg()), "corrupt image"),
        (encode(gradient(), "PNG")[:-40], "corrupt image"),
        (encode(gradient(), "WEBP")[:200], "corrupt image|not an image"),
        (encode(gradient(), "HEIF")[:300], "corrupt image|not an image"),
        (_cut(encode(_noise(), "HEIF"), 0.5), "corrupt image: truncated HEIF"),  # else decoded, half made up
        (_cut(encode(_noise(), "HEIF"), 0.99), "corrupt image: truncated HEIF"),
    ],
    ids=["empty", "text", "svg", "eps", "soi-only", "truncated-jpeg", "no-eoi", "corrupt-scan",
         "truncated-png", "truncated-webp", "truncated-heif-header", "heif-half", "heif-99pc"],
)
def test_bad_data_is_decode_error(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason) as info:
        decode(data)
    assert "\n" not in info.value.reason


# Real magic numbers in front of random bytes get past format sniffing into the parsers.
_MAGIC = [b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"RIFF\x00\x01\x00\x00WEBPVP8 ",
          b"\x00\x00\x00\x18ftypheic", b"BM", b"II*\x00", b"MM\x00*"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_MAGIC), st.binary(max_size=2048))
def test_random_bytes_decode_or_decode_error(magic: bytes, data: bytes) -> None:
    _decodes_or_refuses(magic + data)


_VALID_JPEG = encode(gradient(64, 48), "JPEG", quality=80, exif=Image.Exif().tobytes())
_VALID_JPEG_EXIF = with_exif(gradient(64, 48), orientation=6, gps={1: "N", 2: (1.0, 2.0, 3.0), 3: "E", 4: (4.0, 5.0, 6.0)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([_VALID_JPEG, _VALID_JPEG_EXIF]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(0, 10**6),
)
def test_mutated_jpeg_decodes_or_decode_error(base: bytes, edits, cut: int) -> None:
    data = bytearray(base)
    for position, value in edits:
        data[position % len(data)] = value
    _decodes_or_refuses(bytes(data[: max(1, len(data) - cut % 64)]))


def _decodes_or_refuses(data: bytes) -> None:
    try:
        out = decode(data)
    except DecodeError as exc:
        assert exc.reason and "\n" not in exc.reason
        return
    assert out.pixels.shape == (SIZE, SIZE, 3) and out.pixels.dtype == np.uint8
    assert out.gps is None or isinstance(out.gps, GeoPoint)


# ---- GPS ------------------------------------------------------------------------------------


def test_gps_round_trip_through_jpeg_exif() -> None:
    gps = {1: "S", 2: (IFDRational(33, 1), IFDRational(51, 1), IFDRational(36, 1)), 3: "E", 4: (151.0, 12.0, 36.0)}
    out = decode(with_exif(gradient(), gps=gps))
    assert out.gps is not None
    assert (out.gps.lat, out.gps.lon) == pytest.approx((-33.86, 151.21), abs=1e-9)


@pytest.mark.parametrize(
    ("lat_ref", "lon_ref", "sign"),
    [("N", "E", (1, 1)), ("S", "E", (-1, 1)), ("N", "W", (1, -1)), ("S", "W", (-1, -1)),
     (b"S\x00", b"W\x00", (-1, -1)), ("s", "w", (-1, -1))],
)
def test_gps_refs_give_signs(lat_ref, lon_ref, sign) -> None:
    gps = {2: (48.0, 51.0, 29.88), 4: (2.0, 17.0, 40.2)}
    if lat_ref is not None:
        gps[1] = lat_ref
    if lon_ref is not None:
        gps[3] = lon_ref
    point = exif_gps(gps)
    assert point is not None
    assert point.lat == pytest.approx(sign[0] * 48.8583, abs=1e-6)
    assert point.lon == pytest.approx(sign[1] * 2.2945, abs=1e-6)


@pytest.mark.parametrize(("lat_ref", "lon_ref"), [(None, None), ("", ""), ("S", None), (None, "E"), (b"\x00", "E")])
def test_a_coordinate_without_its_reference_is_no_position(lat_ref, lon_ref) -> None:
    # Sydney, -33.8568 151.2153, its references left out: read as N and E, it would land in the Pacific
    # off Japan and override the event's own position.
    gps = {2: (IFDRational(33), IFDRational(51), IFDRational(2448, 100)),
           4: (IFDRational(151), IFDRational(12), IFDRational(5508, 100))}
    gps.update({tag: ref for tag, ref in ((1, lat_ref), (3, lon_ref)) if ref is not None})
    assert exif_gps(gps) is None
    assert decode(with_exif(gradient(), gps=gps)).gps is None


def test_a_zero_coordinate_needs_no_reference() -> None:
    # On the equator (or the prime meridian) the sign changes nothing.
    point = exif_gps({2: (0.0, 0.0, 0.0), 3: "E", 4: (36.0, 49.0, 0.0)})
    assert point is not None and (point.lat, point.lon) == pytest.approx((0.0, 36.81667), abs=1e-5)


@pytest.mark.parametrize(("lat", "lon", "expected"), [
    ((IFDRational(48), IFDRational(51), IFDRational(0, 0)), (IFDRational(2), IFDRational(17), IFDRational(0, 0)),
     (48.85, 2.283333)),
    ((IFDRational(48), IFDRational(0, 0), IFDRational(0)), (IFDRational(2), IFDRational(0, 0), IFDRational(0)),
     (48.0, 2.0)),
])
def test_minutes_or_seconds_written_as_0_over_0_are_zero(lat, lon, expected) -> None:
    gps = {1: "N", 2: lat, 3: "E", 4: lon}
    point = exif_gps(gps)
    assert point is not None and (point.lat, point.lon) == pytest.approx(expected, abs=1e-5)
    decoded = decode(with_exif(gradient(), gps=gps)).gps  # as it comes out of a camera's file
    assert decoded is not None and (decoded.lat, decoded.lon) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("status", "kept"), [("V", False), (b"V\x00", False), ("A", True), (None, True)])
def test_a_void_gps_fix_is_no_gps(status, kept: bool) -> None:
    gps = {1: "N", 2: (48.0, 51.0, 29.88), 3: "E", 4: (2.0, 17.0, 40.2)}
    if status is not None:
        gps[9] = status  # GPSStatus: A = measurement active, V = void (a stale, last known position)
    assert (exif_gps(gps) is not None) == kept


def test_gps_from_pillow_exif_object() -> None:
    exif = Image.Exif()
    exif.get_ifd(0x8825).update({1: "N", 2: (IFDRational(4012, 100), 0.0, 0.0), 3: "W", 4: (IFDRational(7, 2),)})
    point = exif_gps(exif)
    assert point is not None and (point.lat, point.lon) == pytest.approx((40.12, -3.5))


@pytest.mark.parametrize(
    "gps",
    [
        {},
        {1: "N", 3: "E"},  # the block exists but holds no coordinates
        {1: "N", 2: (0.0, 0.0, 0.0), 3: "E", 4: (0.0, 0.0, 0.0)},  # cameras without a fix
        {1: "S", 2: (0.0, 0.0, 0.0), 3: "W", 4: (0.0, 0.0, 0.0)},  # -0/-0 is still 0/0
        {1: "N", 2: (IFDRational(0, 0), 0.0, 0.0), 3: "E", 4: (1.0, 0.0, 0.0)},  # degrees 0/0
        {1: "N", 2: (IFDRational(1, 0), 0.0, 0.0), 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: (1.0, IFDRational(1, 0), 0.0), 3: "E", 4: (1.0, 0.0, 0.0)},  # 1/0 minutes: not 0/0
        {1: "N", 2: (float("nan"), 0.0, 0.0), 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: (1.0, float("nan"), 0.0), 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: (1.0, 0.0, 0.0), 3: "E", 4: (float("inf"), 0.0, 0.0)},
        {1: "N", 2: (91.0, 0.0, 0.0), 3: "E", 4: (1.0, 0.0, 0.0)},  # out of range
        {1: "N", 2: (1.0, 0.0, 0.0), 3: "E", 4: (180.0, 30.0, 0.0)},
        {1: "N", 2: (1.0, 0.0, 0.0), 3: "E", 4: (-1.0, 0.0, 0.0)},  # EXIF rationals are unsigned
        {1: "X", 2: (1.0, 0.0, 0.0), 3: "E", 4: (1.0, 0.0, 0.0)},  # unknown reference
        {1: 7, 2: (1.0, 0.0, 0.0), 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: "48.85", 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: b"\x00\x01", 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: (), 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: (1.0, 2.0, 3.0, 4.0), 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: ("a", "b", "c"), 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: (None, 0, 0), 3: "E", 4: (1.0, 0.0, 0.0)},
        {1: "N", 2: (1.0, 0.0, 0.0), 3: "E", 4: {"nested": 1}},
        {1: "N", 2: (10**400, 0, 0), 3: "E", 4: (1.0, 0.0, 0.0)},
    ],
)
def test_implausible_gps_is_none(gps: dict) -> None:
    assert exif_gps(gps) is None


def test_gps_absent_or_weird_containers() -> None:
    assert exif_gps(None) is None
    assert exif_gps(Image.Exif()) is None
    assert exif_gps({0x8825: {1: "N", 2: (1.0, 0, 0), 3: "E", 4: (2.0, 0, 0)}}) == GeoPoint(lat=1.0, lon=2.0)
    assert exif_gps({0x8825: 12345}) is None  # an unparsed offset, not a block


def test_decimal_degrees_in_one_rational() -> None:
    point = exif_gps({1: "N", 2: IFDRational(4885833, 100000), 3: "E", 4: (IFDRational(229, 100),)})
    assert point is not None and (point.lat, point.lon) == pytest.approx((48.85833, 2.29))


def test_nan_rationals_never_leak() -> None:
    point = exif_gps({1: "N", 2: (IFDRational(48, 1), IFDRational(1, 0)), 3: "E", 4: (2.0,)})
    assert point is None or all(math.isfinite(v) for v in (point.lat, point.lon))


# ---- which files are photos ---------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "fmt"), [(".avif", "AVIF"), (".jfif", "JPEG"), (".jpe", "JPEG"),
                                             (".AVIF", "AVIF")])
def test_every_suffix_of_a_format_decoded_is_picked_up_from_a_folder(tmp_path: Path, suffix: str, fmt: str) -> None:
    # How `landmarks enqueue DIR` and the model's builders find photos (imported here: it loads torch).
    from shared.gallery import image_files
    photo = tmp_path / "album" / f"photo{suffix}"
    photo.parent.mkdir()
    photo.write_bytes(encode(gradient(), fmt))
    (tmp_path / "album" / "notes.txt").write_text("not a photo")
    assert image_files(tmp_path) == [photo]
    assert decode(photo.read_bytes()).format == fmt
