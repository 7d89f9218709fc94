"""How one worker process feeds its batches: Celery's thread pool, so that up to
LANDMARKS_BATCHES_IN_FLIGHT batches run at once. While one batch is in the model, the next one is
fetched and decoded, and the consumer thread keeps receiving messages; the model itself runs one batch at
a time (shared/pipeline.py).

Threads, not processes: the model and the search replica are loaded once, and CUDA is initialised in the
only process there is."""

from __future__ import annotations

import math
import threading
from typing import Any

import logging

from celery import signals
from celery.concurrency.thread import TaskPool
from celery_batches import Batches

from shared.runtime import configure_threads
from shared.settings import get_settings

log = logging.getLogger(__name__)


def prefetch_multiplier(batch_size: int, batches_in_flight: int) -> int:
    """Celery prefetches multiplier × concurrency messages. Cover the batches in flight plus one that fills
    meanwhile, so that a full batch is waiting when a slot frees."""
    return math.ceil(batch_size * (batches_in_flight + 1) / batches_in_flight)


class BatchPipelinePool(TaskPool):
    """Celery's thread pool, which also knows whether every thread is busy."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._busy = 0
        self._busy_lock = threading.Lock()
        settings = get_settings()
        threads = configure_threads(settings.torch_threads, settings.blas_threads)
        log.info("%d batches in flight; threads %s", self.limit, threads,
                 extra={"batches_in_flight": self.limit, "threads": threads})
        # Like the solo pool: this process is the one that consumes, so per-process set-up (the metrics
        # server) hangs off this signal whichever pool runs.
        signals.worker_process_init.send(sender=None)

    def on_apply(self, *args: Any, **kwargs: Any) -> Any:
        with self._busy_lock:
            self._busy += 1
        result = super().on_apply(*args, **kwargs)
        result.f.add_done_callback(self._done)
        return result

    def _done(self, _future: Any) -> None:
        with self._busy_lock:
            self._busy -= 1

    def saturated(self) -> bool:
        with self._busy_lock:
            return self._busy >= self.limit


class PipelinedBatches(Batches):
    """celery-batches, except that the timer does not flush a partial batch while every pool thread is
    busy: it would only queue behind them, and under a backlog the consumer (one thread among the decoders)
    rarely receives a whole batch between two ticks, so batches would shrink to a fraction of
    LANDMARKS_BATCH_SIZE. A full buffer is flushed at once, as before."""

    abstract = True

    def _do_flush(self) -> None:
        saturated = getattr(self._pool, "saturated", None)
        if saturated is not None and saturated() and self._buffer.qsize() < self.flush_every:
            return  # the timer ticks again; by then a thread is free or the batch is full
        super()._do_flush()
