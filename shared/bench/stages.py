"""Each stage of the worker alone: decode (CPU pool, or the worker's GPU/pool split), the model, search and
writes, and the article's DELF-style comparison."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from shared.bench.config import NullReporter, Reporter
from shared.bench.gallery import LANDMARK_IMAGE_EVERY
from shared.cpus import usable_cpus
from shared.bench.timing import median_time
from shared.device_decode import DeviceJpegDecoder, stack_pixels, thread_stream
from shared.errors import DecodeError
from shared.runtime import on_every_thread

DELF_SCALES = (0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0)


def decode_stage(blobs: Sequence[bytes], size: int, *, workers: int | None = None,
                 max_pixels: int = 100_000_000, reporter: Reporter | None = None) -> dict:
    """Pillow draft-mode decode (shared.imaging, the worker's decoder) in a thread pool sized to the cores,
    and the CPU the decodes took (``cpu_ms_per_img``): the process's, every thread's, for libheif decodes a
    HEIC's tiles on threads of its own (a real iPhone photo: 80 ms on the calling thread, 490 ms in all)."""
    from shared.imaging import decode_image, one_thread_per_decode
    one_thread_per_decode()  # as the worker's pool decodes

    def one(data: bytes) -> bool:
        try:
            decode_image(data, size=size, max_pixels=max_pixels)
            return True
        except DecodeError:
            return False

    workers = workers or usable_cpus()
    reporter = reporter or NullReporter()
    reporter.start(f"decode-only: Pillow draft, {workers} threads", len(blobs))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-decode") as pool:
        list(pool.map(one, blobs[:workers]))  # warm the threads and Pillow's codec
        start, cpu_start, ok = time.perf_counter(), time.process_time(), 0
        for decoded in pool.map(one, blobs):
            ok += decoded
            reporter.advance()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"img_s": len(blobs) / elapsed, "failed": len(blobs) - ok, "workers": workers,
            "cpu_ms_per_img": round(cpu * 1e3 / len(blobs), 3)}


def decode_cost_by_format(blobs: Sequence[bytes], size: int, max_pixels: int = 100_000_000) -> dict:
    """Each distinct input decoded once, one after another, as the worker's pool decodes it: the CPU a photo
    of each format costs, every thread's (``refused``: those the decoder turned down). Among real photos a
    phone's HEIC costs many JPEGs."""
    from shared.imaging import decode_image, one_thread_per_decode
    one_thread_per_decode()
    spent: dict[str, list[float]] = {}
    for data in blobs:
        start = time.process_time()
        try:
            kind = decode_image(data, size=size, max_pixels=max_pixels).format
        except DecodeError:
            kind = "refused"
        spent.setdefault(kind, []).append(time.process_time() - start)
    return {kind: {"images": len(cpu), "cpu_ms": round(sum(cpu) * 1e3 / len(cpu), 2)}
            for kind, cpu in sorted(spent.items())}


def gpu_decode_stage(decoder: DeviceJpegDecoder, paths: Sequence[Path], file_root: Path, size: int, *, batch: int,
                     reporter: Reporter | None = None) -> dict:
    """The worker's loading (shared/device_decode.load_split), alone: batches of ``batch`` photos, as many at
    once as the worker runs (LANDMARKS_BATCHES_IN_FLIGHT, each on its own CUDA stream). The worker's pool
    fetches every photo and reads the headers of the device's share; the device decodes that share while the
    pool decodes the rest, the split learnt as the worker learns it."""
    from shared.device_decode import DecodeSplit, load_split
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


def handover_stage(paths: Sequence[Path], file_root: Path, size: int, *, batch: int, photos: int = 512,
                   reporter: Reporter | None = None) -> dict:
    """The worker's own CPU per photo for taking what its decode pool hands back (shared/loading.py): the
    pixels at the model's input size, and the whole JPEGs with their headers read that a GPU worker's
    device decoder takes. The pool's decoding is not counted, only this process's CPU: the part a GPU
    worker's one Python process has to spare for every photo. Each batch is used as the worker uses it (its
    pixels stacked, every page of its JPEGs read), so that memory mapped late is paid for here too."""
    from shared.loading import LoadRequest, PhotoLoader
    from shared.settings import Settings
    reporter = reporter or NullReporter()
    loader = PhotoLoader(Settings(file_roots=str(file_root)))
    chosen = [paths[i % len(paths)] for i in range(photos)]
    out: dict = {"spill_dir": loader.spill_dir, "arena_mb": loader.arena_bytes >> 20 if loader.arena else 0}
    try:
        for name, device_jpeg in (("pixels", False), ("jpeg", True)):
            requests = [LoadRequest(path.as_uri(), size, device_jpeg=device_jpeg) for path in chosen]
            reporter.start(f"decode pool hand-over: {name}", len(requests))
            _use(loader.load(requests[:batch]))  # warm-up: the pool's processes
            cpu = time.process_time()
            for start in range(0, len(requests), batch):
                chunk = requests[start:start + batch]
                _use(loader.load(chunk))
                reporter.advance(len(chunk))
            out[f"{name}_cpu_ms_per_img"] = round((time.process_time() - cpu) * 1000 / len(requests), 3)
    finally:
        loader.close()
    return out


def _use(loaded: list) -> None:
    """What the pipeline does with a batch: stacks the pixels; reads every page of the JPEGs."""
    from shared.imaging import DecodedImage, EncodedJpeg
    images = [item.image for item in loaded]
    pixels = [image.pixels for image in images if isinstance(image, DecodedImage)]
    if pixels:
        np.stack(pixels)
    for image in images:
        if isinstance(image, EncodedJpeg):
            np.frombuffer(image.data, dtype=np.uint8)[::4096].sum()


def model_stage(embedder, batch_size: int, n_images: int, *, reporter: Reporter | None = None,
                min_batches: int = 3, max_seconds: float = 30.0, in_flight: int = 1) -> dict:
    """The served forward (shared.embedder.Embedder: uint8 host pixels in, normalised embeddings out), with
    the batch put together as the pipeline does (stack_pixels). With ``in_flight`` batches at once (on
    CUDA, as the worker runs them), each thread sends its photos to the device on its own stream while
    another thread's forward runs, and the forwards take turns under one lock; one at a time, those copies
    would be counted as the model's time, which the worker does not spend."""
    size = embedder.meta.input_size
    rng = np.random.default_rng(0)
    photos = list(rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8))  # as the pool returns them
    batches = max(min_batches, math.ceil(n_images / batch_size))
    reporter = reporter or NullReporter()
    device_lock, count_lock = threading.Lock(), threading.Lock()
    done = 0

    def one_batch() -> None:
        with thread_stream(embedder.device):
            pixels = stack_pixels(photos, embedder.device)
            with device_lock:
                embedder.embed(pixels)  # returns host numpy: this batch's stream is synchronised

    def claim() -> bool:
        nonlocal done
        with count_lock:
            if done >= batches or (done >= min_batches and time.perf_counter() - start >= max_seconds):
                return False
            done += 1
            return True

    def worker() -> None:
        while claim():
            one_batch()
            reporter.advance(batch_size)

    with ThreadPoolExecutor(max_workers=in_flight) as threads:
        warm_up_s = []
        for _ in range(2):  # warm-up: oneDNN/cuDNN algorithm choice (cuDNN's is kept per thread), allocators
            round_start = time.perf_counter()
            on_every_thread(threads, in_flight, one_batch)
            warm_up_s.append(round(time.perf_counter() - round_start, 3))
        reporter.start(f"model-only: batch {batch_size} at {size} px, {in_flight} at once", batches * batch_size)
        start, cpu_start = time.perf_counter(), time.process_time()
        for future in [threads.submit(worker) for _ in range(in_flight)]:
            future.result()
    images = done * batch_size
    return {"img_s": images / (time.perf_counter() - start), "batches": done, "in_flight": in_flight,
            "cpu_ms_per_img": round((time.process_time() - cpu_start) * 1000 / images, 3), "warm_up_s": warm_up_s}


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
    decoded = [0]

    def decode_loop() -> None:
        with torch.cuda.stream(torch.cuda.Stream()):
            while time.perf_counter() < stop:
                _, refused = decoder.decode(chunk, meta.input_size)
                torch.cuda.current_stream().synchronize()
                decoded[0] += len(chunk) - len(refused)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            net.embed(x)
        # This thread's stream only: torch.cuda.synchronize() would wait for the decode thread's work as well
        # and count it against the model.
        torch.cuda.current_stream().synchronize()

    forward()  # cuDNN's timing for this shape on this thread, if the thread has not met it yet
    stop = time.perf_counter() + seconds
    thread = threading.Thread(target=decode_loop, daemon=True)
    start = time.perf_counter()
    thread.start()
    forwards = 0
    while time.perf_counter() < stop:
        forward()
        forwards += 1
    thread.join()
    elapsed = time.perf_counter() - start
    del net, x
    torch.cuda.empty_cache()
    return {"decode_img_s": round(decoded[0] / elapsed, 1), "model_img_s": round(forwards * batch_size / elapsed, 1)}


def delf_vs_ours(embedder, device: str, *, quick: bool, article_model: bool,
                 reporter: Reporter | None = None) -> dict:
    """The article's speed comparison at batch 1: a DELF-style extraction (ResNet-50 to conv4 at 7 scales
    of a 1024-px image, fp32, as in ../shared/tools/gpu_anchor.py) against one pass of the article's network
    (WRN-50-2 at 224 px) at the same precision, fp32, on the same device: ``ours_ms``. The served model's pass
    (on CPU a smaller backbone, on CUDA bf16) is reported beside it, ``ours_served_ms``; with
    ``article_model`` False (--quick) it stands in for ``ours_ms``. Best of N: these are latencies, and on a
    shared machine interference only adds time."""
    import torch
    reporter = reporter or NullReporter()
    cuda = device.startswith("cuda")
    side = 256 if quick else 1024
    embedder.load()  # first: on CUDA it lets cuDNN pick its fastest algorithms, for both sides alike
    delf_ms = _delf_style_ms(device, side, quick=quick, reporter=reporter)
    served_ms = _served_one_image_ms(embedder, device, quick=quick, reporter=reporter)
    out = {"delf_style_ms": round(delf_ms, 2), "delf_image_px": side, "ours_served_ms": round(served_ms, 3),
           "delf_over_served": round(delf_ms / served_ms, 1)}
    if article_model:
        ours_ms, ours_model = _article_model_ms(device, reporter=reporter), "wide_resnet50_2 224 px fp32"
    else:
        ours_ms, ours_model = served_ms, f"served {embedder.meta.backbone} {embedder.meta.input_size} px"
    out.update(ours_ms=round(ours_ms, 3), ours_model=ours_model, delf_over_ours=round(delf_ms / ours_ms, 1))
    if cuda:
        torch.cuda.empty_cache()
    return out


def _delf_style_ms(device: str, side: int, *, quick: bool, reporter: Reporter) -> float:
    import torch
    import torchvision
    cuda = device.startswith("cuda")
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
    return median_time(delf, iters=iters, warmup=warmup, device=device, best=True) * 1e3


def _served_one_image_ms(embedder, device: str, *, quick: bool, reporter: Reporter) -> float:
    reporter.start("our served model, one image")
    one = np.random.default_rng(1).integers(0, 256, (1, embedder.meta.input_size, embedder.meta.input_size, 3),
                                            dtype=np.uint8)
    rounds = []
    for _ in range(1 if quick else 3):  # spread over seconds: a shared machine has slow episodes
        rounds.append(median_time(lambda: embedder.embed(one), iters=5 if quick else 20, warmup=3, device=device,
                                  best=True))
        time.sleep(0 if quick else 0.5)
    return min(rounds) * 1e3


def _article_model_ms(device: str, *, reporter: Reporter) -> float:
    """One WRN-50-2 224-px pass in fp32, the DELF side's precision."""
    import torch
    import torchvision
    cuda = device.startswith("cuda")
    reporter.start("WRN-50-2 224 px fp32, one image (the article's network)")
    wrn = torchvision.models.wide_resnet50_2(weights=None).eval().to(device)
    x = torch.randn(1, 3, 224, 224, device=device)

    def article() -> None:
        with torch.inference_mode():
            wrn(x)

    return median_time(article, iters=20 if cuda else 3, warmup=3 if cuda else 1, device=device, best=True) * 1e3


def search_stage(index, version: str, queries: np.ndarray, gps: Sequence[tuple[float, float] | None],
                 thresholds, batch_size: int, *, what: str, reporter: Reporter | None = None,
                 budget_s: float | None = None) -> dict:
    """shared.recognition.recognise_batch (geo-filtered search with GPS, global top-k + references
    without) over batches of the served size: the worker's search step, alone. With ``budget_s`` it stops
    after the first batch that ends past the budget (milvus-lite's geo search takes a minute a batch at a
    million centroids); ``queries`` says how many were searched."""
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
    start, tagged, done = time.perf_counter(), 0, 0
    for s in range(0, len(queries), batch_size):
        tagged += batch(s)
        done += min(batch_size, len(queries) - s)
        reporter.advance(min(batch_size, len(queries) - s))
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return {"img_s": done / (time.perf_counter() - start), "tagged": tagged, "queries": done}


def write_stage(engine, version: str, n: int, batch_size: int, landmark_ids: Sequence[int],
                reporter: Reporter | None = None) -> dict:
    """shared.db.writer.write_live_outcomes, one transaction per batch of the served size, on fresh events:
    a landmark tag for one photo in 32, half the photos with GPS."""
    from shared.db.session import transaction
    from shared.db.writer import write_live_outcomes
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
            write_live_outcomes(session, version, outcomes[s:s + batch_size])
        reporter.advance(min(batch_size, n - s))
    elapsed = time.perf_counter() - start
    # The worker's own CPU for building and sending the statements (PostgreSQL's is on its server).
    client_ms = (time.thread_time() - cpu_start) * 1000 / n
    return {"img_s": n / elapsed, "rows_s": rows / elapsed, "client_cpu_ms_per_img": round(client_ms, 3)}
