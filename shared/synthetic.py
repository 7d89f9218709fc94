"""A small procedural photo set (landmark facades photographed with varied framing, and everyday
non-landmark scenes) so the demo runs on a machine that has no real photos."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CITIES = [("Berlin", "Germany", 1, 52.52, 13.40), ("Paris", "France", 1, 48.86, 2.35),
          ("Kyiv", "Ukraine", 2, 50.45, 30.52), ("Washington", "United States", 3, 38.89, -77.03)]


def _facade(rng: np.random.Generator, size: int = 512) -> Image.Image:
    sky = tuple(int(v) for v in rng.integers(120, 230, 3))
    wall = tuple(int(v) for v in rng.integers(60, 220, 3))
    img = Image.new("RGB", (size, size), sky)
    draw = ImageDraw.Draw(img)
    top = int(size * rng.uniform(0.25, 0.45))
    draw.rectangle([size * 0.1, top, size * 0.9, size], fill=wall)
    if rng.random() < 0.5:  # a dome or a gable
        draw.pieslice([size * 0.3, top - size * 0.2, size * 0.7, top + size * 0.2], 180, 360,
                      fill=tuple(int(v) for v in rng.integers(40, 200, 3)))
    else:
        draw.polygon([(size * 0.1, top), (size * 0.5, top - size * 0.2), (size * 0.9, top)],
                     fill=tuple(int(v) for v in rng.integers(40, 200, 3)))
    rows, cols = int(rng.integers(2, 5)), int(rng.integers(3, 8))
    window = tuple(int(v) for v in rng.integers(0, 120, 3))
    for r in range(rows):
        for c in range(cols):
            x = size * 0.12 + c * size * 0.76 / cols
            y = top + size * 0.08 + r * (size - top) * 0.85 / rows
            draw.rectangle([x + 4, y, x + size * 0.76 / cols * 0.6, y + (size - top) * 0.85 / rows * 0.6], fill=window)
    return img


def _photograph(scene: Image.Image, rng: np.random.Generator, out: int = 320) -> Image.Image:
    size = scene.width
    scale = rng.uniform(0.6, 1.0)
    crop = int(size * scale)
    x, y = rng.integers(0, size - crop + 1, 2)
    shot = scene.crop((int(x), int(y), int(x) + crop, int(y) + crop)).rotate(float(rng.uniform(-8, 8)))
    arr = np.asarray(shot.resize((out, out)), dtype=np.float32) * rng.uniform(0.75, 1.2)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1)))


def _everyday(rng: np.random.Generator, out: int = 320) -> Image.Image:
    img = Image.new("RGB", (out, out), tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 12))):
        box = sorted(rng.integers(0, out, 2)), sorted(rng.integers(0, out, 2))
        draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img.filter(ImageFilter.GaussianBlur(2))


def write_photo_set(root: Path, *, n_landmarks: int = 8, photos_per_landmark: int = 8,
                    n_everyday: int = 40, seed: int = 0) -> tuple[Path, Path, Path]:
    """Writes root/landmarks/<slug>/*.jpg, root/landmarks.csv and root/everyday/*.jpg."""
    rng = np.random.default_rng(seed)
    landmarks_dir, everyday_dir = root / "landmarks", root / "everyday"
    rows = []
    for i in range(n_landmarks):
        city, country, region, lat, lon = CITIES[i % len(CITIES)]
        slug = f"landmark_{i + 1:02d}"
        folder = landmarks_dir / slug
        folder.mkdir(parents=True, exist_ok=True)
        scene = _facade(rng)
        for k in range(photos_per_landmark):
            _photograph(scene, rng).save(folder / f"{slug}_{k:02d}.jpg", quality=90)
        rows.append({"id": i + 1, "slug": slug, "name": f"{city} landmark {i + 1}", "city": city,
                     "country": country, "region": region, "lat": round(lat + 0.01 * i, 5), "lon": lon})
    everyday_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n_everyday):
        _everyday(rng).save(everyday_dir / f"everyday_{k:03d}.jpg", quality=90)
    csv_path = root / "landmarks.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return landmarks_dir, csv_path, everyday_dir
