"""Throughput benchmark of one recognition worker: each stage alone (decode, model, search, write) and the
whole worker end to end (events through Redis → a real Celery worker → tags in PostgreSQL, Milvus in the
loop), side by side on one machine, so that the end-to-end figure can be compared with its physical bound.

The bound is the slowest *resource*: stages that share one (on a CPU-only machine decode and the model
share the cores) combine as 1/Σ(1/x). `landmarks bench --json` prints one JSON object (see BENCHMARKS.md).
"""

from __future__ import annotations

import ast
import gc
import io
import json
import logging
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from PIL import Image, ImageDraw

from shared.device_decode import DeviceJpegDecoder
from shared.errors import DecodeError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
GENERATOR_VERSION = "v1"  # bump when camera_jpeg changes, so cached inputs are regenerated
SIZES: dict[str, tuple[int, int]] = {"12mp": (4000, 3000), "2mp": (1600, 1200)}
STAGES = ("decode", "model", "search", "write")
DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)
LANDMARK_IMAGE_EVERY = 32  # one generated image in 32 shows a "landmark" (the article: 1–3 % of photos)
SEARCH_SCALE_SIZES = (10_000, 100_000, 1_000_000)
MILVUS_INSERT_CAP_S = 180.0


# ----------------------------------------------------------------------------------------- progress

class Reporter(Protocol):
    def start(self, what: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...


class NullReporter:
    def start(self, what: str, total: int | None = None) -> None:
        log.info("bench: %s", what)

    def advance(self, n: int = 1) -> None:
        pass


# ----------------------------------------------------------------------------------------- inputs

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
        with ProcessPoolExecutor(max_workers=cpu_count()) as pool:
            for _ in pool.map(_write_jpeg, jobs):
                reporter.advance()
    return paths


def realdata_dir() -> Path:
    return Path(os.environ.get("LANDMARKS_REALDATA", REPO.parent / "shared" / "realdata")).resolve()


def real_images(root: Path) -> list[Path]:
    from shared.gallery import image_files
    return image_files(root) if root.is_dir() else []


# ----------------------------------------------------------------------------------------- bound math

def combined_rate(rates: Iterable[float]) -> float:
    """Throughput of stages that take turns on one resource: 1 / Σ(1/x)."""
    rates = list(rates)
    if not rates:
        raise ValueError("no rates to combine")
    if any(r <= 0 for r in rates):
        return 0.0
    return 1.0 / sum(1.0 / r for r in rates)


def throughput_bound(stages: Mapping[str, float], resources: Mapping[str, str]) -> tuple[float, str]:
    """The slowest resource's throughput, each resource running its stages in turn; and its name."""
    groups: dict[str, list[float]] = {}
    for stage, rate in stages.items():
        groups.setdefault(resources[stage], []).append(rate)
    per_resource = {resource: combined_rate(rates) for resource, rates in groups.items()}
    limiting = min(per_resource, key=per_resource.__getitem__)
    return per_resource[limiting], limiting


def stage_resources(device: str, decoder: str, search_in_process: bool = False) -> dict[str, str]:
    """Which resource each stage occupies. The search runs in the worker's replica on the cores, or in the
    Milvus server; the write in PostgreSQL; the CPU pool decodes on the cores, the hardware JPEG engine
    (nvImageCodec HW) is its own unit, while torchvision's nvJPEG runs on the GPU's SMs next to the model."""
    model = "gpu" if device.startswith("cuda") else "cpu"
    decode = "cpu" if decoder == "pillow" else DeviceJpegDecoder.UNITS[decoder]
    return {"decode": decode, "model": model, "search": "cpu" if search_in_process else "milvus",
            "write": "postgres"}


# ----------------------------------------------------------------------------------------- host

def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_info() -> dict:
    import torch
    info = {"cpus": cpu_count(), "cpu_model": platform.processor() or platform.machine(),
            "ram_gb": None, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gb"] = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _busy_cpu_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its children (reaped ones, and live ones such as milvus-lite)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    try:
        import psutil
        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
    except ImportError:
        pass
    return total


class CpuAccount:
    """How much of the machine other processes used during a run: a shared machine makes figures noisy,
    and the JSON says so instead of hiding it. PostgreSQL's and Redis's work for the bench counts as
    'other' (they are not our children), so a few percent is expected."""

    def __init__(self) -> None:
        self._wall, self._busy, self._own = time.monotonic(), _busy_cpu_s(), _own_cpu_s()

    def other_share(self) -> float | None:
        busy = _busy_cpu_s()
        if busy is None or self._busy is None:
            return None
        wall = time.monotonic() - self._wall
        other = (busy - self._busy) - (_own_cpu_s() - self._own)
        return round(max(0.0, other) / (wall * cpu_count()), 3) if wall > 0 else None


def rss_mb(pid: int) -> float | None:
    """RSS of a process and all its descendants (the worker and its decode processes), in MB."""
    total = 0.0
    for member in [pid, *_descendants(pid)]:
        mb = _own_rss_mb(member)
        if mb is None and member == pid:
            return None  # the process is gone
        total += mb or 0.0
    return round(total, 1)


def _own_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) of a process's own threads, and of its live descendants (the worker's
    decode forkserver and processes); None when the process is gone. From /proc (Linux)."""
    own = _own_cpu_seconds(pid)
    if own is None:
        return None
    return own, sum(_own_cpu_seconds(child) or 0.0 for child in _descendants(pid))


def _own_cpu_seconds(pid: int) -> float | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _descendants(pid: int) -> list[int]:
    """From /proc (Linux); empty elsewhere."""
    parents: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


# ----------------------------------------------------------------------------------------- config

@dataclass
class BenchConfig:
    device: str = "cpu"  # cpu | cuda | cuda:N
    size: str = "2mp"  # 12mp | 2mp | real
    images: int | None = None
    quick: bool = False
    backbone: str | None = None
    input_size: int | None = None
    embedding_dim: int | None = None
    batch_size: int | None = None
    centroids: int | None = None
    compile: bool = False
    max_wait_ms: int | None = None  # the worker's LANDMARKS_MAX_WAIT_MS; None keeps the served setting
    delf: bool = True  # the DELF comparison costs ~30 s on 2 CPU cores; long RSS runs may skip it
    load_only: bool = False  # only the worker end to end: a long backlog's throughput and memory over time
    workers: int = 1  # worker processes end to end
    home: Path = Path(".landmarks")
    seed: int = 0

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def resolved(self) -> BenchConfig:
        """Defaults by device: the served model of each machine, and enough images that filling and draining
        the worker's pipeline (a batch or two) weigh little against the steady state (32-128 batches)."""
        cuda = self.cuda
        batch = self.batch_size or _env_int("LANDMARKS_BATCH_SIZE") or (256 if cuda else 64)
        if self.quick:
            images, batch = self.images or 16, self.batch_size or 8
        else:  # `real` defaults to two passes over the photos found
            images = self.images or {("12mp", False): 2048, ("2mp", False): 8192, ("12mp", True): 2048,
                                     ("2mp", True): 4096}.get((self.size, cuda))
        return replace(self, images=images, batch_size=batch,
                       backbone=self.backbone or ("wide_resnet50_2" if cuda else "resnet_small"),
                       input_size=self.input_size or (224 if cuda else 96),
                       embedding_dim=self.embedding_dim or (512 if cuda else 128),
                       centroids=self.centroids or (300 if self.quick else 10_000))

    @property
    def precision(self) -> str:
        return "bf16" if self.cuda else "fp32"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value and value.isdigit() else None


# ----------------------------------------------------------------------------------------- timing

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], *, iters: int, warmup: int, device: str = "cpu",
                best: bool = False) -> float:
    """Median seconds per call; `best` takes the fastest instead, for latencies on a shared machine
    (interference only ever adds time)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def adaptive_time(fn: Callable[[], object], *, iters: int, slow_s: float = 2.0) -> float:
    """Median seconds per call, but a call slower than `slow_s` is timed once: at 1M centroids one
    milvus-lite geo batch takes about a minute, and repeating it would not change the conclusion."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > slow_s:
        return first
    return median_time(fn, iters=iters, warmup=0)


def _cycle(items: Sequence, n: int) -> list:
    return [items[i % len(items)] for i in range(n)]


# ----------------------------------------------------------------------------------------- decode

def decode_stage(blobs: Sequence[bytes], size: int, *, workers: int | None = None,
                 max_pixels: int = 100_000_000, reporter: Reporter | None = None) -> dict:
    """Pillow draft-mode decode (shared.imaging, the worker's decoder) in a thread pool sized to the cores."""
    from shared.imaging import decode_image

    def one(data: bytes) -> bool:
        try:
            decode_image(data, size=size, max_pixels=max_pixels)
            return True
        except DecodeError:
            return False

    workers = workers or cpu_count()
    reporter = reporter or NullReporter()
    reporter.start(f"decode-only: Pillow draft, {workers} threads", len(blobs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-decode") as pool:
        list(pool.map(one, blobs[:workers]))  # warm the threads and Pillow's codec
        start, ok = time.perf_counter(), 0
        for decoded in pool.map(one, blobs):
            ok += decoded
            reporter.advance()
        elapsed = time.perf_counter() - start
    return {"img_s": len(blobs) / elapsed, "failed": len(blobs) - ok, "workers": workers}


def gpu_decode_stage(decoder: DeviceJpegDecoder, paths: Sequence[Path], file_root: Path, size: int, *, batch: int,
                     reporter: Reporter | None = None) -> dict:
    """The worker's loading (shared/device_decode.load_split), alone: batches of ``batch`` photos, as many at
    once as the worker runs (LANDMARKS_BATCHES_IN_FLIGHT, each on its own CUDA stream). The worker's pool
    fetches every photo and reads the headers of the device's share; the device decodes that share while the
    pool decodes the rest, the split learnt as the worker learns it."""
    from shared.device_decode import DecodeSplit, load_split, thread_stream
    from shared.loading import LoadRequest, PhotoLoader
    from shared.settings import Settings
    reporter = reporter or NullReporter()
    settings = Settings(file_roots=str(file_root))
    split = DecodeSplit(settings.device_decode_share)
    requests = [LoadRequest(path.as_uri(), size) for path in paths]
    chunks = [requests[s:s + batch] for s in range(0, len(requests), batch)]
    loader = PhotoLoader(settings)

    def one(chunk: list) -> int:
        with thread_stream(decoder.device):
            _, on_device = load_split(loader, decoder, split, chunk, list(range(len(chunk))))
            if decoder.device.startswith("cuda"):  # this batch's stream only: the other batch runs on
                import torch
                torch.cuda.current_stream().synchronize()
        reporter.advance(len(chunk))
        return on_device

    try:
        one(chunks[0])  # warm-up: the pool's processes, the codec, CUDA kernels, the split's first rates
        reporter.start(f"decode-only: {decoder.name} + the CPU pool, split as the worker does", len(requests))
        with ThreadPoolExecutor(max_workers=settings.batches_in_flight) as threads:
            start = time.perf_counter()
            on_device = sum(threads.map(one, chunks))
            elapsed = time.perf_counter() - start
    finally:
        loader.close()
    return {"img_s": len(requests) / elapsed, "device_share": round(on_device / len(requests), 3),
            "split_rates": {k: round(v, 1) for k, v in split.rates.items()}}


# ----------------------------------------------------------------------------------------- model

def model_stage(embedder, batch_size: int, n_images: int, *, reporter: Reporter | None = None,
                min_batches: int = 3, max_seconds: float = 30.0) -> dict:
    """The served forward (shared.embedder.Embedder: uint8 host pixels in, normalised embeddings out)."""
    size = embedder.meta.input_size
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    batches = max(min_batches, math.ceil(n_images / batch_size))
    reporter = reporter or NullReporter()
    reporter.start(f"model-only: batch {batch_size} at {size} px", batches * batch_size)
    for _ in range(2):
        embedder.embed(pixels)  # warm-up: oneDNN/cuDNN algorithm choice, allocator
    start, cpu_start, done = time.perf_counter(), time.process_time(), 0
    while done < batches and (done < min_batches or time.perf_counter() - start < max_seconds):
        embedder.embed(pixels)  # returns host numpy: the device is synchronised
        done += 1
        reporter.advance(batch_size)
    images = done * batch_size
    return {"img_s": images / (time.perf_counter() - start), "batches": done,
            "cpu_ms_per_img": round((time.process_time() - cpu_start) * 1000 / images, 3)}


def device_model_figures(checkpoint: Path, device: str, batch_size: int, *, compile_model: bool,
                         reporter: Reporter | None = None) -> dict:
    """On CUDA, the forward alone (input already on the GPU, bf16, channels_last), optionally compiled:
    what the worker's forward could reach without host copies."""
    import torch
    from shared.model import load_checkpoint
    net, meta, _ = load_checkpoint(checkpoint)
    net = net.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, meta.input_size, meta.input_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    figures = {}
    reporter = reporter or NullReporter()

    def run(model) -> Callable[[], object]:
        def fn():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model.embed(x) if hasattr(model, "embed") else model(x)
        return fn

    reporter.start("model on device (bf16, channels_last)")
    figures["model_device_img_s"] = round(batch_size / median_time(run(net), iters=15, warmup=3, device=device), 1)
    if compile_model:
        reporter.start("model on device, torch.compile (compiling)")
        compiled = torch.compile(net.embed)
        start = time.perf_counter()
        run(compiled)()
        torch.cuda.synchronize()
        figures["compile_s"] = round(time.perf_counter() - start, 1)
        t = median_time(run(compiled), iters=15, warmup=2, device=device)
        figures["model_compiled_img_s"] = round(batch_size / t, 1)
    del net, x
    torch.cuda.empty_cache()
    return figures


def overlap_figures(decoder: DeviceJpegDecoder, blobs: Sequence[bytes], checkpoint: Path, device: str,
                    batch_size: int, seconds: float = 6.0) -> dict:
    """GPU decode in a thread while the model runs: what each keeps when they share the card."""
    import threading
    import torch
    from shared.model import load_checkpoint
    net, meta, _ = load_checkpoint(checkpoint)
    net = net.to(device).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, 3, meta.input_size, meta.input_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    chunk = list(blobs[:64])
    stop = time.perf_counter() + seconds
    decoded = [0]

    def decode_loop() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            while time.perf_counter() < stop:
                decoder.decode(chunk, meta.input_size)
                torch.cuda.current_stream().synchronize()
                decoded[0] += len(chunk)

    thread = threading.Thread(target=decode_loop, daemon=True)
    start = time.perf_counter()
    thread.start()
    forwards = 0
    while time.perf_counter() < stop:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            net.embed(x)
        torch.cuda.synchronize()
        forwards += 1
    thread.join()
    elapsed = time.perf_counter() - start
    del net, x
    torch.cuda.empty_cache()
    return {"decode_img_s": round(decoded[0] / elapsed, 1), "model_img_s": round(forwards * batch_size / elapsed, 1)}


def delf_vs_ours(embedder, device: str, *, quick: bool, article_model: bool,
                 reporter: Reporter | None = None) -> dict:
    """The article's speed comparison at batch 1: a DELF-style extraction (ResNet-50 to conv4 at 7 scales
    of a 1024-px image, fp32, as in ../shared/tools/gpu_anchor.py) against one pass of our served model;
    plus one WRN-50-2 224-px fp32 pass (the article's network) when the served backbone is another.
    Best of N: these are latencies, and on a shared machine interference only adds time."""
    import torch
    import torchvision
    reporter = reporter or NullReporter()
    cuda = device.startswith("cuda")
    side = 256 if quick else 1024
    # On CPU a first pass costs what the next ones do (13 s at 1024 px on 2 cores): warm up at one scale.
    iters, warmup = (1, 0) if quick else ((10, 3) if cuda else (2, 0))
    reporter.start(f"DELF-style 7 scales of {side}x{side} (ResNet-50 to conv4, fp32, batch 1)")
    trunk = torch.nn.Sequential(*list(torchvision.models.resnet50(weights=None).children())[:-3]).eval().to(device)
    image = torch.randn(1, 3, side, side, device=device)

    def delf() -> None:
        with torch.inference_mode():
            for scale in DELF_SCALES:
                trunk(torch.nn.functional.interpolate(image, scale_factor=scale, mode="bilinear"))

    with torch.inference_mode():
        trunk(torch.nn.functional.interpolate(image, scale_factor=DELF_SCALES[0], mode="bilinear"))
    delf_ms = median_time(delf, iters=iters, warmup=warmup, device=device, best=True) * 1e3
    del trunk, image
    reporter.start("our model, one image")
    one = np.random.default_rng(1).integers(0, 256, (1, embedder.meta.input_size, embedder.meta.input_size, 3),
                                            dtype=np.uint8)
    rounds = []
    for _ in range(1 if quick else 3):  # spread over seconds: a shared machine has slow episodes
        rounds.append(median_time(lambda: embedder.embed(one), iters=5 if quick else 20, warmup=3, device=device,
                                  best=True))
        time.sleep(0 if quick else 0.5)
    ours_ms = min(rounds) * 1e3
    out = {"delf_style_ms": round(delf_ms, 2), "ours_ms": round(ours_ms, 3),
           "delf_over_ours": round(delf_ms / ours_ms, 1), "delf_image_px": side}
    if article_model and embedder.meta.backbone != "wide_resnet50_2":
        reporter.start("WRN-50-2 224 px fp32, one image (the article's network)")
        wrn = torchvision.models.wide_resnet50_2(weights=None).eval().to(device)
        x = torch.randn(1, 3, 224, 224, device=device)

        def article() -> None:
            with torch.inference_mode():
                wrn(x)

        wrn_ms = median_time(article, iters=3 if not cuda else 20, warmup=1 if not cuda else 3, device=device,
                             best=True) * 1e3
        out.update(ours_wrn50_2_ms=round(wrn_ms, 2), delf_over_wrn50_2=round(delf_ms / wrn_ms, 1))
        del wrn, x
    if cuda:
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------- gallery

def synthetic_places(n_landmarks: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Landmark coordinates clustered in cities (~100 landmarks per city, a few km apart), so that the
    1x1 km geo filter meets a realistic handful of candidates."""
    n_cities = max(1, n_landmarks // 100)
    city_lat = rng.uniform(-45, 60, n_cities)
    city_lon = rng.uniform(-180, 180, n_cities)
    city = rng.integers(0, n_cities, n_landmarks)
    lats = np.clip(city_lat[city] + rng.normal(0, 0.03, n_landmarks), -89.9, 89.9)
    lons = (city_lon[city] + rng.normal(0, 0.04, n_landmarks) + 180) % 360 - 180
    return lats, lons


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_gallery(n_centroids: int, dim: int, anchors: np.ndarray, seed: int = 0) -> dict:
    """A checkpoint gallery of ~n_centroids random unit centroids (1–5 per landmark, 3 references each).
    Landmark k < len(anchors) is anchored on anchors[k] (centroid 0 and references), so the photos that
    produced those embeddings are recognised: the bench exercises the tag path, not only rejections."""
    import torch
    rng = np.random.default_rng(seed)
    counts = []
    while sum(counts) < n_centroids:
        counts.append(min(1 + len(counts) % 5, n_centroids - sum(counts)))
    n_landmarks = len(counts)
    lats, lons = synthetic_places(n_landmarks, rng)
    ids = np.repeat(np.arange(1, n_landmarks + 1), counts)
    nos = np.concatenate([np.arange(c) for c in counts])
    centroids = _unit(rng.standard_normal((len(ids), dim)).astype(np.float32))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    refs = _unit(np.repeat(centroids[first], 3, axis=0) + 0.3 * rng.standard_normal((3 * n_landmarks, dim)))
    for k, anchor in enumerate(anchors[:n_landmarks]):
        centroids[first[k]] = anchor
        refs[3 * k:3 * k + 3] = anchor
    landmarks = [{"id": int(i + 1), "slug": f"bench_{i + 1}", "name": f"Bench landmark {i + 1}",
                  "city": f"City {i // 100}", "country": "Benchland", "region": int(1 + i % 4),
                  "lat": float(lats[i]), "lon": float(lons[i])} for i in range(n_landmarks)]
    return {"landmarks": landmarks,
            "centroids": {"landmark_ids": torch.from_numpy(ids.astype(np.int64)),
                          "centroid_nos": torch.from_numpy(nos.astype(np.int32)),
                          "embeddings": torch.from_numpy(centroids)},
            "references": {"landmark_ids": torch.from_numpy(np.repeat(np.arange(1, n_landmarks + 1), 3)),
                           "embeddings": torch.from_numpy(refs)}}


@dataclass
class BenchModel:
    path: Path
    version: str
    meta: object
    image_embeddings: np.ndarray  # of the unique input images, in order
    landmark_of_image: dict[int, int]  # unique image index → its anchored landmark id
    places: dict[int, tuple[float, float]]
    gallery: dict


def make_bench_model(out: Path, cfg: BenchConfig, images: Sequence[Path], reporter: Reporter) -> BenchModel:
    """A random-init served model (BatchNorm statistics from the inputs, as `landmarks model init` does)
    with a synthetic gallery; one input image in 32 is a landmark's centroid and references."""
    import torch
    from shared.embedder import Embedder
    from shared.imaging import decode_image
    from shared.model import LandmarkNet, ModelMeta, save_checkpoint
    from shared.modelinit import calibrate_batchnorm

    version = f"bench_{uuid.uuid4().hex[:8]}"
    reporter.start(f"model: random-init {cfg.backbone} {cfg.input_size} px, dim {cfg.embedding_dim}")
    torch.manual_seed(cfg.seed)
    meta = ModelMeta(version=version, backbone=cfg.backbone, embedding_dim=cfg.embedding_dim,
                     input_size=cfg.input_size, t_geo=0.98, t_global=0.98, t_ref=0.98)
    net = LandmarkNet(cfg.backbone, cfg.embedding_dim, 0).eval()
    pixels = []
    for path in images[:16]:
        try:
            pixels.append(decode_image(path.read_bytes(), size=cfg.input_size, max_pixels=10**9).pixels)
        except DecodeError:
            continue
    if len(pixels) > 1:
        calibrate_batchnorm(net, np.stack(pixels), meta.mean, meta.std)
    save_checkpoint(out, net, meta)
    reporter.start("embedding the input images (gallery anchors, search queries)", len(images))
    embedder = Embedder(out, cfg.device)
    embeddings = []
    dim = cfg.embedding_dim
    for start in range(0, len(images), 16):
        chunk = []
        for path in images[start:start + 16]:
            try:
                chunk.append(decode_image(path.read_bytes(), size=cfg.input_size, max_pixels=10**9).pixels)
            except DecodeError:
                chunk.append(None)
        ok = [p for p in chunk if p is not None]
        got = iter(embedder.embed(np.stack(ok)) if ok else [])
        embeddings += [next(got) if p is not None else np.zeros(dim, np.float32) for p in chunk]
        reporter.advance(len(chunk))
    image_embeddings = np.stack(embeddings).astype(np.float32)
    anchored = [i for i in range(0, len(images), LANDMARK_IMAGE_EVERY) if image_embeddings[i].any()]
    gallery = synthetic_gallery(cfg.centroids, dim, image_embeddings[anchored], seed=cfg.seed)
    save_checkpoint(out, net, meta, gallery)
    places = {row["id"]: (row["lat"], row["lon"]) for row in gallery["landmarks"]}
    return BenchModel(out, version, meta, image_embeddings, {img: k + 1 for k, img in enumerate(anchored)},
                      places, gallery)


def event_gps(i: int, image: int, model: BenchModel, rng: np.random.Generator) -> tuple[float, float] | None:
    """Half the events carry GPS (the article: half of the photos have none): at their landmark for
    landmark photos, else ~100 m from a random landmark so the geo filter finds candidates."""
    if i % 2:
        return None
    landmark = model.landmark_of_image.get(image) or int(rng.integers(1, len(model.places) + 1))
    lat, lon = model.places[landmark]
    return (float(lat + rng.normal(0, 0.001)), float(lon + rng.normal(0, 0.001)))


# ----------------------------------------------------------------------------------------- search, write

def search_stage(index, version: str, queries: np.ndarray, gps: Sequence[tuple[float, float] | None],
                 thresholds, batch_size: int, *, what: str, reporter: Reporter | None = None) -> dict:
    """shared.recognition.recognise_batch (geo-filtered search with GPS, global top-k + references
    without) over batches of the served size: the worker's search step, alone."""
    from shared.events import GeoPoint
    from shared.recognition import recognise_batch
    from shared.settings import get_settings
    settings = get_settings()
    points = [GeoPoint(lat=p[0], lon=p[1]) if p else None for p in gps]
    reporter = reporter or NullReporter()
    reporter.start(f"search-only: {what}", len(queries))

    def batch(s: int) -> int:
        tags = recognise_batch(queries[s:s + batch_size], points[s:s + batch_size], index, version, thresholds,
                               global_k=settings.global_top_k, geo_limit=settings.geo_top_k)
        return sum(bool(t) for t in tags)

    batch(0)  # warm-up: connection, reference cache
    start, tagged = time.perf_counter(), 0
    for s in range(0, len(queries), batch_size):
        tagged += batch(s)
        reporter.advance(min(batch_size, len(queries) - s))
    return {"img_s": len(queries) / (time.perf_counter() - start), "tagged": tagged}


def write_stage(engine, version: str, n: int, batch_size: int, landmark_ids: Sequence[int],
                reporter: Reporter | None = None) -> dict:
    """shared.db.writer.write_outcomes, one transaction per batch of the served size, on fresh events:
    a landmark tag for one photo in 32, half the photos with GPS."""
    from shared.db.session import transaction
    from shared.db.writer import write_outcomes
    from shared.events import GeoPoint, PhotoUploaded
    from shared.outcomes import GpsSource, Method, PhotoOutcome, PhotoStatus, Tag
    user = f"bench_write_{uuid.uuid4().hex[:6]}"
    now = datetime.now(timezone.utc)
    outcomes, rows = [], 0
    for i in range(n):
        event = PhotoUploaded(event_id=uuid.uuid4().hex, user_id=user, photo_id=f"w{i:07d}",
                              uri=f"file:///bench/{i}.jpg", uploaded_at=now)
        gps = GeoPoint(lat=48.8584, lon=2.2945) if i % 2 == 0 else None
        tags = [Tag(int(landmark_ids[i % len(landmark_ids)]), 0.99, Method.GEO if gps else Method.REFERENCE)] \
            if i % LANDMARK_IMAGE_EVERY == 0 else []
        outcomes.append(PhotoOutcome(event, PhotoStatus.TAGGED if tags else PhotoStatus.NO_LANDMARK, tags,
                                     gps=gps, gps_source=GpsSource.EVENT if gps else None))
        rows += 2 + len(tags)  # photos + processed_events + photo_tags
    reporter = reporter or NullReporter()
    reporter.start(f"write-only: one transaction per {batch_size} photos", n)
    start, cpu_start = time.perf_counter(), time.thread_time()
    for s in range(0, n, batch_size):
        with transaction(engine) as session:
            write_outcomes(session, version, outcomes[s:s + batch_size])
        reporter.advance(min(batch_size, n - s))
    elapsed = time.perf_counter() - start
    # The worker's own CPU for building and sending the statements (PostgreSQL's is on its server).
    client_ms = (time.thread_time() - cpu_start) * 1000 / n
    return {"img_s": n / elapsed, "rows_s": rows / elapsed, "client_cpu_ms_per_img": round(client_ms, 3)}


# ----------------------------------------------------------------------------------------- services

def service_urls(settings) -> tuple[str, str]:
    """PostgreSQL server and Redis broker: LANDMARKS_* when set, else the embedded stack's."""
    database = settings.database_url.get_secret_value() if settings.database_url else None
    broker = settings.broker_url.get_secret_value() if settings.broker_url else None
    if database is None or broker is None:
        from shared.stack import resolve
        urls = resolve(settings)
        database, broker = database or urls.database_url, broker or urls.broker_url
    return database, broker


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server of `server_url`, migrated to head, dropped at the end."""
    import sqlalchemy as sa
    from shared.db import migrate
    from shared.db.session import make_engine
    name = f"lm_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def private_milvus(folder: Path) -> Iterator[str]:
    """A milvus-lite gRPC server of the bench's own (a separate process, as in the embedded stack): the
    bench publishes and activates its model there, never moving a real fleet's `lm_active` alias."""
    from shared.stack import start_milvus, stop_milvus
    state: dict = {}
    try:
        yield start_milvus(folder / "milvus", state)
    finally:
        stop_milvus(state)


@contextmanager
def bench_queues(broker_url: str) -> Iterator[tuple[str, str]]:
    """A queue of the bench's own and a staging queue next to it; both deleted at the end."""
    import redis
    from shared.stack import redis_client_url
    name = f"lm_bench_{uuid.uuid4().hex[:8]}"
    try:
        yield name, f"{name}_staging"
    finally:
        client = redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=5)
        for key in client.scan_iter(f"{name}*"):
            client.delete(key)
        # kombu's binding tables are named after the exchange (Celery names it after the queue):
        # `_kombu.binding.<q>` and, since kombu 5.7, `_kombu.binding_permanent.<q>`.
        for key in client.scan_iter(f"_kombu.binding*.{name}*"):
            client.delete(key)
        for key in client.scan_iter("_kombu.binding.*"):
            if client.type(key) == b"set":
                members = [m for m in client.smembers(key) if name.encode() in m]
                if members:
                    client.srem(key, *members)
        client.close()


# ----------------------------------------------------------------------------------------- end to end

_BATCH_LINE = re.compile(r"batch of (\d+): .*?ms (\{.*\})\s*$")
_ON_DEVICE = re.compile(r", (\d+) decoded on the device,")


class WorkerLaps(NamedTuple):
    batches: int
    photos: int
    laps: dict[str, float]  # summed ms per stage
    decoded_on_device: int  # photos the device JPEG decoder decoded (0 on a CPU worker)


def worker_laps(log_text: str) -> WorkerLaps:
    """What the pipeline's per-batch log lines add up to, plain text or the JSON lines of
    LANDMARKS_LOG_JSON=1 (the message is their `msg`)."""
    batches, photos, laps, on_device = 0, 0, {}, 0
    for line in log_text.splitlines():
        if line.startswith("{"):
            try:
                line = str(json.loads(line).get("msg", ""))
            except (ValueError, AttributeError):
                continue
        match = _BATCH_LINE.search(line)
        if not match:
            continue
        try:
            timings = ast.literal_eval(match.group(2))
        except (ValueError, SyntaxError):
            continue
        batches, photos = batches + 1, photos + int(match.group(1))
        for key, value in timings.items():
            laps[key] = laps.get(key, 0.0) + float(value)
        device = _ON_DEVICE.search(line)
        on_device += int(device.group(1)) if device else 0
    return WorkerLaps(batches, photos, laps, on_device)


def _processed(engine, user: str) -> int:
    import sqlalchemy as sa
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM processed_events WHERE user_id = :u"),
                            {"u": user}).scalar_one()


def _count_tagged(engine, user: str) -> int:
    import sqlalchemy as sa
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM photos WHERE user_id = :u AND status = 'tagged'"),
                            {"u": user}).scalar_one()


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class E2EPlan:
    database_url: str
    broker_url: str
    milvus_uri: str
    queue: str
    staging: str
    file_root: Path
    events: list[dict]
    warmup: list[dict]
    batch_size: int
    device: str
    workdir: Path
    max_wait_ms: int | None = None
    torch_compile: bool = False  # the worker compiles its model at start (LANDMARKS_TORCH_COMPILE)
    stall_s: float = 180.0
    poll_s: float = 0.05  # how often progress is read from PostgreSQL (a long run polls less)
    workers: int = 1  # worker processes on the queue (several per GPU when one process's Python limits it)


class BenchWorkers:
    """The worker processes of an end-to-end run (`python -m shared.cli worker`), each with its own log."""

    def __init__(self, env: dict, count: int, workdir: Path) -> None:
        self.logs = [workdir / ("worker.log" if count == 1 else f"worker-{i}.log") for i in range(count)]
        self.procs: list[subprocess.Popen] = []
        for path in self.logs:
            with path.open("ab") as log_file:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "shared.cli", "-v", "worker", "--loglevel=INFO"],
                    env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT))

    def check_alive(self, done: int, n: int) -> None:
        for proc, path in zip(self.procs, self.logs):
            if proc.poll() is not None:
                raise RuntimeError(f"a bench worker exited with {proc.returncode} at {done}/{n} events:\n"
                                   f"{_tail(path)}")

    def tail(self) -> str:
        return "\n".join(_tail(path) for path in self.logs)

    def rss_mb(self) -> float | None:
        """All the workers and their decode processes; None once one is gone."""
        each = [rss_mb(proc.pid) for proc in self.procs]
        return None if None in each else round(sum(each), 1)

    def cpu_s(self) -> tuple[float, float] | None:
        each = [cpu_s(proc.pid) for proc in self.procs]
        return None if None in each else (sum(c[0] for c in each), sum(c[1] for c in each))

    def log_offsets(self) -> list[int]:
        return [path.stat().st_size for path in self.logs]

    def laps_since(self, offsets: list[int]) -> list[WorkerLaps]:
        """Each worker's batch laps written after ``offsets``."""
        laps = []
        for path, offset in zip(self.logs, offsets):
            with path.open("rb") as handle:
                handle.seek(offset)
                laps.append(worker_laps(handle.read().decode(errors="replace")))
        return laps

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Celery warm shutdown
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _wait_for(engine, user: str, n: int, workers: BenchWorkers, stall_s: float,
              on_poll: Callable[[int], None] | None = None, poll_s: float = 0.05) -> float:
    """Polls processed_events until `n` events of `user` are committed; the time the last one was seen.
    A long run polls every `poll_s`, but every 50 ms once the end may come before the next poll, so the
    end is timed closely."""
    last, last_change, step = -1, time.monotonic(), n
    while True:
        done = _processed(engine, user)
        now = time.perf_counter()
        if on_poll:
            on_poll(done)
        if done >= n:
            return now
        if done != last:
            step = done - max(last, 0)  # the progress of one poll
            last, last_change = done, time.monotonic()
        workers.check_alive(done, n)
        if time.monotonic() - last_change > stall_s:
            raise TimeoutError(f"no progress for {stall_s:.0f}s at {done}/{n} events:\n{workers.tail()}")
        time.sleep(poll_s if n - done > 2 * step else min(poll_s, 0.05))


def _worker_env(plan: E2EPlan) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LANDMARKS_MODEL_PATH"}
    env.update({"LANDMARKS_DATABASE_URL": plan.database_url, "LANDMARKS_BROKER_URL": plan.broker_url,
                "LANDMARKS_MILVUS_URI": plan.milvus_uri, "LANDMARKS_FILE_ROOTS": str(plan.file_root),
                "LANDMARKS_QUEUE": plan.queue, "LANDMARKS_BATCH_SIZE": str(plan.batch_size),
                "LANDMARKS_DEVICE": plan.device, "LANDMARKS_HOME": str(plan.workdir / "home"),
                "LANDMARKS_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"})
    if plan.workers > 1 and "LANDMARKS_DECODE_WORKERS" not in env:
        env["LANDMARKS_DECODE_WORKERS"] = str(max(1, cpu_count() // plan.workers))  # the cores, shared out
    if plan.max_wait_ms is not None:
        env["LANDMARKS_MAX_WAIT_MS"] = str(plan.max_wait_ms)
    if plan.torch_compile:
        env["LANDMARKS_TORCH_COMPILE"] = "1"
    return env


def run_end_to_end(plan: E2EPlan, reporter: Reporter) -> dict:
    """Events → Redis → `python -m shared.cli worker` (Celery, batches in a thread pool) → tags in PostgreSQL;
    ``plan.workers`` such processes on one queue, as a fleet runs several per machine.

    A warm-up set first (model load, first forward, connections); then all measured events are published
    into a staging list and moved into the workers' queue with one RENAME, so the clock measures the workers
    draining a backlog, not the producer. e2e_img_s = events / (last commit seen − the RENAME)."""
    import redis
    from celery import Celery
    from shared.db.session import make_engine
    from shared.settings import get_settings
    from shared.signing import event_signer
    from shared.stack import redis_client_url

    producer = Celery(broker=plan.broker_url)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    client = redis.Redis.from_url(redis_client_url(plan.broker_url), socket_timeout=30)
    engine = make_engine(plan.database_url)
    upload = "landmarks.photo_uploaded"
    reporter.start(f"end-to-end: starting {plan.workers} worker(s) and warming up", len(plan.warmup))
    workers = BenchWorkers(_worker_env(plan), plan.workers, plan.workdir)
    sign = event_signer(get_settings())  # a worker given a signing key refuses unsigned events
    try:
        for event in plan.warmup:
            producer.send_task(upload, args=[sign(event)], queue=plan.queue)
        warm_user = plan.warmup[0]["user_id"]
        _wait_for(engine, warm_user, len(plan.warmup), workers, max(plan.stall_s, 600.0),
                  on_poll=lambda d: reporter.advance(0), poll_s=0.2)
        time.sleep(0.5)  # let the warm-up batch finish acknowledging
        log_offsets = workers.log_offsets()
        rss_start = workers.rss_mb()

        reporter.start(f"end-to-end: publishing {len(plan.events)} events to a staging list")
        start = time.perf_counter()
        for event in plan.events:
            producer.send_task(upload, args=[sign(event)], queue=plan.staging)
        enqueue_s = time.perf_counter() - start
        if client.llen(plan.queue):
            raise RuntimeError(f"queue {plan.queue} is not empty after the warm-up")
        user, n = plan.events[0]["user_id"], len(plan.events)
        reporter.start(f"end-to-end: {n} events, batch {plan.batch_size}", n)
        rss_peak, seen, series = [rss_start or 0.0], [0], [[0, rss_start, 0.0]]

        def poll(done: int) -> None:
            reporter.advance(done - seen[0])
            seen[0] = done
            rss = workers.rss_mb() or 0.0
            rss_peak.append(rss)
            if done >= series[-1][0] + n / 10 or done >= n > series[-1][0]:  # one sample per tenth
                series.append([done, rss, round(time.perf_counter() - t0, 2)])

        cpu_start = workers.cpu_s()
        t0 = time.perf_counter()
        client.rename(plan.staging, plan.queue)  # the whole backlog appears at once
        t_end = _wait_for(engine, user, n, workers, plan.stall_s, on_poll=poll, poll_s=plan.poll_s)
        elapsed = t_end - t0
        cpu_end = workers.cpu_s()
        rss_end = workers.rss_mb()
        time.sleep(0.3)  # the last batch's log line
        per_worker = workers.laps_since(log_offsets)
        tagged = _count_tagged(engine, user)
    finally:
        workers.stop()
        producer.close()
        client.close()
        engine.dispose()
    return {"e2e_img_s": n / elapsed, "e2e_seconds": round(elapsed, 2), "enqueue_img_s": round(n / enqueue_s, 1),
            "rss_mb_start": rss_start, "rss_mb_end": rss_end, "rss_mb_peak": max(rss_peak),
            "rss_mb_series": series, **_laps_summary(per_worker, elapsed),
            "e2e_tagged": tagged, "worker_cpu_ms_per_img": _cpu_per_img(cpu_start, cpu_end, n),
            "worker_log": str(workers.logs[0])}


def _laps_summary(per_worker: list[WorkerLaps], elapsed: float) -> dict:
    """The workers' batch laps, together: per image, batches busy at once, batches per worker."""
    batches = sum(w.batches for w in per_worker)
    photos = sum(w.photos for w in per_worker)
    laps: dict[str, float] = {}
    for worker in per_worker:
        for key, value in worker.laps.items():
            laps[key] = laps.get(key, 0.0) + value
    return {
        "e2e_batches": batches, "e2e_mean_batch": round(photos / batches, 1) if batches else None,
        "worker_ms_per_img": {k: round(v / max(photos, 1), 3) for k, v in laps.items()},
        # Batch-seconds per second: how many batches were being worked on, on average (at most
        # LANDMARKS_BATCHES_IN_FLIGHT per worker); waiting for the model's turn does not count.
        "worker_batches_busy": round(sum(v for k, v in laps.items() if k != "wait_model") / 1e3 / elapsed, 3)
        if laps else None,
        "e2e_decoded_on_device": sum(w.decoded_on_device for w in per_worker),
        "e2e_workers": len(per_worker), "e2e_batches_by_worker": [w.batches for w in per_worker],
    }


def _cpu_per_img(start: tuple[float, float] | None, end: tuple[float, float] | None, n: int) -> dict | None:
    """The workers' CPU per photo during the measured run: `main`, the worker processes' own threads (Celery,
    the batch threads: on CPU the forward pass too), and `pool`, their decode processes. On a GPU worker,
    `main` is the host-side cost of a photo that one Python process must carry."""
    if start is None or end is None or not n:
        return None
    return {"main": round((end[0] - start[0]) * 1e3 / n, 3), "pool": round((end[1] - start[1]) * 1e3 / n, 3)}


# ----------------------------------------------------------------------------------------- the bench

@dataclass
class BenchInputs:
    unique: list[Path]  # the distinct photos; events cycle over them
    file_root: Path  # what the worker may read (LANDMARKS_FILE_ROOTS)
    n: int
    blobs: list[bytes]  # n photos' bytes, in event order
    image_of_event: list[int]  # event i shows unique[image_of_event[i]]

    @property
    def file_mb_mean(self) -> float:
        return round(statistics.mean(len(b) / 1e6 for b in self.blobs[:len(self.unique)]), 2)


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
    return BenchInputs(unique, file_root, n, [blobs[i] for i in image_of_event], image_of_event)


@contextmanager
def whole_machine_threads() -> Iterator[int]:
    """torch gets one intra-op thread per core while a stage is measured alone: the bound is what the
    machine can do, though the worker itself runs its forward pass on fewer (shared/runtime)."""
    import torch
    served = torch.get_num_threads()
    torch.set_num_threads(cpu_count())
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(served)


def worker_device_decoder(cfg: BenchConfig) -> DeviceJpegDecoder | None:
    """The device decoder the worker will detect (shared/pipeline.py), unless LANDMARKS_DEVICE_DECODE=off."""
    from shared.settings import get_settings
    if not cfg.cuda or get_settings().device_decode != "auto":
        return None
    return DeviceJpegDecoder.detect(cfg.device)


def decode_alone(cfg: BenchConfig, inputs: BenchInputs, count: int, gpu_decoder: DeviceJpegDecoder | None,
                 reporter: Reporter) -> dict:
    """The decode stage alone over the first ``count`` photos, with the worker's decoder: {decoder, img_s, ...}."""
    blobs = inputs.blobs[:count]
    if gpu_decoder is None:
        return {"decoder": "pillow", **decode_stage(blobs, cfg.input_size, reporter=reporter)}
    paths = [inputs.unique[i] for i in inputs.image_of_event[:count]]
    result = {"decoder": gpu_decoder.name, **gpu_decode_stage(gpu_decoder, paths, inputs.file_root, cfg.input_size,
                                                              batch=cfg.batch_size, reporter=reporter)}
    result["cpu_img_s"] = round(decode_stage(blobs[:min(len(blobs), 512)], cfg.input_size,
                                             reporter=reporter)["img_s"], 1)
    return result


def measure_stages(cfg: BenchConfig, inputs: BenchInputs, model: BenchModel, index, engine,
                   gps: Sequence[tuple[float, float] | None], reporter: Reporter) -> dict:
    """Each stage alone, on the resources the worker would use."""
    import torch
    from shared.embedder import Embedder
    from shared.local_index import LocalIndex
    from shared.publish import gallery_rows
    from shared.recognition import Thresholds
    n, blobs = inputs.n, inputs.blobs
    gpu_decoder = worker_device_decoder(cfg)
    out: dict = {"decode": decode_alone(cfg, inputs, n, gpu_decoder, reporter)}
    embedder = Embedder(model.path, cfg.device)
    embedder.load()
    with whole_machine_threads() as threads:
        out["model"] = model_stage(embedder, cfg.batch_size, n, reporter=reporter)
        out["model"]["torch_threads"] = threads
    if not cfg.cuda and torch.get_num_threads() != threads:  # the worker's own thread count, for comparison
        served = model_stage(embedder, cfg.batch_size, min(n, 2048), reporter=reporter)
        out["model_served"] = {"torch_threads": torch.get_num_threads(), "img_s": round(served["img_s"], 1),
                               "cpu_ms_per_img": served["cpu_ms_per_img"]}
    queries = model.image_embeddings[inputs.image_of_event]
    thresholds = Thresholds(model.meta.t_geo, model.meta.t_global, model.meta.t_ref)
    out["search"] = search_stage(index, model.version, queries, gps, thresholds, cfg.batch_size,
                                 what="milvus-lite (the worker's index)", reporter=reporter)
    # As the worker keeps it: its global search on the GPU when there is one.
    local = LocalIndex(model.version, *gallery_rows(model.gallery), device=cfg.device if cfg.cuda else None)
    out["search_local"] = search_stage(local, model.version, queries, gps, thresholds, cfg.batch_size,
                                       what=f"exact in-process LocalIndex ({local.device})", reporter=reporter)
    out["write"] = write_stage(engine, model.version, n, cfg.batch_size, sorted(model.places), reporter=reporter)
    if cfg.cuda:
        out["device_figures"] = device_model_figures(model.path, cfg.device, cfg.batch_size,
                                                     compile_model=cfg.compile, reporter=reporter)
        if gpu_decoder is not None:
            reporter.start("GPU decode and model together (6 s)")
            out["device_figures"]["concurrent"] = overlap_figures(
                gpu_decoder, blobs[:len(inputs.unique)], model.path, cfg.device, cfg.batch_size)
    del embedder, gpu_decoder, local
    gc.collect()
    if cfg.cuda:
        torch.cuda.empty_cache()  # the worker gets the card to itself
    return out


def comparison_stage(cfg: BenchConfig, model: BenchModel, reporter: Reporter) -> dict:
    """The DELF comparison, run after the end-to-end part: its gigabytes of activations and its minute of
    work on every core slowed the worker that started right after it (the first tenth of the run)."""
    from shared.embedder import Embedder
    if not cfg.delf:
        return {"delf_style_ms": None, "ours_ms": None}
    embedder = Embedder(model.path, cfg.device)
    embedder.load()
    with whole_machine_threads():
        return delf_vs_ours(embedder, cfg.device, quick=cfg.quick, article_model=not cfg.quick, reporter=reporter)


def run_bench(cfg: BenchConfig, reporter: Reporter | None = None) -> dict:
    """One run: inputs, private services, a published model; each stage alone; the worker end to end."""
    import torch
    from shared.db.session import make_engine
    from shared.index import LandmarkIndex
    from shared.publish import publish_model
    from shared.settings import get_settings
    reporter = reporter or NullReporter()
    cfg = cfg.resolved()
    if cfg.cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    from shared.runtime import configure_threads
    settings = get_settings()
    threads = configure_threads(settings.torch_threads, settings.blas_threads)  # as the worker does
    started, account, host = time.monotonic(), CpuAccount(), host_info()
    host["threads"], host["batches_in_flight"] = threads, settings.batches_in_flight
    inputs = bench_inputs(cfg, reporter)
    if inputs is None:
        return {"device": cfg.device, "size": cfg.size, "skipped": f"no real photos at {realdata_dir()}"}
    if cfg.cuda:
        torch.backends.cudnn.benchmark = True  # the bound is what the card can do
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lm-bench-")))
        database_server, broker_url = service_urls(settings)
        reporter.start("services: scratch database, private milvus-lite, bench queue")
        database_url = stack.enter_context(scratch_database(database_server))
        milvus_uri = stack.enter_context(private_milvus(workdir))
        queue, staging = stack.enter_context(bench_queues(broker_url))
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        index = LandmarkIndex(milvus_uri)
        stack.callback(index.close)

        model = make_bench_model(workdir / "model.pt", cfg, inputs.unique, reporter)
        reporter.start(f"publishing {cfg.centroids} centroids to milvus-lite")
        publish_model(model.path, engine, index)
        rng = np.random.default_rng(cfg.seed)
        gps = [event_gps(i, inputs.image_of_event[i], model, rng) for i in range(inputs.n)]
        stages = {} if cfg.load_only else measure_stages(cfg, inputs, model, index, engine, gps, reporter)

        run_id = uuid.uuid4().hex[:6]
        events = [_upload_event(f"bench_e2e_{run_id}", i, inputs.unique[inputs.image_of_event[i]], gps[i])
                  for i in range(inputs.n)]
        warm_rng = np.random.default_rng(cfg.seed + 1)
        k = len(inputs.unique)
        warmup = [_upload_event(f"bench_warm_{run_id}", i, inputs.unique[i % k], event_gps(i, i % k, model, warm_rng))
                  for i in range(2 * cfg.batch_size)]
        e2e = run_end_to_end(E2EPlan(database_url, broker_url, milvus_uri, queue, staging, inputs.file_root,
                                     events, warmup, cfg.batch_size, cfg.device, workdir, cfg.max_wait_ms,
                                     torch_compile=cfg.compile, stall_s=600.0 if cfg.compile else 180.0,
                                     poll_s=1.0 if cfg.load_only else 0.05, workers=cfg.workers), reporter)
        host["other_cpu_share"] = account.other_share()  # before the private milvus-lite stops
        if not cfg.load_only:
            # Decode is the stage that bounds a CPU run: measured again after the end-to-end part, so that a
            # machine whose speed drifts during the run (shared hosts do) is measured on both sides of it.
            stages["decode_after"] = decode_alone(cfg, inputs, max(1, inputs.n // 2), worker_device_decoder(cfg),
                                                  reporter)
            stages["comparison"] = comparison_stage(cfg, model, reporter)
    host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if cfg.load_only:
        return summarise_load(cfg, inputs, e2e, host, seconds=time.monotonic() - started)
    return summarise(cfg, inputs, stages, e2e, host, settings.max_wait_ms,
                     seconds=time.monotonic() - started)


def tenth_rates(series: Sequence[Sequence[float]]) -> list[float]:
    """Images/s within each step of an [events done, RSS MB, seconds] series."""
    return [round((b[0] - a[0]) / (b[2] - a[2]), 1) for a, b in zip(series, series[1:]) if b[2] > a[2]]


def summarise_load(cfg: BenchConfig, inputs: BenchInputs, e2e: dict, host: dict, seconds: float) -> dict:
    """`--load-only`: did the backlog drain at a steady rate in flat memory?"""
    series = e2e["rss_mb_series"]
    rates = tenth_rates(series)
    # The first tenth includes the backlog appearing at once and the first batches' warm caches.
    steady = rates[1:] or rates
    mean = statistics.mean(steady) if steady else None
    rss = [mb for _, mb, _ in series[1:] if mb]
    return {
        "device": cfg.device, "size": cfg.size, "events": inputs.n,
        "e2e_img_s": round(e2e["e2e_img_s"], 1), "e2e_seconds": e2e["e2e_seconds"],
        "img_s_by_tenth": rates,
        "img_s_min_max_tenth": [min(steady), max(steady)] if steady else None,
        "img_s_cv": round(statistics.pstdev(steady) / mean, 3) if mean else None,
        "rss_mb_start": e2e["rss_mb_start"], "rss_mb_end": e2e["rss_mb_end"], "rss_mb_peak": e2e["rss_mb_peak"],
        "rss_mb_growth_pct": round(100 * (max(rss) - min(rss)) / min(rss), 1) if rss else None,
        "rss_mb_series": series, "e2e_batches": e2e["e2e_batches"], "e2e_mean_batch": e2e["e2e_mean_batch"],
        "worker_ms_per_img": e2e["worker_ms_per_img"], "worker_batches_busy": e2e["worker_batches_busy"],
        "worker_cpu_ms_per_img": e2e["worker_cpu_ms_per_img"], "e2e_workers": e2e["e2e_workers"],
        "e2e_batches_by_worker": e2e["e2e_batches_by_worker"],
        "model": f"random-init {cfg.backbone}, {cfg.input_size} px, dim {cfg.embedding_dim}, {cfg.precision}",
        "batch_size": cfg.batch_size, "centroids": cfg.centroids, "unique_inputs": len(inputs.unique),
        "file_mb_mean": inputs.file_mb_mean, "host": host, "seconds": round(seconds, 1),
    }


def summarise(cfg: BenchConfig, inputs: BenchInputs, stages: dict, e2e: dict, host: dict,
              served_max_wait_ms: int, seconds: float) -> dict:
    """The JSON object: the contract keys first, then what explains them."""
    from shared.settings import get_settings
    # The worker searches its in-process replica when the gallery fits (LANDMARKS_SEARCH_REPLICA_MAX_CENTROIDS).
    in_process = 0 < cfg.centroids <= get_settings().search_replica_max_centroids
    rates = {name: stages["search_local" if name == "search" and in_process else name]["img_s"] for name in STAGES}
    decode_runs = [stages[k]["img_s"] for k in ("decode", "decode_after") if k in stages]
    rates["decode"] = statistics.mean(decode_runs)  # before and after the end-to-end part
    decode = stages["decode"]
    resources = stage_resources(cfg.device, decode["decoder"], search_in_process=in_process)
    bound, limiting = throughput_bound(rates, resources)
    serial = combined_rate(rates.values())
    comparison = stages["comparison"]
    return {
        "device": cfg.device, "size": cfg.size, "images": inputs.n,
        "e2e_img_s": round(e2e["e2e_img_s"], 1), "bound_img_s": round(bound, 1),
        "ratio": round(e2e["e2e_img_s"] / bound, 3) if bound else None,
        "stages": {f"{name}_img_s": round(rate, 1) for name, rate in rates.items()},
        "rss_mb_start": e2e["rss_mb_start"], "rss_mb_end": e2e["rss_mb_end"],
        "delf_style_ms": comparison["delf_style_ms"], "ours_ms": comparison["ours_ms"],
        "model": f"random-init {cfg.backbone}, {cfg.input_size} px, dim {cfg.embedding_dim}, {cfg.precision}",
        "backbone": cfg.backbone, "batch_size": cfg.batch_size,
        "max_wait_ms": cfg.max_wait_ms if cfg.max_wait_ms is not None else served_max_wait_ms,
        "input_size": cfg.input_size, "embedding_dim": cfg.embedding_dim, "precision": cfg.precision,
        "model_stage_threads": stages["model"].get("torch_threads"),
        "model_cpu_ms_per_img": stages["model"].get("cpu_ms_per_img"),
        **({"model_served": stages["model_served"]} if "model_served" in stages else {}),
        "decoder": decode["decoder"], "resources": resources, "limiting_resource": limiting,
        "bound_serial_img_s": round(serial, 1),
        "ratio_serial": round(e2e["e2e_img_s"] / serial, 3) if serial else None,
        "search_local_img_s": round(stages["search_local"]["img_s"], 1),
        "search_milvus_img_s": round(stages["search"]["img_s"], 1), "search_in_process": in_process,
        "write_rows_s": round(stages["write"]["rows_s"], 1),
        "write_client_cpu_ms_per_img": stages["write"]["client_cpu_ms_per_img"],
        "centroids": cfg.centroids, "unique_inputs": len(inputs.unique), "file_mb_mean": inputs.file_mb_mean,
        "decode_failed": decode.get("failed", 0),
        "decode_img_s_before": round(decode_runs[0], 1), "decode_img_s_after": round(decode_runs[-1], 1),
        **({"decode_cpu_img_s": decode["cpu_img_s"]} if "cpu_img_s" in decode else {}),
        **({"decode_device_share": decode["device_share"], "decode_split_rates": decode["split_rates"]}
           if "device_share" in decode else {}),
        **{k: v for k, v in comparison.items() if k not in ("delf_style_ms", "ours_ms")},
        **stages.get("device_figures", {}),
        **{k: v for k, v in e2e.items() if k not in ("e2e_img_s", "rss_mb_start", "rss_mb_end", "worker_log")},
        "search_tagged": stages["search"]["tagged"], "quick": cfg.quick, "host": host,
        "seconds": round(seconds, 1),
    }


def _scratch_mb(call: Callable[[], object]) -> float:
    """The peak memory ``call`` allocates while it runs (numpy's arrays included), in MB: the transient RSS
    a worker's batch thread adds."""
    import tracemalloc
    tracemalloc.start()
    try:
        call()
        return round(tracemalloc.get_traced_memory()[1] / 2 ** 20, 1)
    finally:
        tracemalloc.stop()


def _upload_event(user: str, i: int, path: Path, gps: tuple[float, float] | None) -> dict:
    event = {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": f"{user}_{i:07d}",
             "uri": path.resolve().as_uri(), "uploaded_at": "2026-11-26T10:00:00Z"}
    if gps:
        event["gps"] = {"lat": gps[0], "lon": gps[1]}
    return event


# ----------------------------------------------------------------------------------------- search scale

def run_search_scale(cfg: BenchConfig, reporter: Reporter | None = None,
                     sizes: Sequence[int] = SEARCH_SCALE_SIZES, milvus_cap_s: float = MILVUS_INSERT_CAP_S) -> dict:
    """Centroid search at growing gallery sizes: milvus-lite (FLAT, IP; what the worker queries) against the
    exact in-process LocalIndex (and, with --device cuda, the same replica with its global search on the GPU,
    as a GPU worker keeps it); 64-query batches, global top-k and 1x1 km geo-filtered, as recognise_batch
    issues them."""
    import torch
    from shared import geo
    from shared.index import CentroidRows, LandmarkIndex, ReferenceRows
    from shared.local_index import LocalIndex
    from shared.recognition import SQUARE_HALF_SIZE_M
    reporter = reporter or NullReporter()
    cfg = cfg.resolved()
    dim = cfg.embedding_dim
    batch = 64
    k = 10
    started = time.monotonic()
    account = CpuAccount()
    rng = np.random.default_rng(cfg.seed)
    rows, notes = [], []
    insert_rate = None  # rows/s seen so far, to decide whether the next size fits the cap
    with tempfile.TemporaryDirectory(prefix="lm-bench-scale-") as tmp, private_milvus(Path(tmp)) as uri:
        index = LandmarkIndex(uri, timeout=600)
        try:
            for n in sizes:
                reporter.start(f"search scale: {n:,} centroids x {dim}")
                ids = np.arange(n, dtype=np.int64)
                lats, lons = synthetic_places(n, rng)
                emb = _unit(rng.standard_normal((n, dim), dtype=np.float32))
                centroids = CentroidRows(ids, np.zeros(n, np.int64), lats, lons, emb)
                empty = ReferenceRows(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
                pick = rng.integers(0, n, batch)
                queries = _unit(emb[pick] + 0.5 * rng.standard_normal((batch, dim), dtype=np.float32))
                tiles = [geo.tiles_covering_square(float(lats[p]), float(lons[p]), SQUARE_HALF_SIZE_M) for p in pick]
                row: dict = {"centroids": n}
                start = time.perf_counter()
                local = LocalIndex("scale", centroids, empty)
                row["local_build_s"] = round(time.perf_counter() - start, 2)
                g = adaptive_time(lambda: local.search_global(None, queries, k), iters=5)
                geo_t = adaptive_time(lambda: local.search_geo(None, queries, tiles, 256), iters=3)
                row.update(local_global_ms=round(g * 1e3, 2), local_geo_ms=round(geo_t * 1e3, 2),
                           local_global_img_s=round(batch / g, 1), local_geo_img_s=round(batch / geo_t, 1),
                           local_global_scratch_mb=_scratch_mb(lambda: local.search_global(None, queries, k)))
                del local
                if torch.cuda.is_available() and cfg.cuda:
                    on_gpu = LocalIndex("scale", centroids, empty, device=cfg.device)
                    t = median_time(lambda: on_gpu.search_global(None, queries, k), iters=20, warmup=3,
                                    device=cfg.device)
                    row.update(local_gpu_global_ms=round(t * 1e3, 3), local_gpu_global_img_s=round(batch / t, 1))
                    del on_gpu
                projected = n / insert_rate if insert_rate else 0.0
                if projected > milvus_cap_s:
                    row["milvus"] = (f"skipped: inserting {n:,} rows would take ~{projected:.0f}s at the "
                                     f"{insert_rate:,.0f} rows/s measured on the smaller gallery (cap {milvus_cap_s:.0f}s)")
                    notes.append(f"{n:,}: milvus-lite not measured, {row['milvus']}")
                else:
                    version = f"scale_{n}"
                    start = time.perf_counter()
                    index.publish(version, centroids, empty)
                    insert_s = time.perf_counter() - start
                    insert_rate = n / insert_s
                    g = adaptive_time(lambda: index.search_global(version, queries, k), iters=5)
                    geo_t = adaptive_time(lambda: index.search_geo(version, queries, tiles, 256), iters=3)
                    row.update(milvus_insert_s=round(insert_s, 1), milvus_global_ms=round(g * 1e3, 2),
                               milvus_geo_ms=round(geo_t * 1e3, 2), milvus_global_img_s=round(batch / g, 1),
                               milvus_geo_img_s=round(batch / geo_t, 1))
                    index.drop(version)
                rows.append(row)
                log.info("search scale %s", json.dumps(row))
        finally:
            index.close()
        other_share = account.other_share()
    host = {**host_info(), "other_cpu_share": other_share}
    return {"mode": "search_scale", "device": cfg.device, "dim": dim, "batch": batch, "k": k,
            "geo_limit": 256, "milvus_insert_cap_s": milvus_cap_s, "results": rows, "notes": notes,
            "host": host,
            "seconds": round(time.monotonic() - started, 1)}
