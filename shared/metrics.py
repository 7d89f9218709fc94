"""Prometheus metrics of a recognition worker, and the small HTTP server that exposes them.

One server per worker process, started in that process (Celery's ``worker_process_init``, which
workers/pool.py sends in the consuming process itself), never in a forking parent. It serves:

* ``/metrics``: the metrics below plus prometheus_client's process and Python collectors;
* ``/healthz``: liveness (the process answers and no running batch is older than the visibility timeout);
* ``/readyz``: readiness (model loaded, broker, database and Milvus reachable; see shared/health.py).

``python -m shared.metrics`` runs the same server with only the backlog collector: the exporter that
KEDA and Prometheus read whether or not a worker runs (scaling from zero needs a metric no worker
provides). It alone serves the ``landmarks_queue_*`` metrics and ``/backlog`` (``{"queue", "waiting",
"reserved", "backlog"}`` as JSON, for KEDA's metrics-api scaler): the backlog is one number for the
fleet, counted over Redis' whole ``unacked`` hash (shared/backlog.py), which no worker process should
repeat at each scrape; and the alerts tell a dead exporter by ``landmarks_queue_backlog_up`` being absent.
It reads the Redis of LANDMARKS_BROKER_URL, or of an embedded stack already running, never one it starts.

Metric names are a contract with deploy/grafana, deploy/prometheus and deploy/k8s (a unit test checks
that every ``landmarks_*`` name those files use is defined here): rename both sides together.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PORT_ENV = "LANDMARKS_METRICS_PORT"
ADDR_ENV = "LANDMARKS_METRICS_ADDR"
BROKER_ENV = "LANDMARKS_BROKER_URL"  # the exporter's Redis (exporter_broker_url)
DEFAULT_PORT = 9808
BACKLOG_TTL_S = 5.0  # the backlog gauge asks Redis at most this often, whoever scrapes
STAGES = ("fetch_decode", "embed", "search", "write")

# --- the metrics ---------------------------------------------------------------------------------
# outcome: tagged | no_landmark | failed (uploads, by the photo's status), malformed, deleted;
# source: live | backfill (backfill events carry ids starting with shared.backfill.EVENT_PREFIX).
EVENTS = Counter("landmarks_events", "Events handled by this worker, by outcome and source",
                 ["outcome", "source"])
SKIPPED = Counter("landmarks_events_skipped", "Upload events seen but not applied: redelivered, superseded "
                  "within their batch, or aimed at a deleted photo")
FAILURES = Counter("landmarks_failures", "Photos that failed, by pipeline stage (validate, fetch, decode, ...)",
                   ["stage"])
INFRA_ERRORS = Counter("landmarks_infrastructure_errors", "Batch attempts that failed on the database, "
                       "Milvus or the model, by what was being done (the batch is retried)", ["what"])
HANDED_BACK = Counter("landmarks_events_handed_back", "Events re-published after a minute of infrastructure "
                      "errors")
FETCH_RETRIES = Counter("landmarks_fetch_retries", "Upload events sent round again because the storage did not "
                        "serve their photo (refused, reset or timed-out connection, HTTP 429/5xx)")
BATCHES = Counter("landmarks_batches", "Batches processed by the pipeline")
DECODED = Counter("landmarks_photos_decoded", "Photos decoded, by where: device (a GPU JPEG decoder, "
                  "shared/device_decode.py) or cpu (the decode pool)", ["where"])
# path: arena (reused shared memory), file (a shared-memory file of its own: the arena was full), pipe (a small
# chunk, or no usable shared memory). Files and pipe cost the worker's process more CPU per photo (BENCHMARKS.md).
HANDOVERS = Counter("landmarks_decode_handovers", "Chunks of photos the decode pool handed back to the worker, "
                    "by the way they came: arena, file or pipe (shared/spill.py)", ["path"])
BATCH_SIZE = Histogram("landmarks_batch_size", "Upload events per batch",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
STAGE_SECONDS = Histogram("landmarks_stage_seconds", "Time per pipeline stage of a batch", ["stage"],
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
BATCH_SECONDS = Histogram("landmarks_batch_seconds", "Time to process one batch, all stages",
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
EVENT_AGE = Histogram("landmarks_event_age_seconds", "Live uploads: from uploaded_at to tags committed",
                      buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
LAST_BATCH = Gauge("landmarks_last_batch_timestamp_seconds", "Unix time the last batch committed")
BATCH_RUNNING_SINCE = Gauge("landmarks_batch_running_since_seconds",
                            "Unix time the oldest running batch started, 0 when idle")
MODEL_LOADED = Gauge("landmarks_model_loaded", "1 while this worker has the active model version loaded; 0 before "
                     "its first load and while the active version cannot be loaded (see its /readyz)")
# outcome: tagged | no_landmark (written under the shadow version), skipped (its model was not loaded yet,
# backing off after an error, or the shadow stopped meanwhile), error (model, Milvus or database failed).
SHADOW_PHOTOS = Counter("landmarks_shadow_photos", "Photos sampled for the shadow version, by version and outcome",
                        ["version", "outcome"])
ALL_METRICS = (EVENTS, SKIPPED, FAILURES, INFRA_ERRORS, HANDED_BACK, FETCH_RETRIES, BATCHES, BATCH_SIZE, STAGE_SECONDS,
               BATCH_SECONDS, EVENT_AGE, LAST_BATCH, BATCH_RUNNING_SINCE, MODEL_LOADED, SHADOW_PHOTOS,
               DECODED, HANDOVERS)

# Collected at scrape time (see the collectors below).
MODEL_INFO = "landmarks_model_info"
# A worker that has started no batch (nor loaded a model) for this long leaves landmarks_model_info out:
# after a promote it has had no batch to switch at, and its previous version would hold
# LandmarksModelVersionSkew (for: 15m) on. A worker that cannot load the new version keeps starting batches
# (each retried, handed back and redelivered), so it stays in, and the alert still finds it.
MODEL_INFO_IDLE_S = 300.0
# Served only by the backlog exporter (never by a worker): the alerts' absent() relies on it.
BACKLOG_METRICS = ("landmarks_queue_backlog", "landmarks_queue_waiting", "landmarks_queue_reserved",
                   "landmarks_queue_backlog_up")
GPU_METRICS = ("landmarks_gpu_memory_allocated_bytes", "landmarks_gpu_memory_reserved_bytes",
               "landmarks_gpu_memory_total_bytes")
# Served by the parent of several worker processes (workers/supervisor_http.py), labelled by process.
PROCESS_UP = "landmarks_worker_process_up"
PROCESS_RESTARTS = "landmarks_worker_process_restarts_total"

_model_version: str | None = None
# Why the active version cannot be loaded now (None: it can): the version still in memory then serves no batch.
_model_error: str | None = None
_clock = time.monotonic
_model_in_use_at = float("-inf")  # _clock() at the last batch started or model loaded
_state_lock = threading.Lock()


def metric_names() -> set[str]:
    """Every sample name this module can expose (counters with _total, histograms with _bucket/_sum/_count)."""
    names: set[str] = set(BACKLOG_METRICS) | set(GPU_METRICS) | {MODEL_INFO, PROCESS_UP, PROCESS_RESTARTS}
    for metric in ALL_METRICS:
        for family in metric.describe():
            base = family.name
            if family.type == "counter":
                names |= {base + "_total", base + "_created"}
            elif family.type == "histogram":
                names |= {base + "_bucket", base + "_sum", base + "_count", base + "_created"}
            else:
                names.add(base)
    return names


# --- hooks the worker calls ----------------------------------------------------------------------

def source_of(event_id: str) -> str:
    from shared.backfill import EVENT_PREFIX
    return "backfill" if str(event_id).startswith(EVENT_PREFIX) else "live"


def set_model(version: str | None) -> None:
    """The version the worker's pipeline has loaded (at warm-up, then after each batch)."""
    global _model_version
    with _state_lock:
        _model_version = version
        _show_model_loaded()
    _model_in_use()


def set_model_error(error: str | None) -> None:
    """Why the worker cannot load the active version (None once it has). Meanwhile landmarks_model_loaded reads 0
    although an older version stays in memory: every batch is handed back, and LandmarksNoWorkers must fire for a
    fleet in that state. landmarks_model_info keeps the older version (see MODEL_INFO_IDLE_S)."""
    global _model_error
    with _state_lock:
        _model_error = error
        _show_model_loaded()


def _show_model_loaded() -> None:
    MODEL_LOADED.set(1 if _model_version is not None and _model_error is None else 0)


def loaded_model() -> str | None:
    return _model_version


def _model_in_use() -> None:
    global _model_in_use_at
    with _state_lock:
        _model_in_use_at = _clock()


# Start times of the batches running now, by thread: a worker runs up to LANDMARKS_BATCHES_IN_FLIGHT at once.
_batches_running: dict[int, float] = {}
_batches_lock = threading.Lock()


def batch_started() -> None:
    with _batches_lock:
        _batches_running[threading.get_ident()] = time.time()
        BATCH_RUNNING_SINCE.set(min(_batches_running.values()))
    _model_in_use()  # also a batch that will fail to load the active version: see MODEL_INFO_IDLE_S


def batch_finished() -> None:
    with _batches_lock:
        _batches_running.pop(threading.get_ident(), None)
        BATCH_RUNNING_SINCE.set(min(_batches_running.values(), default=0))


def batch_running_since() -> float | None:
    """Unix time the oldest running batch started (retries included), None when idle: liveness reads it."""
    with _batches_lock:
        return min(_batches_running.values(), default=None)


def observe_batch(report: Any, n_events: int) -> None:
    """Count one committed batch (a shared.pipeline.BatchReport)."""
    now = time.time()
    BATCHES.inc()
    BATCH_SIZE.observe(n_events)
    for stage in STAGES:
        if stage in report.timings_ms:
            STAGE_SECONDS.labels(stage).observe(report.timings_ms[stage] / 1000)
    BATCH_SECONDS.observe(sum(report.timings_ms.values()) / 1000)
    DECODED.labels("device").inc(report.decoded_on_device)
    DECODED.labels("cpu").inc(report.decoded - report.decoded_on_device)
    events: collections.Counter[tuple[str, str]] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    for outcome in report.outcomes:  # counted here, then one locked increment per label set
        event = outcome.event
        source = source_of(event.event_id)
        events[str(outcome.status), source] += 1
        if outcome.failure is not None:
            failures[str(outcome.failure.stage)] += 1
        if source == "live" and event.uploaded_at is not None:
            uploaded = event.uploaded_at
            if uploaded.tzinfo is None:
                uploaded = uploaded.replace(tzinfo=timezone.utc)
            EVENT_AGE.observe(max(0.0, now - uploaded.timestamp()))
    for labels, count in events.items():
        EVENTS.labels(*labels).inc(count)
    for stage, count in failures.items():
        FAILURES.labels(stage).inc(count)
    skipped = len({o.event.event_id for o in report.outcomes}) - report.applied
    if skipped > 0:
        SKIPPED.inc(skipped)
    LAST_BATCH.set(now)
    set_model(report.model_version)
    shadow = getattr(report, "shadow", None)
    if shadow is not None:
        observe_shadow(shadow)


def observe_shadow(shadow: Any) -> None:
    """Count a batch's shadow pass (a shared.shadow.ShadowReport); its time is the stage 'shadow'."""
    for outcome, n in shadow.photos.items():
        SHADOW_PHOTOS.labels(shadow.version, outcome).inc(n)
    if shadow.timings_ms:
        STAGE_SECONDS.labels("shadow").observe(sum(shadow.timings_ms.values()) / 1000)


def observe_malformed(payloads: Iterable[Any]) -> None:
    for payload in payloads:
        event_id = payload.get("event_id") if isinstance(payload, dict) else None
        EVENTS.labels("malformed", source_of(event_id or "")).inc()
        FAILURES.labels("validate").inc()


def observe_deleted() -> None:
    EVENTS.labels("deleted", "live").inc()


def observe_infrastructure_error(what: str) -> None:
    INFRA_ERRORS.labels(what).inc()


def observe_handovers(paths: Iterable[str]) -> None:
    for path, count in collections.Counter(paths).items():
        HANDOVERS.labels(path).inc(count)


def observe_handed_back(n: int) -> None:
    HANDED_BACK.inc(n)


def observe_fetch_retries(n: int) -> None:
    FETCH_RETRIES.inc(n)


# --- collectors read at scrape time --------------------------------------------------------------

class ModelInfoCollector(Collector):
    """landmarks_model_info{version} = 1 for the loaded version, while the model is in use (MODEL_INFO_IDLE_S)."""

    def describe(self):
        return [self._family(None)]

    def collect(self):
        with _state_lock:
            version, idle_s = _model_version, _clock() - _model_in_use_at
        yield self._family(version if idle_s < MODEL_INFO_IDLE_S else None)

    @staticmethod
    def _family(version: str | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(MODEL_INFO, "1 for the model version this worker has loaded, while it has "
                                   f"started a batch in the last {MODEL_INFO_IDLE_S:.0f} s", labels=["version"])
        if version is not None:
            family.add_metric([version], 1)
        return family


REGISTRY.register(ModelInfoCollector())


class BacklogCollector(Collector):
    """waiting + reserved of each queue (shared.backlog), asked of Redis at most every ``ttl_s``, one read
    for all the queues."""

    def __init__(self, broker_url: str, queues: list[str], ttl_s: float = BACKLOG_TTL_S,
                 reader: Callable[[str, list[str]], dict[str, dict]] | None = None) -> None:
        self.broker_url = broker_url
        self.queues = [q for q in queues if q]
        self.ttl_s = ttl_s
        self._reader = reader
        self._lock = threading.Lock()
        self._at = 0.0
        self._values: dict[str, dict] = {}
        self._up = 0

    def refresh(self) -> dict[str, dict]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                reader = self._reader
                if reader is None:
                    from shared.backlog import queue_backlogs as reader
                try:
                    self._values = reader(self.broker_url, self.queues)
                    self._up = 1
                except Exception as exc:  # noqa: BLE001 - a scrape must not fail because Redis is down
                    log.warning("cannot read the queue backlog: %s", exc)
                    self._up = 0
                self._at = time.monotonic()
            return dict(self._values) if self._up else {}

    def describe(self):
        # Without this the registry would call collect(), i.e. ask Redis, when the collector registers.
        return list(self._families({}))

    def collect(self):
        values = self.refresh()
        yield from self._families(values)

    def _families(self, values: dict[str, dict]):
        families = {
            "backlog": GaugeMetricFamily("landmarks_queue_backlog",
                                         "Events waiting in Redis plus those reserved (prefetched, unacknowledged) "
                                         "by workers: what an autoscaler must read", labels=["queue"]),
            "waiting": GaugeMetricFamily("landmarks_queue_waiting", "Events waiting in Redis (LLEN)", labels=["queue"]),
            "reserved": GaugeMetricFamily("landmarks_queue_reserved", "Events reserved by workers, not yet acknowledged",
                                          labels=["queue"]),
        }
        for queue, value in values.items():
            for key, family in families.items():
                family.add_metric([queue], value[key])
        up = GaugeMetricFamily("landmarks_queue_backlog_up", "1 if the last backlog read from Redis succeeded")
        up.add_metric([], self._up)
        yield from families.values()
        yield up


class GpuMemoryCollector(Collector):
    """CUDA memory of this process, only once CUDA is initialised (never initialises it from a scrape)."""

    def describe(self):
        return []

    def collect(self):
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        allocated = GaugeMetricFamily("landmarks_gpu_memory_allocated_bytes", "CUDA memory held by tensors",
                                      labels=["device"])
        reserved = GaugeMetricFamily("landmarks_gpu_memory_reserved_bytes", "CUDA memory reserved by the caching "
                                     "allocator", labels=["device"])
        total = GaugeMetricFamily("landmarks_gpu_memory_total_bytes", "Total memory of the device", labels=["device"])
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            try:
                allocated.add_metric([device], torch.cuda.memory_allocated(index))
                reserved.add_metric([device], torch.cuda.memory_reserved(index))
                total.add_metric([device], torch.cuda.get_device_properties(index).total_memory)
            except RuntimeError:  # a device this process cannot see
                continue
        yield allocated
        yield reserved
        yield total


# --- the HTTP server -----------------------------------------------------------------------------

class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


def _json(start_response, status: int, body: dict) -> list[bytes]:
    data = json.dumps(body, default=str).encode()
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "")
    start_response(f"{status} {reason}", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def make_app(registry: CollectorRegistry = REGISTRY, *, live: Callable[[], dict] | None = None,
             ready: Callable[[], dict] | None = None, backlog: BacklogCollector | None = None):
    """A WSGI app: /healthz, /readyz and /backlog as JSON; everything else is prometheus_client's."""
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            report = live() if live else {"ok": True}
            return _json(start_response, 200 if report.get("ok") else 503, report)
        if path == "/readyz":
            report = ready() if ready else {"ok": True}
            return _json(start_response, 200 if report.get("ok") else 503, report)
        if path == "/backlog":
            if backlog is None:
                return _json(start_response, 404, {"error": "no backlog collector here"})
            values = backlog.refresh()
            if not values:
                return _json(start_response, 503, {"error": "cannot read the queue backlog"})
            first = values[backlog.queues[0]]
            return _json(start_response, 200, {**first, "queues": values})
        return metrics_app(environ, start_response)

    return app


class MetricsServer:
    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def configured_port(environ: dict[str, str] | None = None) -> int | None:
    """LANDMARKS_METRICS_PORT (default 9808); 'off', 'none' or '-1' disable the server, 0 picks a free port.
    Anything else is a ValueError naming the variable: `landmarks worker` refuses to start with it
    (shared/cli.py) rather than run on without its probes and metrics."""
    raw = (environ if environ is not None else os.environ).get(PORT_ENV, "").strip()
    if raw.lower() in ("off", "none", "false", "disabled", "-1"):
        return None
    if not raw:
        return DEFAULT_PORT
    port = int(raw) if raw.isdecimal() else -1
    if not 0 <= port <= 65535:
        raise ValueError(f"{PORT_ENV}={raw!r}: expected a TCP port from 0 to 65535 (0: any free one) or 'off'")
    return port


def serve(port: int, addr: str | None = None, app=None) -> MetricsServer:
    addr = addr if addr is not None else os.environ.get(ADDR_ENV, "0.0.0.0")
    httpd = make_server(addr, port, app or make_app(), server_class=_ThreadingServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)


_server: MetricsServer | None = None
_gpu_registered = False


def start_worker_server(*, live: Callable[[], dict], ready: Callable[[], dict]) -> MetricsServer | None:
    """Start this process's metrics server once; a port already in use is logged, never fatal.

    No backlog here: the exporter alone reads it (module doc)."""
    global _server, _gpu_registered
    if _server is not None:
        return _server
    port = configured_port()
    if port is None:
        log.info("metrics server disabled (%s)", PORT_ENV)
        return None
    if not _gpu_registered:
        REGISTRY.register(GpuMemoryCollector())
        _gpu_registered = True
    try:
        _server = serve(port, app=make_app(REGISTRY, live=live, ready=ready))
    except OSError as exc:
        log.error("cannot serve metrics on port %s: %s (set %s)", port, exc, PORT_ENV)
        return None
    log.info("metrics, /healthz and /readyz on port %d", _server.port)
    return _server


def exporter_broker_url(settings) -> str:
    """LANDMARKS_BROKER_URL, else the Redis of an embedded stack already running in LANDMARKS_HOME (a development
    machine). Never a Redis started here: a private, empty one would report a backlog of 0 with
    landmarks_queue_backlog_up 1, so KEDA would scale the fleet to its minimum and no alert would fire while
    the events wait in the real broker. A ValueError naming the variable when there is neither."""
    from shared import stack

    if settings.broker_url:
        return settings.broker_url.get_secret_value()
    home = settings.home_path
    embedded = stack.status(home)
    if embedded["running"]["redis"] and embedded["broker_url"]:
        log.info("%s unset: reading the embedded Redis running under %s", BROKER_ENV, home)
        return embedded["broker_url"]
    raise ValueError(f"{BROKER_ENV} is unset and no embedded stack runs under {home}: set it to the fleet's "
                     "Redis (the exporter never starts one of its own, whose empty queues would scale the fleet down)")


def _exporter_main() -> None:  # pragma: no cover - run as a process by the tests and in deploy/
    """The backlog exporter: KEDA's and Prometheus' view of the queues while no worker runs."""
    import sys

    from shared.backfill import backfill_queue
    from shared.logs import configure_logging
    from shared.settings import get_settings

    configure_logging(logging.INFO)
    settings = get_settings()
    try:
        broker_url = exporter_broker_url(settings)
    except ValueError as exc:  # one line naming the variable, as the `landmarks` commands refuse a bad setting
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    queues = [settings.queue, backfill_queue(settings)]
    server = serve(configured_port() or DEFAULT_PORT, app=exporter_app(broker_url, queues))
    log.info("backlog exporter on port %d for queues %s", server.port, queues)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.close()


def exporter_app(broker_url: str, queues: list[str], reader: Callable[[str, list[str]], dict] | None = None):
    """The exporter's WSGI app. Ready while Redis answers a PING: a probe never waits for a backlog read."""
    from shared import health

    registry = CollectorRegistry()
    backlog = BacklogCollector(broker_url, queues, reader=reader)
    registry.register(backlog)

    def live() -> dict:
        return {"ok": True, "at": datetime.now(timezone.utc).isoformat()}

    ready = health.CachedReadiness(lambda: {"broker": health.broker_check(broker_url)})
    return make_app(registry, live=live, ready=ready, backlog=backlog)


if __name__ == "__main__":  # pragma: no cover
    _exporter_main()
