"""decode_image on real camera and phone files (shared/realdata), read in place, never copied."""

from __future__ import annotations

import csv
import os
import re
import time
from pathlib import Path

import numpy as np
import pillow_heif
import pytest

from shared.errors import DecodeError
from shared.imaging import decode_image

REALDATA = Path(
    os.environ.get("LANDMARKS_REALDATA") or Path(__file__).parents[2] / ".." / "shared" / "realdata"
).resolve()
if not (REALDATA / "MANIFEST.tsv").is_file():
    pytest.skip(f"real photos not found at {REALDATA}", allow_module_level=True)

SIZE = 224
MAX_PIXELS = 100_000_000
SECONDS_PER_FILE = 5.0
_LAT_LON = re.compile(r"lat=(\S+)\s+lon=(\S+)")
# The manifest's reader took each EXIF rational 0/0 for NaN. This camera writes degrees and decimal minutes
# and its seconds as 0/0, which are none: its position is whole (48° 53.32358' N, 21° 2.59507' E).
_SECONDS_WRITTEN_0_OVER_0 = {"exif/mei_Nikon_D5000.jpg": (48 + 53.32358 / 60, 21 + 2.59507 / 60)}


def _manifest() -> dict[str, dict[str, str]]:
    with open(REALDATA / "MANIFEST.tsv", newline="", encoding="utf-8") as fh:
        return {row["relative_path"]: row for row in csv.DictReader(fh, delimiter="\t")}


MANIFEST = _manifest()
FILES = sorted(
    str(path.relative_to(REALDATA))
    for folder in ("exif", "landmarks")
    for path in (REALDATA / folder).rglob("*")
    if path.is_file()
)


def expected_gps(row: dict[str, str]) -> tuple[float, float] | None | str:
    """What the manifest says Pillow read, under our rules; "unknown" where it could not read the file."""
    if row["format"].startswith("unreadable"):
        return "unknown"  # the manifest's reader lacked a HEIF opener; it says nothing about GPS
    if row["relative_path"] in _SECONDS_WRITTEN_0_OVER_0:
        return _SECONDS_WRITTEN_0_OVER_0[row["relative_path"]]
    match = _LAT_LON.search(row["exif_gps"])
    if not match:
        return None  # empty, or "gps_ifd (no lat/lon values)"
    lat, lon = float(match.group(1)), float(match.group(2))
    if not (np.isfinite(lat) and np.isfinite(lon)) or (lat == 0.0 and lon == 0.0):
        return None  # NaN blocks and 0/0 are "no fix" by our rules
    return lat, lon


def test_manifest_lists_every_file() -> None:
    assert FILES, f"no files under {REALDATA}/exif or landmarks"
    assert set(FILES) <= set(MANIFEST)


@pytest.mark.parametrize("relative_path", FILES)
def test_real_file_decodes_or_refuses(relative_path: str) -> None:
    data = (REALDATA / relative_path).read_bytes()
    start = time.perf_counter()
    try:
        out = decode_image(data, size=SIZE, max_pixels=MAX_PIXELS)
    except DecodeError as exc:
        assert exc.reason
        out = None
    assert time.perf_counter() - start < SECONDS_PER_FILE
    if out is None:
        return
    assert out.pixels.shape == (SIZE, SIZE, 3) and out.pixels.dtype == np.uint8
    assert out.width > 0 and out.height > 0
    assert out.pixels.std() > 0 or out.width * out.height < 16  # not a blank frame

    row = MANIFEST[relative_path]
    expected = expected_gps(row)
    if expected == "unknown":
        pass
    elif expected is None:
        assert out.gps is None
    else:
        assert out.gps is not None, f"manifest GPS {row['exif_gps']!r}"
        assert out.gps.lat == pytest.approx(expected[0], abs=1e-4)
        assert out.gps.lon == pytest.approx(expected[1], abs=1e-4)

    name = Path(relative_path).stem
    if re.fullmatch(r"ianare_orientation_landscape_\d", name):
        assert out.width > out.height
    elif re.fullmatch(r"ianare_orientation_portrait_\d", name):
        assert out.height > out.width


def test_every_real_file_decodes() -> None:
    """All of these are genuine images; a refusal here is a regression, not bad input."""
    failures = {}
    for relative_path in FILES:
        try:
            decode_image((REALDATA / relative_path).read_bytes(), size=SIZE, max_pixels=MAX_PIXELS)
        except DecodeError as exc:
            failures[relative_path] = exc.reason
    assert not failures


def test_gps_rows_are_covered() -> None:
    # Guards the parsing above: the manifest has plenty of real coordinates and several no-fix blocks.
    rows = [MANIFEST[p] for p in FILES]
    with_coordinates = [r for r in rows if isinstance(expected_gps(r), tuple)]
    no_fix = [r for r in rows if _LAT_LON.search(r["exif_gps"]) and expected_gps(r) is None]
    assert len(with_coordinates) >= 20
    assert len(no_fix) >= 3


HEIF_FILES = [p for p in FILES if Path(p).suffix.lower() in (".heic", ".heif", ".avif")]


@pytest.mark.parametrize("relative_path", HEIF_FILES)
def test_a_real_heic_cut_short_is_refused_not_made_up(relative_path: str) -> None:
    # A phone's HEIC cut in transit decodes without an error, its missing tiles invented; the worker
    # must record it as corrupt, not tag made-up pixels and mark the event done.
    data = (REALDATA / relative_path).read_bytes()
    for share in (0.3, 0.5, 0.9):
        # "not an image" where the file's index (meta) follows its data and was cut off with it
        with pytest.raises(DecodeError, match="truncated|not an image"):
            decode_image(data[: int(len(data) * share)], size=SIZE, max_pixels=MAX_PIXELS)


def test_a_real_heic_decoded_from_its_thumbnail_shows_what_its_image_shows(monkeypatch) -> None:
    # Phones embed a thumbnail (an iPhone's: 320x240, turned as the image is); at a 96 px input it stands in
    # for the 12 MP image. Same picture, same orientation; the photo's size and GPS are still the image's.
    from_thumbnails = 0
    for relative_path in HEIF_FILES:
        data = (REALDATA / relative_path).read_bytes()
        quick = decode_image(data, size=96, max_pixels=MAX_PIXELS)
        with monkeypatch.context() as patch:
            patch.setattr(pillow_heif.options, "THUMBNAILS", False)  # read at open: the image itself is decoded
            full = decode_image(data, size=96, max_pixels=MAX_PIXELS)
        assert (quick.width, quick.height, quick.gps) == (full.width, full.height, full.gps), relative_path
        difference = np.abs(quick.pixels.astype(int) - full.pixels).mean()
        assert difference < 8, f"{relative_path}: mean difference {difference:.1f} of 255"
        from_thumbnails += difference > 0
    assert from_thumbnails >= 2
