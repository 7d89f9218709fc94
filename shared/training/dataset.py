"""Reader for the dataset folder format (docs/dataset.md): landmarks, training photos, references,
validation/test sets and user archives, validated with errors that name the file and line."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTIONAL = ("val.csv", "test.csv", "archives.csv")
# The article's notion: a landmark is frequent with more than 100 training photos. world.json's
# `frequent_threshold` (the generator's scaled-down value) takes precedence where there is one.
FREQUENT_THRESHOLD = 100
_LANDMARK_COLUMNS = ("id", "slug", "name", "city", "country", "region", "lat", "lon")


@dataclass(frozen=True)
class Landmark:
    id: int
    slug: str
    name: str
    city: str
    country: str
    region: int
    lat: float
    lon: float
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Photo:
    path: Path  # absolute
    landmark_id: int | None  # None: a non-landmark photo
    extra: dict[str, str] = field(default_factory=dict)  # generator columns (truth, kind, aspect, ...)
    source: str = field(default="", compare=False, repr=False)  # "train.csv:12", for messages


@dataclass(frozen=True)
class ArchivePhoto:
    user_id: str
    path: Path
    landmark_id: int | None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Dataset:
    root: Path
    landmarks: dict[int, Landmark]
    train: list[Photo]
    references: list[Photo]
    val: list[Photo] = field(default_factory=list)
    test: list[Photo] = field(default_factory=list)
    archives: list[ArchivePhoto] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)  # world.json when present

    def references_of(self, landmark_id: int) -> list[Photo]:
        return [p for p in self.references if p.landmark_id == landmark_id]


def _read(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs; the header is line 1."""
    if not path.exists():
        raise ValueError(f"{path}: missing file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _rows(path, csv.DictReader(handle), required)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason}): CSV files must be saved as UTF-8") from None


def _rows(path: Path, reader: csv.DictReader, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)} (found {', '.join(header) or 'none'})")
    rows = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}:{reader.line_num}: wrong number of fields")
        if not any((v or "").strip() for v in row.values()):
            continue  # blank line
        rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items()}))
    return rows


def _int(value: str, where: str, what: str, *, minimum: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{where}: {what} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{where}: {what} must be ≥ {minimum}, got {number}")
    return number


def _float(value: str, where: str, what: str, lo: float, hi: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: {what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise ValueError(f"{where}: {what} must be within [{lo}, {hi}], got {value}")
    return number


def read_landmarks(path: Path) -> list[Landmark]:
    """The landmarks of a landmarks.csv (id,slug,name,city,country,region,lat,lon), in file order, checked:
    a bad row raises ValueError naming its file and line."""
    return list(_landmarks(Path(path)).values())


def _landmarks(path: Path) -> dict[int, Landmark]:
    out: dict[int, Landmark] = {}
    slugs: set[str] = set()
    for line, row in _read(path, _LANDMARK_COLUMNS):
        where = f"{path}:{line}"
        lid = _int(row["id"], where, "id", minimum=1)
        if lid in out:
            raise ValueError(f"{where}: duplicate landmark id {lid}")
        slug = row["slug"]
        if not slug:
            raise ValueError(f"{where}: empty slug")
        if slug in slugs:
            raise ValueError(f"{where}: duplicate slug {slug!r}")
        slugs.add(slug)
        region = _int(row["region"], where, "region", minimum=1)
        if region > 4:
            raise ValueError(f"{where}: region must be 1–4, got {region}")
        out[lid] = Landmark(
            id=lid, slug=slug, name=row["name"] or slug, city=row["city"], country=row["country"], region=region,
            lat=_float(row["lat"], where, "lat", -90, 90), lon=_float(row["lon"], where, "lon", -180, 180),
            extra={k: v for k, v in row.items() if k not in _LANDMARK_COLUMNS})
    if not out:
        raise ValueError(f"{path}: no landmarks")
    return out


def _photo_path(root: Path, value: str, where: str, check_files: bool) -> Path:
    if not value:
        raise ValueError(f"{where}: empty path")
    path = Path(value)
    path = path if path.is_absolute() else root / path
    if check_files and not path.is_file():
        raise ValueError(f"{where}: photo file not found: {path}")
    return path


def _label(value: str, where: str, landmarks: dict[int, Landmark], *, required: bool) -> int | None:
    if value == "":
        if required:
            raise ValueError(f"{where}: landmark_id is required here")
        return None
    lid = _int(value, where, "landmark_id", minimum=1)
    if lid not in landmarks:
        raise ValueError(f"{where}: unknown landmark id {lid} (not in landmarks.csv)")
    return lid


def _photos(path: Path, root: Path, landmarks, *, labelled: bool, check_files: bool) -> list[Photo]:
    photos = []
    for line, row in _read(path, ("path", "landmark_id")):
        where = f"{path}:{line}"
        photos.append(Photo(path=_photo_path(root, row["path"], where, check_files),
                            landmark_id=_label(row["landmark_id"], where, landmarks, required=labelled),
                            extra={k: v for k, v in row.items() if k not in ("path", "landmark_id")},
                            source=f"{path.name}:{line}"))
    return photos


def load_dataset(root: Path, *, check_files: bool = True) -> Dataset:
    """Reads and validates a dataset folder. landmarks.csv, train.csv and references.csv are required;
    val.csv, test.csv, archives.csv and world.json are read when present. Raises ValueError naming the
    file and line of the first bad row, a landmark without reference photos, or a photo shared between
    training (train, references), validation and test."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory")
    landmarks = _landmarks(root / "landmarks.csv")
    data = Dataset(
        root=root, landmarks=landmarks,
        train=_photos(root / "train.csv", root, landmarks, labelled=False, check_files=check_files),
        references=_photos(root / "references.csv", root, landmarks, labelled=True, check_files=check_files),
    )
    for name in ("val", "test"):
        if (root / f"{name}.csv").exists():
            setattr(data, name, _photos(root / f"{name}.csv", root, landmarks, labelled=False, check_files=check_files))
    if (root / "archives.csv").exists():
        path = root / "archives.csv"
        for line, row in _read(path, ("user_id", "path", "landmark_id")):
            where = f"{path}:{line}"
            if not row["user_id"]:
                raise ValueError(f"{where}: empty user_id")
            data.archives.append(ArchivePhoto(
                user_id=row["user_id"], path=_photo_path(root, row["path"], where, check_files),
                landmark_id=_label(row["landmark_id"], where, landmarks, required=False),
                extra={k: v for k, v in row.items() if k not in ("user_id", "path", "landmark_id")}))
    if (root / "world.json").exists():
        try:
            data.meta = json.loads((root / "world.json").read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{root / 'world.json'}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    _check_references(data)
    _check_disjoint_splits(data)
    return data


def _check_references(data: Dataset) -> None:
    """Without GPS a landmark is only tagged after verification against its references
    (shared.recognition.decide_global): one without any could never be tagged there."""
    have = {p.landmark_id for p in data.references}
    missing = [lm for lid, lm in data.landmarks.items() if lid not in have]
    if missing:
        names = ", ".join(f"{lm.id} ({lm.slug})" for lm in missing[:20])
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise ValueError(f"{data.root / 'references.csv'}: no reference photos for landmark(s) {names}{more}: "
                         "every landmark needs at least one (3–5 recommended), or photos without GPS can "
                         "never be tagged with it")


def _check_disjoint_splits(data: Dataset) -> None:
    """A photo the network trained on (train, references) or that chose the thresholds (val) makes the
    figures measured on it in a later split optimistic. train and references may share photos."""
    owner: dict[Path, tuple[str, str]] = {}  # resolved path → (split group, where it was first seen)
    groups = (("training", data.train + data.references), ("val", data.val), ("test", data.test))
    for group, photos in groups:
        for photo in photos:
            key = photo.path.resolve()
            first_group, first_where = owner.setdefault(key, (group, photo.source))
            if first_group != group:
                raise ValueError(f"{data.root / photo.source}: photo {photo.path} is also in {first_where}; "
                                 "a photo belongs to one of training (train, references), val and test, or "
                                 f"the figures measured on {group} are optimistic")


def frequent_landmarks(data: Dataset) -> set[int]:
    """The landmarks with more labelled training photos than the frequent threshold (world.json's, else
    the article's), as the generator decides its `frequent` column."""
    threshold = int(data.meta.get("frequent_threshold", FREQUENT_THRESHOLD))
    counts = Counter(p.landmark_id for p in data.train if p.landmark_id is not None)
    return {lid for lid, n in counts.items() if n > threshold}


def is_frequent(photo: Photo, frequent: set[int]) -> bool:
    """The photo's `frequent` column where it says 1 or 0, else derived from the training counts."""
    value = photo.extra.get("frequent", "")
    if value in ("0", "1"):
        return value == "1"
    return photo.landmark_id in frequent
