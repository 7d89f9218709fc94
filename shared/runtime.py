"""A loaded model version (its embedder and decision thresholds), the per-stage clock and the worker's
CPU thread settings: what the live pipeline and the shadow pass share (its allocator settings:
shared/allocator.py)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.engine import Engine

from shared.cpus import usable_cpus
from shared.db.models import ModelVersion
from shared.db.session import transaction
from shared.embedder import Embedder
from shared.errors import InfrastructureError
from shared.index import CentroidRows, LandmarkIndex, ReferenceRows
from shared.local_index import LocalIndex
from shared.recognition import Thresholds

log = logging.getLogger(__name__)


def default_torch_threads(cores: int | None = None) -> int:
    """One intra-op thread per 4 cores. The decode pool already keeps every core busy, and on a CPU worker
    serving a light model the forward pass is a small share of the work (a sixth for 2 MP photos with
    resnet_small, less for larger ones), so it needs no more than a quarter of the cores. Fewer threads also
    cost less: on 2 cores one thread spends about 0.8 ms of CPU per image where two spend about 0.95 (the
    bench's `model_served` and `model_cpu_ms_per_img`), the two waiting for each other at every layer."""
    return max(1, (cores or usable_cpus()) // 4)


def configure_threads(torch_threads: int, blas_threads: int) -> dict[str, int]:
    """Thread counts for a worker whose decode pool, forward pass and search share the cores.

    - BLAS (numpy's OpenBLAS, used by the in-process search): its idle threads spin, waiting for the
      next product, and took a third of a core from the decode pool on 2 cores; the products are small
      (a batch against the active version's centroids), so 1 thread by default.
    - torch: intra-op threads as asked (0 = default_torch_threads(); a model's forward then runs on the
      threads its cost asks for: forward_threads); inter-op 1, since nothing here runs independent operators
      in parallel.
    Returns what was applied, for the start-up log."""
    import torch
    from threadpoolctl import threadpool_limits
    intra = torch_threads or default_torch_threads()
    torch.set_num_threads(intra)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already fixed: some operator ran first (tests, a second call)
        pass
    if blas_threads:
        threadpool_limits(limits=blas_threads, user_api="blas")
    return {"torch_intra_op": intra, "torch_inter_op": torch.get_num_interop_threads(), "blas": blas_threads}


# A forward that costs at least this much CPU per photo is most of a CPU worker's work whatever the photo size
# (decoding a 2 MP photo in draft mode costs about 7 ms, a 12 MP one about 33: BENCHMARKS.md), so it gets
# every core. WRN-50-2 at 224 px costs about 110 ms in bf16 on an AVX512-BF16 core, the default
# resnet_small at 96 px under 1 ms.
HEAVY_FORWARD_CPU_MS = 20.0


def forward_threads(embedder: Embedder, configured: int = 0, cores: int | None = None) -> int:
    """The torch threads ``embedder``'s forward runs on: ``configured`` (LANDMARKS_TORCH_THREADS) when set,
    else chosen by what its forward costs on this CPU (threads_for_cost; measured once, at the worker's
    warm-up) over ``cores`` (default: the usable CPUs). Off the CPU, torch's threads only serve host work: the
    worker's default."""
    embedder.load()  # its device is known once loaded
    if configured or embedder.device.type != "cpu":
        return configured or default_torch_threads(cores)
    return threads_for_cost(embedder.forward_cpu_ms(), cores)


def threads_for_cost(forward_cpu_ms: float, cores: int | None = None) -> int:
    """The torch intra-op threads for a CPU forward that costs ``forward_cpu_ms`` per photo: every usable core
    for a model that costs HEAVY_FORWARD_CPU_MS or more, one forward at a time (a worker serving WRN-50-2 at
    224 px ran 5.5 % faster so on 2 MP photos than with two one-thread forwards at once, which share the caches
    and the memory bus, and as fast on 12 MP ones: BENCHMARKS.md, twenty-ninth session);
    default_torch_threads() for a lighter one, whose forward then leaves the other cores to the decode pool."""
    cores = cores or usable_cpus()
    return cores if forward_cpu_ms >= HEAVY_FORWARD_CPU_MS else default_torch_threads(cores)


class ForwardTurns:
    """The batches' turns at the model, the live version's and the shadow's alike, first come first served.
    On a GPU one forward at a time: a batch's decode and host copies overlap another's forward on streams of
    their own, and two forwards would only split the device. On a CPU the forwards inside at once hold at
    most the usable cores, each as many as its torch threads (a forward with more threads than cores goes
    alone), and each runs on its own count: a forward on one thread runs in its batch's own thread, so on
    2 cores two batches' forwards take both cores at once."""

    def __init__(self, torch_threads: int = 0) -> None:
        """``torch_threads``: LANDMARKS_TORCH_THREADS (0: each model's forward_threads)."""
        self._torch_threads = torch_threads
        self._cores = 0  # known at the first use: usable_cpus() reads the cgroup's files
        self._held = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()

    def threads_for(self, embedder: Embedder) -> int:
        """The torch threads ``embedder``'s forward runs on here (forward_threads)."""
        return forward_threads(embedder, self._torch_threads, self._usable_cores())

    def model_turn(self, embedder: Embedder) -> contextlib.AbstractContextManager[None]:
        """The calling thread's turn at ``embedder``'s model, on the threads its forward runs on."""
        return self.turn(embedder.device, self.threads_for(embedder))

    @contextmanager
    def turn(self, device: torch.device, threads: int = 1) -> Iterator[None]:
        """The calling thread's turn at the model on ``device``, its forward to run on ``threads`` torch
        threads (CPU)."""
        need = self._take(device, threads)
        try:
            if device.type == "cpu":
                run_forwards_on(threads)
            yield
        finally:
            with self._changed:
                self._held -= need
                self._changed.notify_all()

    def _usable_cores(self) -> int:
        with self._changed:
            if not self._cores:
                self._cores = usable_cpus()
            return self._cores

    def _take(self, device: torch.device, threads: int) -> int:
        capacity = self._usable_cores() if device.type == "cpu" else 1
        with self._changed:
            need = min(max(1, threads), capacity)  # a GPU's capacity is 1: one forward at a time
            ticket = object()
            self._queue.append(ticket)
            self._changed.wait_for(lambda: self._queue[0] is ticket and self._held + need <= capacity)
            self._queue.popleft()
            self._held += need
            self._changed.notify_all()  # the next in line may fit beside this one
            return need


def run_forwards_on(threads: int) -> None:
    """The calling thread's torch ops from now on run on ``threads`` intra-op threads. Each thread keeps its
    own count (OpenMP's, fixed at its first parallel region to the process's count then), so a batch thread
    that served another model goes on with that model's count unless told."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def on_every_thread(executor: ThreadPoolExecutor, threads: int, fn: Callable[[], object],
                    timeout_s: float = 60.0) -> None:
    """``fn`` once on each of ``threads`` threads of ``executor``, one call at a time, and wait for them all.
    Each call first waits until all have started, so no thread takes two (an idle thread would otherwise
    take the next). ``threads`` must not exceed the executor's idle threads: past ``timeout_s`` the
    waiting calls raise threading.BrokenBarrierError."""
    started, one_at_a_time = threading.Barrier(threads, timeout=timeout_s), threading.Lock()

    def call() -> None:
        started.wait()
        with one_at_a_time:
            fn()
    for future in [executor.submit(call) for _ in range(threads)]:
        future.result()


@dataclass
class ModelRuntime:
    version: str
    embedder: Embedder
    thresholds: Thresholds
    replica: LocalIndex | None = None  # exact in-process search of this version, when it is kept


def published_gallery(version: str, gallery: dict, index: LandmarkIndex,
                      path: Path | None = None) -> tuple[CentroidRows, ReferenceRows]:
    """The rows of ``gallery``, the gallery of the model file loaded for ``version``, once Milvus (the system of
    record) confirms that it publishes this very gallery under ``version``: the same fingerprint (the same row
    counts for a version published before fingerprints). Another gallery means another build under the same
    name (`landmarks build --version V --out SAME.pt` run again, LANDMARKS_MODEL_PATH at another file), whose
    weights and thresholds would tag photos wrongly, with Milvus's centroids or its own: InfrastructureError, so
    the worker hands its batches back and tags nothing until the published file is back."""
    source = f"model file {path}" if path is not None else f"the model file loaded for {version}"
    if not gallery.get("landmarks"):
        raise InfrastructureError(f"{source} holds no gallery, so it cannot be the model published as {version}: "
                                  f"put the published file back, or build and publish this one under a new version")
    from shared.publish import gallery_rows
    try:
        centroids, references = gallery_rows(gallery)
        same = index.holds(version, centroids, references)
    except (KeyError, ValueError) as exc:  # a malformed gallery, or a version Milvus does not publish
        raise InfrastructureError(f"{source} cannot be checked against the gallery published as {version}: "
                                  f"{exc}") from exc
    if not same:
        raise InfrastructureError(
            f"{source} does not hold the gallery published as {version} (it holds {len(centroids)} centroids, "
            f"{len(references)} references): it is another build under that name. Put the published file back "
            "(or unset LANDMARKS_MODEL_PATH), or build this one under a new version and publish that")
    return centroids, references


def local_replica(version: str, gallery: dict, index: LandmarkIndex, max_centroids: int,
                  device: str = "cpu", path: Path | None = None) -> LocalIndex | None:
    """First the check that the model file loaded holds the gallery published as ``version``, whatever the size
    of the gallery (published_gallery: InfrastructureError if not); then an exact in-process copy of its
    centroids and references, built from that file (so it costs no transfer), unless it has more than
    ``max_centroids`` (0: none kept). Search then costs a matrix product instead of a Milvus round trip per tile
    group; on a CUDA ``device`` the global search's product runs there (shared/local_index.py)."""
    centroids, references = published_gallery(version, gallery, index, path)
    if max_centroids <= 0:
        return None
    if len(centroids) > max_centroids:
        log.info("version %s has %d centroids (> %d): searching Milvus", version, len(centroids), max_centroids)
        return None
    on_gpu = str(device).startswith("cuda")
    log.info("searching %d centroids of %s in process%s", len(centroids), version, f" (on {device})" if on_gpu else "")
    return LocalIndex(version, centroids, references, device=str(device) if on_gpu else None)


def load_model_runtime(engine: Engine, version: str, device: str, path_override: Path | None = None,
                       role: str = "active", batch_size: int = 0, compile_model: bool = False,
                       precision: str | None = None) -> ModelRuntime:
    """The model of ``version`` (its registered checkpoint unless ``path_override``), loaded for batches of
    up to ``batch_size``, compiled if asked, at ``precision`` (shared/embedder.py). Its gallery is checked
    against Milvus by published_gallery (local_replica), which needs Milvus."""
    with transaction(engine) as session:
        row = session.get(ModelVersion, version)
        if row is None:
            raise InfrastructureError(f"model version {version!r} ({role}) is not registered in PostgreSQL")
        checkpoint, registered = row.checkpoint, (row.backbone, row.embedding_dim)
        # PostgreSQL keeps them as REAL (float4) and returns their shortest decimal form: back to the exact float32
        # values calibration chose (shared/training/calibrate.py), so a score at a threshold is decided as there.
        thresholds = Thresholds(*(float(np.float32(t)) for t in (row.t_geo, row.t_global, row.t_ref)))
    path = path_override or Path(checkpoint)
    embedder = Embedder(path, device, batch_size, compile_model, precision)
    try:
        embedder.load()
    except (OSError, ValueError, RuntimeError) as exc:
        # A missing or unreadable model file (CheckpointError, a ValueError) is an outage of this worker, not of
        # the batch's photos: retried, then handed back, never recorded as failed.
        raise InfrastructureError(f"cannot load model {version} from {path}: {exc}") from exc
    meta = embedder.meta
    if meta.version != version:
        raise InfrastructureError(f"model file {path} holds version {meta.version!r}, "
                                  f"but {version!r} is {role}")
    if (meta.backbone, meta.embedding_dim) != registered:
        # Found here, not as a search that Milvus refuses for its dimension (which reads as a Milvus outage).
        raise InfrastructureError(f"model file {path} holds a {meta.backbone} of dimension {meta.embedding_dim}, "
                                  f"but {version} was published as a {registered[0]} of dimension {registered[1]}: "
                                  "it is another build under that name; put the published file back")
    return ModelRuntime(version, embedder, thresholds)


class StageClock:
    """Milliseconds per stage of one batch, in order: wall time (``laps``) and the CPU time of the thread
    that ran the batch (``cpu_laps``), which says where a worker's own process spends the cores, a decode
    pool's processes and the torch threads that a CPU forward may fan out to left out."""

    def __init__(self) -> None:
        self._last, self._last_cpu = time.perf_counter(), time.thread_time()
        self.laps: dict[str, float] = {}
        self.cpu_laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        self.laps[name] = (now - self._last) * 1000
        self.cpu_laps[name] = (cpu - self._last_cpu) * 1000
        self._last, self._last_cpu = now, cpu
