"""Throughput benchmark of one recognition worker: each stage alone (decode, model, search, write) and the
whole worker end to end (events through Redis → a real Celery worker → tags in PostgreSQL, Milvus in the
loop), side by side on one machine, so that the end-to-end figure can be compared with its physical bound.

The bound is the slowest *resource*: stages that share one (on a CPU-only machine decode and the model
share the cores) combine as 1/Σ(1/x). `landmarks bench --json` prints one JSON object (see BENCHMARKS.md).

A run, in the order `run.run_bench` takes it:

- `inputs`: camera-like generated JPEGs, or the real photos of ../shared/realdata;
- `gallery`: a random-init model and a synthetic gallery, published to a private milvus-lite (`services`);
- `stages`: decode, model, search and write, each alone; `timing` and `host` measure them;
- `end_to_end`: the events through real worker processes, with their laps, RSS and CPU;
- `bound`: the slowest resource, against which `run.summarise` puts the end-to-end figure.

`search_scale` (`landmarks bench --search-scale`) measures centroid search alone at 10k to 1M centroids.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.bench.config import BenchConfig
    from shared.bench.run import run_bench
    from shared.bench.search_scale import SEARCH_SCALE_SIZES, run_search_scale

# Each name from its module on first use: the bench's modules import torch, pymilvus, SQLAlchemy and Celery,
# and `python -m shared.bench.device_wheels --check` runs in this package on a lent machine to list which of
# those wheels did not install, so it must not need them.
_HOMES = {"BenchConfig": "shared.bench.config", "run_bench": "shared.bench.run",
          "SEARCH_SCALE_SIZES": "shared.bench.search_scale", "run_search_scale": "shared.bench.search_scale"}

__all__ = ["SEARCH_SCALE_SIZES", "BenchConfig", "run_bench", "run_search_scale"]


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
