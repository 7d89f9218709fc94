"""A loaded model version (its embedder and decision thresholds), the per-stage clock and the worker's
CPU thread settings: what the live pipeline and the shadow pass share."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine

from shared.db.models import ModelVersion
from shared.db.session import transaction
from shared.embedder import Embedder
from shared.errors import InfrastructureError
from shared.index import LandmarkIndex
from shared.local_index import LocalIndex
from shared.recognition import Thresholds

log = logging.getLogger(__name__)


def default_torch_threads(cores: int | None = None) -> int:
    """One intra-op thread per 4 cores. The decode pool already keeps every core busy, and on a CPU worker
    the forward pass is a small share of the work (a sixth for 2 MP photos, less for larger ones), so it
    needs no more than a quarter of the cores. Fewer threads also cost less: on 2 cores one thread spends
    about 0.8 ms of CPU per image where two spend about 0.95 (the bench's `model_served` and
    `model_cpu_ms_per_img`), the two waiting for each other at every layer."""
    return max(1, (cores or os.cpu_count() or 1) // 4)


def configure_threads(torch_threads: int, blas_threads: int) -> dict[str, int]:
    """Thread counts for a worker whose decode pool, forward pass and search share the cores.

    - BLAS (numpy's OpenBLAS, used by the in-process search): its idle threads spin, waiting for the
      next product, and took a third of a core from the decode pool on 2 cores; the products are small
      (a batch against the active version's centroids), so 1 thread by default.
    - torch: intra-op threads as asked (0 = default_torch_threads()); inter-op 1, since nothing here runs
      independent operators in parallel.
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


def local_replica(version: str, gallery: dict, index: LandmarkIndex, max_centroids: int,
                  device: str = "cpu") -> LocalIndex | None:
    """An exact in-process copy of ``version``'s centroids and references, built from the checkpoint
    that was published (so it costs no transfer), used only if it holds the gallery Milvus, the system of
    record, holds: the same fingerprint (the same row counts for a version published before fingerprints).
    Search then costs a matrix product instead of a Milvus round trip per tile group; on a CUDA ``device``
    the global search's product runs there (shared/local_index.py)."""
    if max_centroids <= 0 or not gallery.get("landmarks"):
        return None
    from shared.publish import gallery_rows
    centroids, references = gallery_rows(gallery)
    if len(centroids) > max_centroids:
        log.info("version %s has %d centroids (> %d): searching Milvus", version, len(centroids), max_centroids)
        return None
    if not index.holds(version, centroids, references):
        # Equal counts are not enough: `build --version V` run twice gives another gallery under the same name.
        log.error("the checkpoint of %s holds another gallery (%d centroids, %d references) than Milvus publishes "
                  "under that version: searching Milvus; publish the checkpoint under a new version",
                  version, len(centroids), len(references))
        return None
    on_gpu = str(device).startswith("cuda")
    log.info("searching %d centroids of %s in process%s", len(centroids), version, f" (on {device})" if on_gpu else "")
    return LocalIndex(version, centroids, references, device=str(device) if on_gpu else None)


def load_model_runtime(engine: Engine, version: str, device: str, path_override: Path | None = None,
                       role: str = "active", batch_size: int = 0, compile_model: bool = False) -> ModelRuntime:
    """The model of ``version`` (its registered checkpoint unless ``path_override``), loaded for batches of
    up to ``batch_size``, compiled if asked (shared/embedder.py)."""
    with transaction(engine) as session:
        row = session.get(ModelVersion, version)
        if row is None:
            raise InfrastructureError(f"model version {version!r} ({role}) is not registered in PostgreSQL")
        checkpoint, thresholds = row.checkpoint, Thresholds(row.t_geo, row.t_global, row.t_ref)
    path = path_override or Path(checkpoint)
    embedder = Embedder(path, device, batch_size, compile_model)
    try:
        embedder.load()
    except (OSError, ValueError, RuntimeError) as exc:
        # A missing or unreadable model file is an outage of this worker, not of the batch's photos:
        # retried, then handed back, never acknowledged as done.
        raise InfrastructureError(f"cannot load model {version} from {path}: {exc}") from exc
    if embedder.meta.version != version:
        raise InfrastructureError(f"model file {path} holds version {embedder.meta.version!r}, "
                                  f"but {version!r} is {role}")
    return ModelRuntime(version, embedder, thresholds)


class StageClock:
    """Milliseconds per stage of one batch, in order."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = (now - self._last) * 1000
        self._last = now
