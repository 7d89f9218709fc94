"""Per-process state of a worker (database engine, Milvus index, pipeline), created on first use,
after any fork, so CUDA and connections are never shared with Celery's parent."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from shared.db.session import make_engine
from shared.index import LandmarkIndex
from shared.loading import stop_forkserver
from shared.pipeline import RecognitionPipeline
from shared.settings import Settings, get_settings
from shared.stack import resolve


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    index: LandmarkIndex
    pipeline: RecognitionPipeline


log = logging.getLogger(__name__)
_context: WorkerContext | None = None
_lock = threading.Lock()


def worker_context() -> WorkerContext:
    global _context
    with _lock:
        if _context is None:
            settings = get_settings()
            urls = resolve(settings)
            token = settings.milvus_token.get_secret_value() if settings.milvus_token else None
            engine = make_engine(urls.database_url)
            index = LandmarkIndex(urls.milvus_uri, token)
            _context = WorkerContext(settings, engine, index, RecognitionPipeline(settings, engine, index))
        return _context


def close_worker_context() -> None:
    """At worker shutdown: the decode processes joined, connections closed."""
    global _context
    _model_retry.disarm()  # a load asked for by readiness now would make the context again
    with _lock:
        context, _context = _context, None
    if context is None:
        return
    context.pipeline.close()
    stop_forkserver()
    context.engine.dispose()
    context.index.close()


# --- operations: the metrics/health server and the model warm-up (workers/app.py's signals) -----

_probe: tuple[str, Engine, LandmarkIndex] | None = None  # what readiness checks, with short timeouts
# How often a worker whose readiness finds no usable model tries loading the active one between batches.
MODEL_RETRY_S = 30.0


class ModelRetry:
    """``load`` on a thread of its own, one at a time and at most once per ``every_s``, once the start-up warm-up
    has armed it. The model is otherwise loaded at start-up and by each batch, so a worker started before the
    first `landmarks publish` (or while its model file was unreadable) stayed unready until an event came.

    Armed only by the warm-up, which runs in the process that consumes (never a forking parent), and loading
    through RecognitionPipeline.runtime(), whose lock makes a batch arriving meanwhile wait for this load
    instead of starting another."""

    def __init__(self, load: Callable[[], None], every_s: float = MODEL_RETRY_S) -> None:
        self._load = load
        self.every_s = every_s
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last = float("-inf")
        self._armed = False

    def arm(self) -> None:
        """After the warm-up's own attempt, which counts as the last one."""
        with self._lock:
            self._armed, self._last = True, time.monotonic()

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def __call__(self) -> None:
        """Starts a load if one is due; returns at once (readiness calls it)."""
        with self._lock:
            running = self._thread is not None and self._thread.is_alive()
            if not self._armed or running or time.monotonic() - self._last < self.every_s:
                return
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._load, name="model-retry", daemon=True)
            self._thread.start()


def _load_active_model() -> None:
    from shared import metrics
    with _lock:
        context = _context  # never worker_context(): after a close it would make a new one, left open
    if context is None:
        return
    try:
        runtime = context.pipeline.runtime()
    except Exception as exc:  # noqa: BLE001 - readiness says why meanwhile; tried again MODEL_RETRY_S later
        log.debug("still no usable model: %s", exc)
        return
    metrics.set_model(runtime.version)
    # Not on the batch threads: each times its first full batch itself (_warm_up_thread).
    log.info("model %s loaded between batches", runtime.version, extra={"model_version": runtime.version})


_model_retry = ModelRetry(_load_active_model)


def _readiness_checks() -> dict:
    from shared import health
    global _probe
    context = worker_context()
    if _probe is None:
        urls = resolve(context.settings)
        token = context.settings.milvus_token.get_secret_value() if context.settings.milvus_token else None
        # Their own connections with short timeouts: a probe never waits behind a batch, and a
        # database that does not answer fails the check in seconds, not after TCP's minutes.
        engine = make_engine(urls.database_url, pool_size=1, max_overflow=1,
                             connect_args={"connect_timeout": int(health.CHECK_TIMEOUT_S)})
        index = LandmarkIndex(urls.milvus_uri, token, timeout=health.CHECK_TIMEOUT_S,
                              connect_timeout=health.CHECK_TIMEOUT_S)
        _probe = urls.broker_url, engine, index
    broker_url, engine, index = _probe
    return {
        "model": health.worker_model_check(lambda: context.pipeline.loaded_version,
                                           lambda: context.pipeline.load_error, _model_retry),
        "broker": health.broker_check(broker_url),
        "database": health.database_check(engine),
        "milvus": health.milvus_check(index, engine),
    }


def start_operations_server() -> None:
    """Prometheus /metrics, /healthz and /readyz on LANDMARKS_METRICS_PORT (default 9808)."""
    from shared import health, metrics
    settings = get_settings()
    try:
        max_batch_s = health.max_batch_seconds(float(settings.visibility_timeout_s))
        metrics.configured_port()
    except ValueError as exc:  # names the variable; `landmarks worker` refuses to start with it
        log.error("no metrics server: %s", exc)
        return
    try:
        metrics.start_worker_server(
            live=lambda: health.liveness(metrics.batch_running_since, max_batch_s),
            ready=health.CachedReadiness(_readiness_checks),
        )
    except Exception:  # noqa: BLE001 - observability must never stop a worker from consuming
        log.exception("cannot start the metrics server")


def warm_up(pool=None) -> None:
    """The active model loaded, and run once on each of ``pool``'s batch threads (Embedder.warm_up: on CUDA,
    cuDNN's timing of the full batch, which it keeps per thread), before the first event arrives. Without
    it, readiness has the model loaded again every MODEL_RETRY_S (ModelRetry) until it is there."""
    try:
        _warm_up(pool)
    finally:
        _model_retry.arm()


def _warm_up(pool) -> None:
    from shared import metrics
    try:
        pipeline = worker_context().pipeline
        runtime = pipeline.runtime()
    except Exception as exc:  # noqa: BLE001 - readiness tries again (ModelRetry) and says why meanwhile
        log.warning("no model loaded at start-up: %s", exc)
        return
    metrics.set_model(runtime.version)
    # On a CPU, what the forward costs sets the threads it runs on: measured here, not in the first batch.
    forward_on = pipeline.forward_turns.threads_for(runtime.embedder)
    threads = 0
    if pool is not None:
        try:
            pool.run_on_every_thread(lambda: _warm_up_thread(runtime.embedder))
            threads = pool.limit
        except Exception as exc:  # noqa: BLE001 - a thread not warmed up times its first full batch itself
            log.warning("cannot warm up the batch threads: %s", exc)
    log.info("model %s loaded, warmed up on %d batch threads; torch threads per forward: %d",
             runtime.version, threads, forward_on,
             extra={"model_version": runtime.version, "forward_threads": forward_on})


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def exit_on_stop_signal() -> Iterator[None]:
    """While it lasts (the warm-up: a model load, or minutes of torch.compile), SIGTERM or SIGINT ends the
    worker at once. Celery's handlers only set a flag that its event loop reads, and the warm-up runs on that
    loop, so the stop would wait for it, past the pod's grace period, to SIGKILL. Stopping is safe: the loop
    has not taken a message yet. Afterwards Celery's handlers are back: a stop signal is its warm shutdown
    again, which lets running batches commit."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers are the main thread's
        yield
        return
    previous = {signum: signal.signal(signum, _exit_now) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _exit_now(signum: int, _frame) -> None:
    log.warning("%s during the warm-up: stopping now (no event taken yet)", signal.Signals(signum).name)
    raise SystemExit(0)  # Celery's worker stops on it as on its own warm shutdown: connections closed


def _warm_up_thread(embedder) -> None:
    from shared.device_decode import thread_stream
    with thread_stream(embedder.device):  # the stream this thread's batches run on (and its memory pool)
        embedder.warm_up()
