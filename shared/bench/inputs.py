"""The bench's inputs: camera-like generated JPEGs (12 MP, 2 MP) cached under $LANDMARKS_HOME, and the real
photos of ../shared/realdata read in place."""

from __future__ import annotations

import io
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from shared.bench.config import BenchConfig, NullReporter, REPO, Reporter
from shared.cpus import usable_cpus

GENERATOR_VERSION = "v1"  # bump when camera_jpeg changes, so cached inputs are regenerated
SIZES: dict[str, tuple[int, int]] = {"12mp": (4000, 3000), "2mp": (1600, 1200)}


def camera_jpeg(width: int, height: int, seed: int, *, quality: int = 92, noise: float = 5.5) -> bytes:
    """A JPEG that decodes like a camera photo: sky and ground gradients, buildings with sharp edges and
    windows, uneven light, surface texture and sensor noise, 4:2:0 at camera quality, with EXIF.
    Flat colours would make files (and their decode) several times cheaper than real photos."""
    rng = np.random.default_rng(seed)
    lw, lh = max(64, width // 4), max(48, height // 4)
    horizon = rng.uniform(0.35, 0.65)
    y = np.linspace(0, 1, lh, dtype=np.float32)[:, None, None]
    sky_top, sky_bottom = rng.uniform(60, 140, 3), rng.uniform(150, 235, 3)
    ground_top, ground_bottom = rng.uniform(40, 150, 3), rng.uniform(20, 110, 3)
    sky = sky_top + (sky_bottom - sky_top) * (y / horizon)
    ground = ground_top + (ground_bottom - ground_top) * ((y - horizon) / (1 - horizon))
    scene = np.where(y < horizon, sky, ground) * np.ones((1, lw, 1), np.float32)
    img = Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 10))):  # buildings with rows of windows: edges at many scales
        bw, x0 = rng.uniform(0.05, 0.3) * lw, rng.uniform(-0.1, 1.0) * lw
        top = rng.uniform(0.1, horizon + 0.1) * lh
        colour = tuple(int(v) for v in rng.integers(40, 230, 3))
        draw.rectangle([x0, top, x0 + bw, lh], fill=colour, outline=tuple(int(c * 0.6) for c in colour))
        window = tuple(int(v) for v in rng.integers(0, 90, 3))
        nx, ny = int(rng.integers(2, 8)), int(rng.integers(3, 14))
        for i in range(nx):
            for j in range(ny):
                wx, wy = x0 + bw * (i + 0.25) / nx, top + (lh - top) * (j + 0.2) / ny
                if wy < lh * 0.97:
                    draw.rectangle([wx, wy, wx + bw * 0.5 / nx, wy + (lh - top) * 0.5 / ny], fill=window)
    for _ in range(int(rng.integers(5, 20))):  # trees, people, cars
        cx, cy, r = rng.uniform(0, lw), rng.uniform(horizon * lh, lh), rng.uniform(2, lh * 0.08)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.integers(10, 200, 3)))
    pixels = np.asarray(img.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    texture = _upsampled_noise(rng, (height // 4, width // 4), (width, height), Image.Resampling.BILINEAR)
    light = _upsampled_noise(rng, (8, 8), (width, height), Image.Resampling.BICUBIC)
    pixels *= (0.8 + 0.4 * light / 255)[..., None]
    pixels += ((texture - 127.5) * rng.uniform(0.08, 0.16))[..., None]
    pixels += rng.standard_normal((height, width, 3), dtype=np.float32) * noise
    out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Landmarks", "BenchCam", 1  # Make, Model, Orientation
    exif[0x0132] = "2026:11:26 10:00:00"
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=quality, subsampling=2, exif=exif.tobytes())
    return buf.getvalue()


def _upsampled_noise(rng: np.random.Generator, shape: tuple[int, int], size: tuple[int, int],
                     method: Image.Resampling) -> np.ndarray:
    small = Image.fromarray((rng.random(shape) * 255).astype(np.uint8))
    return np.asarray(small.resize(size, method), dtype=np.float32)


def _write_jpeg(args: tuple[Path, int, int, int]) -> int:
    path, width, height, seed = args
    data = camera_jpeg(width, height, seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return len(data)


def generated_images(cache: Path, size: str, count: int, reporter: Reporter | None = None) -> list[Path]:
    """`count` camera-like JPEGs of `size`, generated once into `cache/<size>/` and reused by later runs."""
    width, height = SIZES[size]
    folder = cache / size
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{GENERATOR_VERSION}_{seed:04d}.jpg" for seed in range(count)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        reporter = reporter or NullReporter()
        reporter.start(f"generating {len(missing)} {size} JPEGs into {folder}", len(missing))
        jobs = [(p, width, height, int(p.stem.split("_")[1])) for p in missing]
        # forkserver: the bench process may hold CUDA by now (host_info), which a forked child must not inherit.
        with ProcessPoolExecutor(max_workers=usable_cpus(), mp_context=multiprocessing.get_context("forkserver")) as pool:
            for _ in pool.map(_write_jpeg, jobs):
                reporter.advance()
    return paths


def realdata_dir() -> Path:
    return Path(os.environ.get("LANDMARKS_REALDATA", REPO.parent / "shared" / "realdata")).resolve()


def real_images(root: Path) -> list[Path]:
    from shared.gallery import image_files
    return image_files(root) if root.is_dir() else []


@dataclass
class BenchInputs:
    unique: list[Path]  # the distinct photos; events cycle over them
    file_root: Path  # what the worker may read (LANDMARKS_FILE_ROOTS)
    n: int
    blobs: list[bytes]  # n photos' bytes, in event order
    image_of_event: list[int]  # event i shows unique[image_of_event[i]]
    unique_blobs: list[bytes]  # each distinct photo's bytes, in the order of `unique`

    @property
    def file_mb_mean(self) -> float:
        return round(statistics.mean(len(b) / 1e6 for b in self.unique_blobs), 2)


def bench_inputs(cfg: BenchConfig, reporter: Reporter) -> BenchInputs | None:
    """Generated camera-like JPEGs (cached under $LANDMARKS_HOME/bench), or the real photos in place;
    None when `real` is asked for and there are none."""
    if cfg.size == "real":
        file_root = realdata_dir()
        unique = real_images(file_root)
        if not unique:
            return None
        n = cfg.images or 2 * len(unique)
    elif cfg.size in SIZES:
        n = cfg.images
        wanted = min(n, 4 if cfg.quick else (48 if cfg.size == "12mp" and not cfg.cuda else 64))
        cache = cfg.home.expanduser().resolve() / "bench"
        unique = generated_images(cache, cfg.size, wanted, reporter)
        file_root = (cache / cfg.size).resolve()
    else:
        raise ValueError(f"unknown size {cfg.size!r}; choose 12mp, 2mp or real")
    blobs = [p.read_bytes() for p in unique]
    image_of_event = [i % len(unique) for i in range(n)]
    return BenchInputs(unique, file_root, n, [blobs[i] for i in image_of_event], image_of_event, blobs)
