"""Timing helpers: medians over synchronised runs, adaptive repeats for slow calls, peak scratch memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        torch.cuda.synchronize(device)


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


def scratch_mb(call: Callable[[], object]) -> float:
    """The peak memory ``call`` allocates while it runs (numpy's arrays included), in MB: the transient RSS
    a worker's batch thread adds."""
    import tracemalloc
    tracemalloc.start()
    try:
        call()
        return round(tracemalloc.get_traced_memory()[1] / 2 ** 20, 1)
    finally:
        tracemalloc.stop()
