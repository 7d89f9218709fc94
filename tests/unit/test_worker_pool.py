"""How a worker overlaps its batches: the pool knows when every thread is busy, the batch timer then
keeps a partial batch filling instead of queueing it, events held for their countdown raise the prefetch
limit while held, liveness watches the oldest running batch, and the model is warmed up on every batch
thread before the first batch."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from celery import Celery
from celery_batches import Batches
from kombu.common import QoS

from shared import metrics
from workers.pool import (HELD_WINDOWS, BatchPipelinePool, PipelinedBatches, _freed_memory_kept, prefetch_limit,
                          prefetch_multiplier)


def test_prefetch_covers_the_batches_in_flight_and_one_filling():
    assert prefetch_multiplier(64, 2) * 2 >= 64 * 3
    assert prefetch_multiplier(64, 1) == 64  # one batch: received only between batches
    assert prefetch_multiplier(256, 3) * 3 >= 256 * 4


def test_the_start_up_log_says_when_batch_threads_may_not_share_the_main_heap(caplog):
    """A worker started some other way than `landmarks worker` may have made malloc arenas before its allocator
    settings applied (shared/allocator.py): its batch threads would fault their activations in again."""
    assert _freed_memory_kept(True, 1) == "yes"
    assert _freed_memory_kept(False, None) == "no (no glibc mallopt)"
    with caplog.at_level("WARNING", logger="workers.pool"):
        assert _freed_memory_kept(True, 3) == "partly (3 malloc arenas)"
    assert "3 malloc arenas were made before the allocator settings applied" in caplog.text
    assert "landmarks worker" in caplog.text


def test_the_pool_is_saturated_while_every_thread_works(monkeypatch):
    import workers.app  # noqa: F401 - connects the worker's signal handlers, as in a worker
    import workers.context
    started = []
    # The pool starts the operations server in the process that consumes. The real one would bind the
    # metrics port and resolve every URL, starting the embedded stack in this test's process.
    monkeypatch.setattr(workers.context, "start_operations_server", lambda: started.append(True))
    pool = BatchPipelinePool(limit=2)
    assert started == [True]
    release = threading.Event()
    try:
        assert not pool.saturated()
        first = pool.on_apply(release.wait, args=(5,), kwargs={})
        assert not pool.saturated()
        second = pool.on_apply(release.wait, args=(5,), kwargs={})
        assert pool.saturated()
        release.set()
        first.wait(5)
        second.wait(5)
        deadline = time.monotonic() + 5
        while pool.saturated() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pool.saturated()
    finally:
        release.set()
        pool.on_stop()


def test_the_warm_up_runs_once_on_each_batch_thread_one_at_a_time_and_batches_run_on_those_threads(monkeypatch):
    """cuDNN keeps its algorithm timings per thread (shared/embedder.Embedder.warm_up): a thread that
    missed the warm-up would time the full batch inside the first batch it runs."""
    import workers.context
    monkeypatch.setattr(workers.context, "start_operations_server", lambda: None)
    pool = BatchPipelinePool(limit=3)
    warmed, running, overlapped = [], [0], []
    lock = threading.Lock()

    def warm_up() -> None:
        with lock:
            running[0] += 1
            overlapped.append(running[0] > 1)
        time.sleep(0.05)
        with lock:
            warmed.append(threading.get_ident())
            running[0] -= 1
    try:
        pool.run_on_every_thread(warm_up)
        assert len(warmed) == 3 and len(set(warmed)) == 3
        assert not any(overlapped)
        ran_on: list[int] = []
        for batch in [pool.on_apply(threading.get_ident, args=(), kwargs={}, callback=ran_on.append)
                      for _ in range(12)]:
            batch.wait(5)
        assert len(ran_on) == 12 and set(ran_on) <= set(warmed)
    finally:
        pool.on_stop()


def test_once_the_worker_stops_a_batch_waiting_for_a_thread_neither_runs_nor_is_acknowledged(monkeypatch):
    """celery-batches acknowledges a batch in its callback: skipped with it, the messages go back to the broker
    when the worker closes its channel, instead of the shutdown running one more batch."""
    import workers.context
    monkeypatch.setattr(workers.context, "start_operations_server", lambda: None)
    pool = BatchPipelinePool(limit=1)
    release, ran, acknowledged = threading.Event(), [], []
    try:
        running = pool.on_apply(release.wait, args=(5,), kwargs={}, callback=acknowledged.append)
        waiting = pool.on_apply(ran.append, args=("waiting",), kwargs={}, callback=acknowledged.append)
        pool.close()  # the first step of Celery's warm shutdown
        release.set()
        running.wait(5)
        waiting.wait(5)
        assert ran == [] and acknowledged == [True]  # the running batch finished and was acknowledged
        assert not pool.saturated()
    finally:
        release.set()
        pool.on_stop()


def test_after_a_stop_signal_the_batcher_starts_no_batch(monkeypatch):
    from celery.worker import state
    batches = _Batches()
    batches._pool = _Pool(saturated=False)
    for name in "abcd":
        batches._buffer.put(_Request(name))
    monkeypatch.setattr(state, "should_stop", 0)  # what Celery's SIGTERM handler sets: EX_OK
    batches._do_flush()
    assert batches.flushed == [] and batches._buffer.qsize() == 4  # left unacknowledged, for the broker


def test_a_warm_up_asked_of_more_threads_than_the_pool_has_fails_instead_of_hanging():
    from concurrent.futures import ThreadPoolExecutor

    from shared.runtime import on_every_thread
    with ThreadPoolExecutor(max_workers=2) as executor, pytest.raises(threading.BrokenBarrierError):
        on_every_thread(executor, 3, lambda: None, timeout_s=0.5)  # three calls cannot each have a thread of two


class _Pool:
    def __init__(self, saturated: bool) -> None:
        self.busy = saturated

    def saturated(self) -> bool:
        return self.busy


class _Batches(PipelinedBatches):
    name = "test.batches"
    flush_every = 4

    def __init__(self) -> None:
        super().__init__()
        self.flushed: list[list[str]] = []

    def flush(self, requests):
        self.flushed.append(list(requests))


# Its own app: the worker's (workers.app) would configure itself on first use, resolving every URL and so
# starting the embedded stack in this test's process.
_Batches.bind(Celery("worker-pool-tests", set_as_current=False))


class _Request:
    utc = True

    def __init__(self, name: str, due_in_s: float | None = None) -> None:
        self.name = name
        self.eta = None if due_in_s is None else datetime.now(timezone.utc) + timedelta(seconds=due_in_s)


def test_a_partial_batch_waits_for_a_free_thread_and_for_max_wait():
    batches = _Batches()
    batches.flush_interval = 0.05
    batches._pool = _Pool(saturated=False)
    batches._first_buffered_at = time.monotonic()
    for name in "ab":
        batches._buffer.put(_Request(name))
    batches._do_flush()  # a timer tick while a backlog is still being received: keep filling
    assert batches.flushed == []
    for name in "cd":
        batches._buffer.put(_Request(name))
    batches._do_flush()  # full: flushed at once
    assert [[r.name for r in b] for b in batches.flushed] == [["a", "b", "c", "d"]]

    batches._first_buffered_at = time.monotonic() - 0.06  # a lone event, older than max wait
    batches._buffer.put(_Request("e"))
    batches._pool.busy = True
    batches._do_flush()  # every thread busy: it would only queue, so it keeps filling
    assert len(batches.flushed) == 1
    batches._pool.busy = False
    batches._do_flush()  # a free thread and max wait passed: the partial batch goes
    assert [r.name for r in batches.flushed[-1]] == ["e"]


def _holding(qos: QoS) -> _Batches:
    batches = _Batches()
    batches._pool = _Pool(saturated=False)
    batches._consumer = SimpleNamespace(qos=qos)
    return batches


def _hold(batches: _Batches, requests: list[_Request]) -> None:
    for request in requests:
        batches._buffer.put(request)
    batches._do_flush()


def _fall_due(batches: _Batches, requests: list[_Request]) -> None:
    for request in requests:
        request.eta = datetime.now(timezone.utc) - timedelta(seconds=1)
    batches._do_flush()


def test_events_held_for_their_countdown_raise_the_prefetch_limit_until_they_go_into_a_batch():
    """Fetches tried again later and batches handed back in an outage are held, unacknowledged, until due:
    held beyond the prefetch limit (24 here), they had stopped the worker taking live uploads."""
    qos = QoS(lambda prefetch_count: None, 24)
    batches = _holding(qos)
    retries = [_Request(f"retry{i}", due_in_s=600) for i in range(30)]
    _hold(batches, retries)
    assert batches.flushed == [] and qos.value == 24 + 30  # room for live uploads past the 30 held

    _hold(batches, [_Request("live")])
    assert [[r.name for r in b] for b in batches.flushed] == [["live"]]
    assert qos.value == 24 + 30

    _fall_due(batches, retries[:10])
    assert qos.value == 24 + 20  # ten went into a batch
    _fall_due(batches, retries[10:])
    assert sorted(r.name for b in batches.flushed[1:] for r in b) == sorted(r.name for r in retries)
    assert qos.value == 24  # back where it started: no drift either way


def test_the_worker_holds_at_most_a_few_prefetch_windows_of_countdown_events():
    window = prefetch_multiplier(8, 2) * 2  # what Celery prefetches for batch 8, 2 in flight
    qos = QoS(lambda prefetch_count: None, window, max_prefetch=prefetch_limit(8, 2))
    batches = _holding(qos)
    _hold(batches, [_Request(f"retry{i}", due_in_s=600) for i in range(10 * window)])
    assert qos.value == (1 + HELD_WINDOWS) * window  # past that, they wait in Redis, not in this worker


def test_the_prefetch_limit_comes_back_to_where_it_was_when_capped_or_after_a_reconnection():
    # worker_eta_task_limit caps the raise: lowering by one per event anyway would end below 24.
    capped = QoS(lambda prefetch_count: None, 24, max_prefetch=30)
    batches = _holding(capped)
    retries = [_Request(f"retry{i}", due_in_s=600) for i in range(10)]
    _hold(batches, retries)
    assert capped.value == 30
    _fall_due(batches, retries)
    assert capped.value == 24

    # A reconnection gives the consumer a new QoS: each event is lowered where it was raised.
    before = QoS(lambda prefetch_count: None, 24)
    batches = _holding(before)
    old = [_Request(f"old{i}", due_in_s=600) for i in range(5)]
    new = [_Request(f"new{i}", due_in_s=600) for i in range(3)]
    _hold(batches, old)
    after = batches._consumer.qos = QoS(lambda prefetch_count: None, 24)
    _hold(batches, new)
    assert (before.value, after.value) == (29, 27)
    _fall_due(batches, old + new)
    assert (before.value, after.value) == (24, 24)


class _Timer:
    def __init__(self) -> None:
        self.repeating: list = []

    def call_repeatedly(self, seconds, fn):
        entry = SimpleNamespace(fn=fn, cancelled=False)
        entry.cancel = lambda: setattr(entry, "cancelled", True)
        self.repeating.append(entry)
        return entry


def _consumer(timer: _Timer) -> SimpleNamespace:
    pool = SimpleNamespace(apply_async=None)  # what celery-batches' request class reads; flush is replaced
    return SimpleNamespace(pool=pool, hostname="test", event_dispatcher=None, connection_errors=(), timer=timer,
                           qos=QoS(lambda prefetch_count: None, 24))


def test_a_reconnection_restarts_the_flush_timer_for_what_the_worker_still_holds():
    """Celery clears its event loop's timers when the broker connection drops; the consumer's restart calls
    Strategy again. The flush timer must run again for the events buffered or held at that moment."""
    batches = _Batches()
    batches._pool = _Pool(saturated=False)
    before = _Timer()
    batches.Strategy(batches, batches.app, _consumer(before))
    batches._tref = before.call_repeatedly(batches.flush_interval, batches._do_flush)  # as the first message does
    batches._buffer.put(_Request("buffered"))
    batches._pending.put(_Request("held", due_in_s=600))

    after = _Timer()  # the reconnected consumer's loop: the old timer entry is gone with the old loop
    batches.Strategy(batches, batches.app, _consumer(after))
    assert before.repeating[0].cancelled
    assert len(after.repeating) == 1 and after.repeating[0].fn == batches._do_flush
    batches._first_buffered_at = None  # as long ago as it likes
    after.repeating[0].fn()
    assert [[r.name for r in b] for b in batches.flushed] == [["buffered"]]


def test_events_falling_due_together_go_in_batches_of_at_most_the_batch_size(monkeypatch):
    flushed = []
    monkeypatch.setattr(Batches, "flush", lambda self, requests: flushed.append([r.name for r in requests]))

    class Pipelined(PipelinedBatches):
        name = "test.pipelined"
        flush_every = 4
    Pipelined.bind(Celery("worker-pool-split", set_as_current=False))
    batches = Pipelined()
    batches._pool = _Pool(saturated=False)
    held = [_Request(f"retry{i}", due_in_s=600) for i in range(10)]
    _hold(batches, held)
    _fall_due(batches, held)
    assert [len(b) for b in flushed] == [4, 4, 2]
    assert sorted(name for b in flushed for name in b) == sorted(r.name for r in held)


def test_liveness_sees_the_oldest_of_the_running_batches():
    assert metrics.batch_running_since() is None
    started = threading.Event()
    finish = threading.Event()

    def batch() -> None:
        metrics.batch_started()
        started.set()
        finish.wait(5)
        metrics.batch_finished()

    worker = threading.Thread(target=batch)
    worker.start()
    started.wait(5)
    oldest = metrics.batch_running_since()
    time.sleep(0.02)
    metrics.batch_started()  # a second batch, in this thread
    assert metrics.batch_running_since() == oldest
    finish.set()
    worker.join(5)
    assert metrics.batch_running_since() > oldest  # now only this thread's batch runs
    metrics.batch_finished()
    assert metrics.batch_running_since() is None
