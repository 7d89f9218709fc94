"""Centroid search alone at growing gallery sizes (`landmarks bench --search-scale`): milvus-lite (FLAT, IP;
what the worker queries) against the worker's exact in-process replica (`shared.local_index.LocalIndex`), and
with --device cuda the same replica searching on the GPU, as a GPU worker keeps it. Queries come in batches
of 64, global top-k and 1x1 km geo-filtered, as `recognise_batch` issues them; `local_squares_*` is the
replica's whole-batch geo decision (`LocalIndex.best_in_squares`), what a worker with a replica runs."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.bench.config import BenchConfig, NullReporter, Reporter
from shared.bench.gallery import synthetic_places
from shared.bench.host import CpuAccount, host_info
from shared.bench.services import private_milvus
from shared.bench.timing import adaptive_time, median_time, scratch_mb
from shared.training.centroids import normalise

if TYPE_CHECKING:
    from shared.index import CentroidRows, ReferenceRows

log = logging.getLogger(__name__)

SEARCH_SCALE_SIZES = (10_000, 100_000, 1_000_000)
MILVUS_INSERT_CAP_S = 180.0
BATCH = 64  # queries per call, as the worker's batches send them
TOP_K = 10
GEO_LIMIT = 256


@dataclass
class ScaleCase:
    """One gallery size: its centroids, and a batch of queries near some of them with their geo tiles."""
    size: int
    centroids: CentroidRows
    references: ReferenceRows  # none: the search alone is measured
    queries: np.ndarray
    tiles: list[list[int]]
    points: tuple[list[float], list[float]]  # the queries' photo positions (lats, lons), the tiles' centres


def run_search_scale(cfg: BenchConfig, reporter: Reporter | None = None,
                     sizes: Sequence[int] = SEARCH_SCALE_SIZES, milvus_cap_s: float = MILVUS_INSERT_CAP_S) -> dict:
    """One row per gallery size. A milvus-lite insert projected (at the rate of the previous size) to take
    longer than ``milvus_cap_s`` is skipped, with a note."""
    from shared.index import LandmarkIndex
    reporter = reporter or NullReporter()
    cfg = cfg.resolved()
    started = time.monotonic()
    account = CpuAccount()
    rng = np.random.default_rng(cfg.seed)
    rows, notes = [], []
    insert_rate = None  # rows/s seen so far, to decide whether the next size fits the cap
    with tempfile.TemporaryDirectory(prefix="lm-bench-scale-") as tmp, private_milvus(Path(tmp)) as uri:
        index = LandmarkIndex(uri, timeout=600)
        try:
            for n in sizes:
                reporter.start(f"search scale: {n:,} centroids x {cfg.embedding_dim}")
                case = _case(n, cfg.embedding_dim, rng)
                row = {"centroids": n, **_replica_figures(case, cfg)}
                projected = n / insert_rate if insert_rate else 0.0
                if projected > milvus_cap_s:
                    row["milvus"] = (f"skipped: inserting {n:,} rows would take ~{projected:.0f}s at the "
                                     f"{insert_rate:,.0f} rows/s measured on the smaller gallery "
                                     f"(cap {milvus_cap_s:.0f}s)")
                    notes.append(f"{n:,}: milvus-lite not measured, {row['milvus']}")
                else:
                    row.update(_milvus_figures(case, index))
                    insert_rate = row["milvus_insert_rows_s"]
                rows.append(row)
                log.info("search scale %s", json.dumps(row))
        finally:
            index.close()
        other_share = account.other_share()
    return {"mode": "search_scale", "device": cfg.device, "dim": cfg.embedding_dim, "batch": BATCH, "k": TOP_K,
            "geo_limit": GEO_LIMIT, "milvus_insert_cap_s": milvus_cap_s, "results": rows, "notes": notes,
            "host": {**host_info(), "other_cpu_share": other_share},
            "seconds": round(time.monotonic() - started, 1)}


def _case(n: int, dim: int, rng: np.random.Generator) -> ScaleCase:
    from shared import geo
    from shared.index import CentroidRows, ReferenceRows
    from shared.recognition import SQUARE_HALF_SIZE_M
    lats, lons = synthetic_places(n, rng)
    embeddings = normalise(rng.standard_normal((n, dim), dtype=np.float32))
    centroids = CentroidRows(np.arange(n, dtype=np.int64), np.zeros(n, np.int64), lats, lons, embeddings)
    no_references = ReferenceRows(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32))
    pick = rng.integers(0, n, BATCH)
    queries = normalise(embeddings[pick] + 0.5 * rng.standard_normal((BATCH, dim), dtype=np.float32))
    tiles = [geo.tiles_covering_square(float(lats[p]), float(lons[p]), SQUARE_HALF_SIZE_M) for p in pick]
    return ScaleCase(n, centroids, no_references, queries, tiles, (lats[pick].tolist(), lons[pick].tolist()))


def _replica_figures(case: ScaleCase, cfg: BenchConfig) -> dict:
    """The in-process replica on the host (and on the GPU with --device cuda): build time, ms per batch,
    img/s, and the scratch memory one global batch allocates."""
    import torch
    from shared.local_index import LocalIndex
    from shared.recognition import SQUARE_HALF_SIZE_M
    start = time.perf_counter()
    host = LocalIndex("scale", case.centroids, case.references)
    build_s = time.perf_counter() - start
    host.search_geo(None, case.queries[:1], case.tiles[:1], GEO_LIMIT)  # builds its tile lookup, untimed
    figures = {"local_build_s": round(build_s, 2),
               **_batch_figures("local", lambda: host.search_global(None, case.queries, TOP_K),
                                lambda: host.search_geo(None, case.queries, case.tiles, GEO_LIMIT)),
               "local_global_scratch_mb": scratch_mb(lambda: host.search_global(None, case.queries, TOP_K))}
    # What a worker runs for its GPS photos: each square's best centroid for the whole batch, no tiles.
    t = adaptive_time(lambda: host.best_in_squares(None, case.queries, *case.points, SQUARE_HALF_SIZE_M), iters=5)
    figures.update(local_squares_ms=round(t * 1e3, 2), local_squares_img_s=round(BATCH / t, 1))
    del host  # a million centroids: free them before the device copy
    if cfg.cuda and torch.cuda.is_available():
        on_gpu = LocalIndex("scale", case.centroids, case.references, device=cfg.device)
        t = median_time(lambda: on_gpu.search_global(None, case.queries, TOP_K), iters=20, warmup=3,
                        device=cfg.device)
        figures.update(local_gpu_global_ms=round(t * 1e3, 3), local_gpu_global_img_s=round(BATCH / t, 1))
    return figures


def _milvus_figures(case: ScaleCase, index) -> dict:
    """milvus-lite: the insert of the whole gallery, then the same batches as the replica's."""
    version = f"scale_{case.size}"
    start = time.perf_counter()
    index.publish(version, case.centroids, case.references)
    insert_s = time.perf_counter() - start
    try:
        return {"milvus_insert_s": round(insert_s, 1), "milvus_insert_rows_s": round(case.size / insert_s, 1),
                **_batch_figures("milvus", lambda: index.search_global(version, case.queries, TOP_K),
                                 lambda: index.search_geo(version, case.queries, case.tiles, GEO_LIMIT))}
    finally:
        index.drop(version)


def _batch_figures(prefix: str, global_search: Callable[[], object], geo_search: Callable[[], object]) -> dict:
    g = adaptive_time(global_search, iters=5)
    geo_t = adaptive_time(geo_search, iters=3)
    return {f"{prefix}_global_ms": round(g * 1e3, 2), f"{prefix}_geo_ms": round(geo_t * 1e3, 2),
            f"{prefix}_global_img_s": round(BATCH / g, 1), f"{prefix}_geo_img_s": round(BATCH / geo_t, 1)}
