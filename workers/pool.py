"""How one worker process feeds its batches: Celery's thread pool, so that up to
LANDMARKS_BATCHES_IN_FLIGHT batches run at once. While one batch is in the model, the next one is
fetched and decoded, and the consumer thread keeps receiving messages; the model itself runs one batch at
a time (shared/pipeline.py).

Threads, not processes: the model and the search replica are loaded once, and CUDA is initialised in the
only process there is.

Once the worker stops (SIGTERM: Celery's warm shutdown), the batches running finish and commit, and no other
starts, not even one prefetched and waiting for a free thread: its messages stay unacknowledged, and Redis
has them back when the worker closes its channel, instead of the shutdown running one more batch past the
pod's grace period."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from celery import signals
from celery.concurrency.base import apply_target
from celery.concurrency.thread import ApplyResult, TaskPool
from celery.worker import state as worker_state
from celery_batches import Batches

from shared.allocator import keep_freed_memory, malloc_arenas
from shared.runtime import configure_threads, on_every_thread
from shared.settings import get_settings

log = logging.getLogger(__name__)


# Events held for their countdown (PipelinedBatches) may raise the prefetch limit by up to this many windows.
# Unbounded, an outage had a worker hold tens of thousands, and celery-batches walks every held one at each
# timer tick (10,000: 38 ms of the consumer's thread every 50 ms); past it they wait in Redis instead.
HELD_WINDOWS = 4


def prefetch_limit(batch_size: int, batches_in_flight: int) -> int:
    """worker_eta_task_limit: the prefetch window and HELD_WINDOWS more of events held for their countdown."""
    return (1 + HELD_WINDOWS) * prefetch_multiplier(batch_size, batches_in_flight) * batches_in_flight


def prefetch_multiplier(batch_size: int, batches_in_flight: int) -> int:
    """Celery prefetches multiplier × concurrency messages.

    One batch in flight: exactly one batch, so the consumer receives only between batches, as the solo
    pool did. Several: the batches in flight plus one that fills meanwhile, so that a full batch is
    waiting when a thread frees. The consumer then receives while batches run, which is safe only because
    workers/broker.py takes a message and records it as unacknowledged in one step (stock kombu, which
    does it in two round trips, lost an event to SIGKILL in the fault suite that way)."""
    if batches_in_flight <= 1:
        return batch_size
    return math.ceil(batch_size * (batches_in_flight + 1) / batches_in_flight)


def worker_stopping() -> bool:
    """Celery's warm or cold shutdown has begun: its signal handlers set these flags to the exit code, so 0
    (EX_OK) means stop too (as Celery's own maybe_shutdown reads them)."""
    return any(flag is not None and flag is not False
               for flag in (worker_state.should_stop, worker_state.should_terminate))


def _freed_memory_kept(kept: bool, arenas: int | None) -> str:
    """The start-up log's word on shared.allocator.keep_freed_memory."""
    if not kept:
        return "no (no glibc mallopt)"
    if arenas is not None and arenas > 1:
        log.warning("%d malloc arenas were made before the allocator settings applied: a batch thread handed one "
                    "faults its activations in again at every batch (start the worker with `landmarks worker`)",
                    arenas)
        return f"partly ({arenas} malloc arenas)"
    return "yes"


class BatchPipelinePool(TaskPool):
    """Celery's thread pool, which also knows whether every thread is busy, and starts nothing once the worker
    stops (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # `landmarks worker` has done so before any thread started; again for a worker started otherwise.
        kept = keep_freed_memory()
        super().__init__(*args, **kwargs)
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._closing = False
        settings = get_settings()
        threads = configure_threads(settings.torch_threads, settings.blas_threads)
        arenas = malloc_arenas()
        log.info("%d batches in flight; threads %s; freed memory kept for the next batch: %s", self.limit, threads,
                 _freed_memory_kept(kept, arenas), extra={"batches_in_flight": self.limit, "threads": threads,
                                                          "freed_memory_kept": kept, "malloc_arenas": arenas})
        # Like the solo pool: this process is the one that consumes, so per-process set-up (the metrics
        # server) hangs off this signal whichever pool runs.
        signals.worker_process_init.send(sender=None)

    def on_apply(self, target: Callable[..., Any], args: Any = None, kwargs: Any = None,
                 callback: Callable[..., Any] | None = None, accept_callback: Callable[..., Any] | None = None,
                 **_: Any) -> ApplyResult:
        with self._busy_lock:
            self._busy += 1
        future = self.executor.submit(self._start_unless_stopping, target, args, kwargs, callback, accept_callback)
        future.add_done_callback(self._done)
        return ApplyResult(future)

    def _start_unless_stopping(self, target: Callable[..., Any], *apply_args: Any) -> None:
        """TaskPool's apply_target, unless the worker stopped while this waited for a thread. Its callbacks
        then never run: celery-batches acknowledges a batch's messages in them, so they stay unacknowledged
        and the broker has them back when the worker closes its channel."""
        if self._closing or worker_stopping():
            log.info("the worker is stopping: a batch that was waiting for a thread is not started; its "
                     "events go back to the queue")
            return
        apply_target(target, *apply_args)

    def on_close(self) -> None:
        """The first step of every stop (Celery closes the pool before stopping it), signal or not."""
        self._closing = True
        super().on_close()

    def _done(self, _future: Any) -> None:
        with self._busy_lock:
            self._busy -= 1

    def run_on_every_thread(self, fn: Callable[[], object]) -> None:
        """``fn`` once on each batch thread, one at a time (workers/context.warm_up: before the first
        batch, the model's first full batch on each thread)."""
        on_every_thread(self.executor, self.limit, fn)

    def saturated(self) -> bool:
        with self._busy_lock:
            return self._busy >= self.limit


class PipelinedBatches(Batches):
    """celery-batches with two changes to when a partial batch closes (a full one closes at once):

    - only once its first event has waited LANDMARKS_MAX_WAIT_MS. celery-batches flushes whatever the
      buffer holds at each tick of a repeating timer, so a tick landing while the consumer is still
      receiving a backlog cut batches short (a mean of 51 of 64);
    - never while every pool thread is busy: it would only queue behind them, while it could still fill.
    A lone event therefore waits between one and two timer periods.

    It also raises the prefetch limit by one for each event it holds for its countdown (a photo to fetch
    again later, a batch handed back in an outage: workers/tasks.py), as Celery's own task strategy does and
    celery-batches does not. The held events stay unacknowledged, so more of them than the limit (the
    batches in flight and one filling) had stopped the worker taking live uploads until they were due."""

    abstract = True
    _first_buffered_at: float | None = None
    _consumer: Any = None

    def __init__(self) -> None:
        super().__init__()
        # id(request) -> (request, the QoS it raised, by how much): what to lower, and where, once it goes.
        self._held: dict[int, tuple[Any, Any, int]] = {}
        self._held_lock = threading.Lock()

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Any:
        """Called at each start of the consumer, so after each reconnection to the broker too."""
        self._restart_flush_timer(consumer)
        handler = super().Strategy(task, app, consumer)
        self._consumer = consumer  # its `qos` is replaced at each reconnection: read it when needed

        def on_message(*args: Any, **kwargs: Any) -> Any:
            if self._buffer.qsize() == 0:
                self._first_buffered_at = time.monotonic()
            return handler(*args, **kwargs)
        return on_message

    def _restart_flush_timer(self, consumer: Any) -> None:
        """A reconnection clears the event loop's timers, the repeating flush among them, while celery-batches
        still holds its handle and starts another only when it has none: without this, events buffered or
        held at the reconnection waited for later messages to flush them, and a lone one for ever."""
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        if self._buffer.qsize() or self._pending.qsize():
            self._tref = consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)

    def _do_flush(self) -> None:
        if worker_stopping():
            return  # no batch starts now: what the buffer holds goes back to the queue, unacknowledged
        buffered = self._buffer.qsize()
        if 0 < buffered < self.flush_every and not self._partial_batch_due():
            return  # the timer ticks again
        try:
            super()._do_flush()
        finally:
            self._count_held()  # only celery-batches' _do_flush moves requests into and out of _pending

    def flush(self, requests: Any) -> None:
        """celery-batches flushes every request that is ready at once: held events falling due together
        (a batch handed back, retries of one outage) with a full buffer would make one batch of hundreds.
        LANDMARKS_BATCH_SIZE is what GPU memory and the decode arena are sized for, so at most that many."""
        requests = list(requests)
        for start in range(0, len(requests), self.flush_every):
            super().flush(requests[start:start + self.flush_every])

    def _count_held(self) -> None:
        """Raises the prefetch limit once for each request that has come to be held, and lowers it by as much
        for each that has gone (into a batch). State against state rather than event by event, so that no
        path in or out of _pending can leave the limit raised or lowered for good."""
        with self._held_lock:
            with self._pending.mutex:
                held = {id(request): request for request in self._pending.queue}
            for gone in self._held.keys() - held.keys():
                _, qos, raised = self._held.pop(gone)
                if raised:
                    qos.decrement_eventually(raised)  # the QoS it raised, even if a reconnection replaced it
            qos = getattr(self._consumer, "qos", None)
            for new in held.keys() - self._held.keys():
                self._held[new] = (held[new], qos, _raise_prefetch(qos))

    def _partial_batch_due(self) -> bool:
        saturated = getattr(self._pool, "saturated", None)
        if saturated is not None and saturated():
            return False
        first = self._first_buffered_at
        return first is None or time.monotonic() - first >= self.flush_interval


def _raise_prefetch(qos: Any) -> int:
    """Raises a consumer's prefetch limit by one; returns by how much it rose, which is what to lower it by:
    nothing where it is unlimited (0) or capped (worker_eta_task_limit), where Celery's own strategy would
    still lower it by one later, and so below where it started."""
    if qos is None:
        return 0
    with qos._mutex:  # re-entrant: increment_eventually takes it too
        before = qos.value
        return qos.increment_eventually() - before
