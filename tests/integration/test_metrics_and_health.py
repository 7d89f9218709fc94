"""Metrics, structured logs, liveness and readiness: a real worker's endpoint scraped after real events,
`landmarks health`, and the pieces (JSON formatter, backlog collector, liveness) on their own."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shared import health, metrics
from shared.logs import JsonFormatter, configure_logging, json_logs_enabled, log_context
from shared.stack import _port_open

import ops_fleet as fleet

pytestmark = [pytest.mark.integration]


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --- the pieces ----------------------------------------------------------------------------------

def test_json_formatter_writes_one_object_per_line_with_ids_and_context():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.json.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    with log_context(model_version="v7"):
        logger.info("photo %s failed", "p1", extra={"event_id": "e1", "photo_id": "p1", "level": "clash"})
    try:
        raise ValueError("boom\nline two")
    except ValueError:
        logger.exception("with a traceback")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["msg"] == "photo p1 failed" and first["level"] == "INFO" and first["logger"] == logger.name
    assert (first["event_id"], first["photo_id"], first["model_version"]) == ("e1", "p1", "v7")
    assert first["extra_level"] == "clash"  # an extra field never overwrites the formatter's own keys
    assert first["ts"].endswith("+00:00")
    assert "model_version" not in second and "ValueError: boom" in second["exc"]


def test_json_logs_are_switched_on_by_the_environment():
    assert not json_logs_enabled({})
    assert json_logs_enabled({"LANDMARKS_LOG_JSON": "1"}) and json_logs_enabled({"LANDMARKS_LOG_JSON": "true"})
    assert not json_logs_enabled({"LANDMARKS_LOG_JSON": "0"})
    root = logging.getLogger()
    saved = [(h, h.formatter) for h in root.handlers]
    try:
        assert configure_logging(environ={"LANDMARKS_LOG_JSON": "1"})
        assert all(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    finally:
        for h, f in saved:
            h.setFormatter(f)


def _reader(calls: list):
    def reader(url, queues):
        calls.append(list(queues))
        if url == "down":
            raise ConnectionError("refused")
        return {q: {"queue": q, "waiting": 3, "reserved": 2, "backlog": 5} for q in queues}
    return reader


def test_backlog_collector_asks_redis_at_most_once_per_ttl_and_survives_an_outage():
    calls = []
    reader = _reader(calls)
    registry = CollectorRegistry()
    collector = metrics.BacklogCollector("redis://x", ["live", "live_backfill"], ttl_s=60, reader=reader)
    registry.register(collector)
    assert calls == []  # registering does not touch Redis
    for _ in range(3):
        samples = _samples(generate_latest(registry).decode())
    assert calls == [["live", "live_backfill"]]  # one read of Redis for both queues
    assert _value(samples, "landmarks_queue_backlog", queue="live") == 5
    assert _value(samples, "landmarks_queue_reserved", queue="live_backfill") == 2
    assert _value(samples, "landmarks_queue_backlog_up") == 1

    down = metrics.BacklogCollector("down", ["live"], ttl_s=0, reader=reader)
    samples = _samples(generate_latest(_registry_with(down)).decode())
    assert _value(samples, "landmarks_queue_backlog_up") == 0
    assert ("landmarks_queue_backlog", (("queue", "live"),)) not in samples


def _registry_with(collector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_the_exporters_readiness_pings_redis_and_never_reads_the_backlog(broker_url):
    """Its probe answers at once however many events are reserved; it fails when Redis does not answer."""
    calls = []
    ready = _serve(metrics.exporter_app(broker_url, ["live", "live_backfill"], reader=_reader(calls)))
    down = _serve(metrics.exporter_app(f"redis://127.0.0.1:{fleet.free_port()}/0", ["live"], reader=_reader(calls)))
    try:
        status, body = fleet.http_get(f"http://127.0.0.1:{ready.port}/readyz")
        assert status == 200 and json.loads(body)["checks"]["broker"]["detail"].startswith("PONG")
        assert fleet.http_get(f"http://127.0.0.1:{down.port}/readyz")[0] == 503
        assert calls == []
        assert json.loads(fleet.http_get(f"http://127.0.0.1:{ready.port}/backlog")[1])["backlog"] == 5
        assert calls == [["live", "live_backfill"]]
    finally:
        ready.close()
        down.close()


def _serve(app) -> metrics.MetricsServer:
    return metrics.serve(0, addr="127.0.0.1", app=app)


def test_a_worker_exports_no_backlog_so_a_dead_exporter_shows(monkeypatch):
    """The workers' /metrics lack landmarks_queue_*: absent(landmarks_queue_backlog_up) in the alerts then
    means the exporter is gone, whatever the workers do; and no worker process reads Redis' unacked hash."""
    monkeypatch.setenv(metrics.PORT_ENV, "0")
    monkeypatch.setenv(metrics.ADDR_ENV, "127.0.0.1")
    monkeypatch.setattr(metrics, "_server", None)
    server = metrics.start_worker_server(live=lambda: {"ok": True}, ready=lambda: {"ok": True})
    try:
        base = f"http://127.0.0.1:{server.port}"
        names = {name for name, _ in _samples(fleet.http_get(base + "/metrics")[1].decode())}
        assert "landmarks_model_loaded" in names  # the worker's own metrics are there ...
        assert not names & set(metrics.BACKLOG_METRICS)  # ... the backlog's are not
        assert fleet.http_get(base + "/backlog")[0] == 404
    finally:
        server.close()


def test_an_idle_worker_stops_claiming_its_model_version(monkeypatch):
    """After a promote an idle worker has no batch to switch at: it must not hold LandmarksModelVersionSkew
    on. A worker that keeps starting batches (even ones failing to load the new version) stays counted."""
    now = [1000.0]
    monkeypatch.setattr(metrics, "_clock", lambda: now[0], raising=False)
    monkeypatch.setattr(metrics, "_model_version", None)
    monkeypatch.setattr(metrics, "_model_in_use_at", float("-inf"), raising=False)
    monkeypatch.setattr(metrics, "_batches_running", {})

    def versions() -> dict:
        samples = _samples(generate_latest(metrics.REGISTRY).decode())
        return {dict(labels)["version"]: v for (name, labels), v in samples.items() if name == "landmarks_model_info"}

    try:
        metrics.set_model("v1")  # the warm-up's load
        assert versions() == {"v1": 1}
        now[0] += metrics.MODEL_INFO_IDLE_S - 1
        assert versions() == {"v1": 1}
        now[0] += 2  # idle: v2 may be active by now, this worker would switch at its next batch
        assert versions() == {}
        metrics.batch_started()  # a batch, which may fail to load v2: the worker still runs v1
        metrics.batch_finished()
        now[0] += metrics.MODEL_INFO_IDLE_S - 1
        assert versions() == {"v1": 1}
    finally:
        metrics.set_model(None)


def test_liveness_fails_only_for_a_batch_stuck_past_the_limit():
    assert health.liveness(lambda: None, 60)["ok"]
    assert health.liveness(lambda: time.time() - 5, 60)["ok"]
    stuck = health.liveness(lambda: time.time() - 120, 60)
    assert not stuck["ok"] and "stuck" in stuck["detail"]


def test_checks_run_in_parallel_and_a_hung_one_times_out():
    def slow():
        time.sleep(5)
        return "late"

    def broken():
        raise ConnectionError("refused")

    started = time.monotonic()
    report = health.run_checks({"ok": lambda: "fine", "slow": slow, "broken": broken}, timeout_s=0.5)
    assert time.monotonic() - started < 2
    assert not report["ok"]
    assert report["checks"]["ok"] == {"ok": True, "detail": "fine", "ms": report["checks"]["ok"]["ms"]}
    assert not report["checks"]["slow"]["ok"] and "no answer" in report["checks"]["slow"]["detail"]
    assert "ConnectionError: refused" in report["checks"]["broken"]["detail"]


def test_a_failing_model_check_asks_for_the_model_again_and_a_passing_one_does_not():
    asked = []
    load_again = lambda: asked.append(True)  # noqa: E731
    assert health.worker_model_check(lambda: "v1", lambda: None, load_again)() == "version v1 loaded"
    assert asked == []
    for version, error in ((None, None), ("v1", "cannot load the active model v2: file missing")):
        with pytest.raises(RuntimeError):
            health.worker_model_check(lambda: version, lambda: error, load_again)()
    assert len(asked) == 2


def test_the_model_retry_runs_one_load_at_a_time_at_most_once_per_period_and_only_once_armed():
    from workers.context import ModelRetry
    started, release = [], threading.Event()

    def load():
        started.append(time.monotonic())
        release.wait(5)
    retry = ModelRetry(load, every_s=0.2)
    retry()
    assert started == []  # not armed: the warm-up has not made its own attempt yet
    retry.arm()
    retry()
    assert started == []  # the warm-up's attempt was the last one
    time.sleep(0.25)
    for _ in range(3):
        retry()
    time.sleep(0.25)
    retry()  # due again, but the first load still runs
    assert len(started) == 1
    release.set()
    _wait_for(lambda: not retry._thread.is_alive())
    retry()
    assert len(started) == 2
    retry.disarm()
    time.sleep(0.25)
    retry()
    assert len(started) == 2


def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_metrics_port_setting():
    assert metrics.configured_port({}) == 9808
    assert metrics.configured_port({"LANDMARKS_METRICS_PORT": "9100"}) == 9100
    assert metrics.configured_port({"LANDMARKS_METRICS_PORT": "off"}) is None


# --- a real worker -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    return fleet.photo_set(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def model_version(photos, engine, milvus_uri, tmp_path_factory) -> str:
    return fleet.publish_tiny_model(photos, engine, milvus_uri, tmp_path_factory.mktemp("models"), "obs")


@pytest.fixture(scope="module")
def env(photos, database_url, broker_url, milvus_uri, tmp_path_factory) -> dict:
    return fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path_factory.mktemp("home"),
                           LANDMARKS_METRICS_PORT=fleet.free_port(), LANDMARKS_LOG_JSON="1")


@pytest.mark.slow
def test_a_real_workers_metrics_match_what_it_processed(photos, model_version, env, engine, tmp_path):
    port = env["LANDMARKS_METRICS_PORT"]
    base = f"http://127.0.0.1:{port}"
    queue = env["LANDMARKS_QUEUE"]
    user = f"mia_{uuid.uuid4().hex[:6]}"
    producer = Celery(broker=env["LANDMARKS_BROKER_URL"])
    producer.conf.update(task_serializer="json")
    send = lambda name, event: producer.send_task(name, args=[event], queue=queue)  # noqa: E731

    log = tmp_path / "worker.log"
    worker = fleet.start_worker(env, log)
    try:
        # Ready once the model is loaded (warm-up at worker_ready), before any event arrives.
        def readiness():
            if not _port_open(int(port)):
                return None
            status, body = fleet.http_get(base + "/readyz", 5)
            return body if status == 200 else None

        ready = fleet.wait(readiness, "readiness", worker=worker)
        checks = json.loads(ready)["checks"]
        assert set(checks) == {"model", "broker", "database", "milvus"} and all(c["ok"] for c in checks.values())
        assert model_version in checks["model"]["detail"]
        status, body = fleet.http_get(base + "/healthz")
        assert status == 200 and json.loads(body)["ok"]

        tagged = [fleet.event(user, p) for p in photos["firsts"]]
        everyday = [fleet.event(user, p) for p in photos["everyday"]]
        broken = fleet.event(user, photos["broken"])
        outside = fleet.event(user, Path("/etc/hostname"))
        malformed = {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": "no-uri"}
        uploads = tagged + everyday + [broken, outside]
        for e in uploads + [malformed]:
            send(fleet.UPLOADED, e)
        fleet.wait(lambda: fleet.processed(engine, user) == len(uploads), "all uploads", worker=worker)
        send(fleet.UPLOADED, tagged[0])  # a redelivery: processed again, applied never
        send(fleet.DELETED, {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": everyday[0]["photo_id"]})
        fleet.wait(lambda: fleet.processed(engine, user) == len(uploads) + 1, "the deletion", worker=worker)

        def scraped():
            samples = _samples(fleet.http_get(base + "/metrics")[1].decode())
            settled = _value(samples, "landmarks_events_skipped_total") == 1
            return samples if settled else None

        s = fleet.wait(scraped, "the counters to settle", timeout_s=60, worker=worker)
        assert not {name for name, _ in s} & set(metrics.BACKLOG_METRICS)  # the exporter's alone
        events = lambda outcome: _value(s, "landmarks_events_total", outcome=outcome, source="live")  # noqa: E731
        assert events("tagged") == len(tagged) + 1  # the redelivered event counts as processed ...
        assert _value(s, "landmarks_events_skipped_total") == 1  # ... and as skipped, not applied
        assert events("no_landmark") == len(everyday)
        assert events("failed") == 2
        assert events("malformed") == 1
        assert events("deleted") == 1
        assert _value(s, "landmarks_failures_total", stage="decode") == 1
        # What reached the model was decoded by the CPU pool (no GPU here), the redelivered event again.
        assert _value(s, "landmarks_photos_decoded_total", where="cpu") == len(tagged) + 1 + len(everyday)
        assert _value(s, "landmarks_photos_decoded_total", where="device") == 0
        assert _value(s, "landmarks_failures_total", stage="fetch") == 1
        assert _value(s, "landmarks_failures_total", stage="validate") == 1

        batches = _value(s, "landmarks_batches_total")
        assert batches >= 2
        # Every batch's photos came back from the decode pool in at least one chunk, each counted by its path.
        handovers = {path: _value(s, "landmarks_decode_handovers_total", path=path)
                     for path in ("arena", "file", "pipe")}
        assert sum(handovers.values()) >= batches and handovers["file"] == 0  # the arena never filled up
        assert _value(s, "landmarks_batch_size_count") == batches
        assert _value(s, "landmarks_batch_size_sum") == len(uploads) + 1
        assert _value(s, "landmarks_batch_size_bucket", le="+Inf") == batches
        for stage in ("fetch_decode", "write"):  # every batch; embed and search skip a batch of failures
            assert _value(s, "landmarks_stage_seconds_count", stage=stage) == batches, stage
        for stage in metrics.STAGES:
            assert 1 <= _value(s, "landmarks_stage_seconds_count", stage=stage) <= batches, stage
            assert _value(s, "landmarks_stage_seconds_sum", stage=stage) > 0, stage
        assert _value(s, "landmarks_event_age_seconds_count") == len(uploads) + 1
        assert _value(s, "landmarks_model_info", version=model_version) == 1
        assert _value(s, "landmarks_model_loaded") == 1
        assert _value(s, "landmarks_last_batch_timestamp_seconds") > time.time() - 300
        assert _value(s, "landmarks_batch_running_since_seconds") == 0
        assert _value(s, "process_resident_memory_bytes") > 0
        names = {name for name, _ in s if name.startswith("landmarks_")}
        assert names <= metrics.metric_names(), names - metrics.metric_names()

        assert fleet.http_get(base + "/backlog")[0] == 404  # KEDA reads the exporter's

        # `landmarks health --worker` is the container's HEALTHCHECK; without --worker it checks from here.
        code, report = fleet.ops_cli(env, "health", "--worker")
        assert code == 0 and report["ok"] and report["checks"]["model"]["ok"]
        code, report = fleet.ops_cli(env, "health")
        assert code == 0 and report["ok"], report
        assert model_version in report["checks"]["model"]["detail"]
    finally:
        fleet.stop(worker)
        producer.close()

    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    batch_lines = [x for x in lines if x.get("logger") == "shared.pipeline" and "batch_size" in x]
    assert batch_lines and all(x["model_version"] == model_version for x in batch_lines)
    failed = [x for x in lines if x.get("event_id") == broken["event_id"]]
    assert failed and failed[0]["photo_id"] == broken["photo_id"] and failed[0]["model_version"] == model_version
    assert failed[0]["stage"] == "decode"
    assert any(x.get("event_id") == malformed["event_id"] and x["level"] == "WARNING" for x in lines)


@pytest.fixture
def nothing_published(pg_server_url, tmp_path) -> tuple[str, str]:
    """(database URL, Milvus URI) of a migrated database and a Milvus of their own, where no version is published."""
    import sqlalchemy as sa
    from milvus_lite.adapter.grpc.server import start_server_in_thread

    from shared.db import migrate
    from shared.db.session import make_engine
    admin = make_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    name = f"lm_unpublished_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    database_url = admin.url.set(database=name).render_as_string(hide_password=False)
    migrate.upgrade(database_url)
    (tmp_path / "milvus").mkdir()
    server, db, milvus_port = start_server_in_thread(data_dir=str(tmp_path / "milvus"), host="127.0.0.1", port=0)
    try:
        yield database_url, f"http://127.0.0.1:{milvus_port}"
    finally:
        server.stop(0)
        db.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.slow
def test_a_worker_started_before_the_first_publish_turns_ready_after_it_without_an_event(
        photos, nothing_published, broker_url, tmp_path):
    """The model was loaded only at start-up and by a batch: such a worker stayed unready until an event came."""
    from shared.db.session import make_engine
    from workers.context import MODEL_RETRY_S
    database_url, milvus_uri = nothing_published
    port = fleet.free_port()
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home",
                          LANDMARKS_METRICS_PORT=port)
    log = tmp_path / "worker.log"
    worker = fleet.start_worker(env, log)
    engine = make_engine(database_url)
    try:
        def readiness() -> tuple[int, dict] | None:
            if not _port_open(port):
                return None
            status, body = fleet.http_get(f"http://127.0.0.1:{port}/readyz", 5)
            report = json.loads(body)
            return (status, report) if report.get("checks") else None

        fleet.wait(lambda: "no model loaded at start-up" in log.read_text(), "the warm-up", worker=worker)
        status, report = fleet.wait(readiness, "readiness", worker=worker)
        assert status == 503 and not report["checks"]["model"]["ok"]
        assert all(report["checks"][name]["ok"] for name in ("broker", "database", "milvus")), report

        version = fleet.publish_tiny_model(photos, engine, milvus_uri, tmp_path / "models", "late")
        status, report = fleet.wait(lambda: (answer := readiness()) and answer[0] == 200 and answer,
                                    "readiness after the publish", timeout_s=3 * MODEL_RETRY_S + 60, worker=worker)
        assert version in report["checks"]["model"]["detail"]
        samples = _samples(fleet.http_get(f"http://127.0.0.1:{port}/metrics")[1].decode())
        assert _value(samples, "landmarks_model_loaded") == 1
        assert _value(samples, "landmarks_batches_total") == 0  # no event: the worker loaded it by itself
    finally:
        fleet.stop(worker)
        engine.dispose()


def test_health_names_the_dependency_that_is_down(env, model_version):
    down = {**env, "LANDMARKS_BROKER_URL": f"redis://127.0.0.1:{fleet.free_port()}/0"}
    code, report = fleet.ops_cli(down, "health", "--timeout", "1", check=False)
    assert code == 1 and not report["ok"]
    assert not report["checks"]["broker"]["ok"]
    assert report["checks"]["database"]["ok"] and report["checks"]["milvus"]["ok"]

    code, report = fleet.ops_cli(env, "health", "--url", f"http://127.0.0.1:{fleet.free_port()}", check=False)
    assert code == 1 and not report["ok"] and "no worker answers" in report["error"]


# --- disaster recovery: what an SRE sees when Milvus or PostgreSQL lost or went back on data ----------------

def _worker_readiness(pipeline, engine, index) -> dict:
    """A worker's model check, and the Milvus check given PostgreSQL, run as /readyz runs them."""
    return health.run_checks({
        "model": health.worker_model_check(lambda: pipeline.loaded_version, lambda: pipeline.load_error),
        "milvus": health.milvus_check(index, engine),
    })


def _model_loaded() -> float:
    return _value(_samples(generate_latest(metrics.REGISTRY).decode()), "landmarks_model_loaded")


@pytest.fixture
def unpublished_pipeline(photos, nothing_published):
    """A worker's pipeline on a database and a Milvus of their own where nothing is published yet."""
    from shared.db.session import make_engine
    from shared.index import LandmarkIndex
    from shared.pipeline import RecognitionPipeline
    from shared.settings import Settings
    database_url, milvus_uri = nothing_published
    engine = make_engine(database_url)
    index = LandmarkIndex(milvus_uri)
    pipeline = RecognitionPipeline(Settings(file_roots=str(photos["root"]), device="cpu", model_path=None),
                                   engine, index)
    try:
        yield pipeline
    finally:
        pipeline.close()
        index.close()
        engine.dispose()
        metrics.set_model_error(None)
        metrics.set_model(None)


def _uploads(user: str, paths: list[Path]) -> list:
    from shared.events import PhotoUploaded
    return [PhotoUploaded.model_validate(fleet.event(user, path)) for path in paths]


def test_a_fleet_that_never_published_is_not_ready_and_says_to_publish_while_milvus_passes(photos,
                                                                                          unpublished_pipeline):
    """Before the first `landmarks publish`: not ready, as it always was (the model check fails), and the Milvus
    check passes, since PostgreSQL names no active version either: nothing was lost."""
    from shared.errors import InfrastructureError
    pipeline = unpublished_pipeline
    with pytest.raises(InfrastructureError, match="no active model version"):
        pipeline.process(_uploads("nobody", photos["firsts"][:1]))
    report = _worker_readiness(pipeline, pipeline.engine, pipeline.index)
    assert not report["ok"]
    assert not report["checks"]["model"]["ok"]
    assert "no active model version: run `landmarks publish MODEL` first" in report["checks"]["model"]["detail"]
    assert report["checks"]["milvus"] == {**report["checks"]["milvus"], "ok": True,
                                          "detail": "reachable, no active version"}
    assert _model_loaded() == 0
    with pytest.raises(RuntimeError, match=r"no active model version: run `landmarks publish MODEL`"):
        health.published_model_check(pipeline.engine, pipeline.index)()


def test_a_worker_whose_milvus_lost_its_data_is_not_ready_says_to_publish_again_and_counts_no_model(
        photos, unpublished_pipeline, nothing_published, broker_url, tmp_path):
    """Milvus came back empty (collections and alias gone) while PostgreSQL still names the active version: every
    batch fails. The worker is not ready and says why, landmarks_model_loaded reads 0 (LandmarksNoWorkers can
    fire), `landmarks health` gives the command that restores it, and publishing the file again does."""
    from shared.db.session import transaction
    from shared.db.writer import active_model_version
    from shared.errors import InfrastructureError
    from shared.publish import publish_model
    pipeline, engine, index = unpublished_pipeline, unpublished_pipeline.engine, unpublished_pipeline.index
    version = fleet.publish_tiny_model(photos, engine, index.uri, tmp_path / "models", "lost")
    with transaction(engine) as session:
        checkpoint = active_model_version(session).checkpoint
    uploads = lambda: _uploads("dr", photos["firsts"])  # noqa: E731
    metrics.observe_batch(pipeline.process(uploads()), len(photos["firsts"]))  # as the batch task does
    assert _worker_readiness(pipeline, engine, index)["ok"] and _model_loaded() == 1

    index.deactivate()  # what a Milvus restarted on an empty volume holds: no alias, no collections
    index.drop(version)
    with pytest.raises(InfrastructureError):
        pipeline.process(uploads())
    lost = f"Milvus holds no collections of {version} (its data lost?): `landmarks publish {checkpoint}`"
    report = _worker_readiness(pipeline, engine, index)
    assert not report["ok"], report
    assert lost in report["checks"]["model"]["detail"]
    assert not report["checks"]["milvus"]["ok"] and lost in report["checks"]["milvus"]["detail"]
    assert _model_loaded() == 0
    with pytest.raises(RuntimeError) as refusal:
        health.published_model_check(engine, index)()
    assert lost in str(refusal.value) and "promote" not in str(refusal.value)
    database_url, milvus_uri = nothing_published
    ops_env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home")
    code, report = fleet.ops_cli(ops_env, "health", check=False)  # what the operator runs
    assert code == 1 and not report["checks"]["model"]["ok"] and lost in report["checks"]["model"]["detail"]

    publish_model(Path(checkpoint), engine, index)  # the command the checks gave
    metrics.observe_batch(pipeline.process(uploads()), len(photos["firsts"]))
    report = _worker_readiness(pipeline, engine, index)
    assert report["ok"], report
    assert report["checks"]["model"]["detail"] == f"version {version} loaded"
    assert _model_loaded() == 1


def test_a_worker_that_cannot_load_the_active_model_counts_no_model_until_it_can(photos, unpublished_pipeline,
                                                                                 tmp_path):
    """A version promoted with --force while its file was not where the workers run: the old version stays in
    memory (landmarks_model_info keeps naming it, for LandmarksModelVersionSkew), but landmarks_model_loaded
    reads 0 so that LandmarksNoWorkers fires; 1 again once the file is back and the version loads."""
    from shared import rollout
    from shared.errors import InfrastructureError
    from shared.publish import publish_model
    pipeline, engine, index = unpublished_pipeline, unpublished_pipeline.engine, unpublished_pipeline.index
    first = fleet.publish_tiny_model(photos, engine, index.uri, tmp_path / "models", "loads")
    metrics.observe_batch(pipeline.process(_uploads("mf", photos["everyday"])), len(photos["everyday"]))
    assert _model_loaded() == 1
    second = f"unreadable_{uuid.uuid4().hex[:8]}"
    model = fleet.build_model(photos, tmp_path / "models", second)
    publish_model(model, engine, index, activate=False)
    moved = model.rename(model.with_suffix(".elsewhere"))
    rollout.promote(second, engine, index, force=True)

    with pytest.raises(InfrastructureError, match=re.escape(str(model))):
        pipeline.process(_uploads("mf", photos["everyday"]))
    assert pipeline.loaded_version == first
    samples = _samples(generate_latest(metrics.REGISTRY).decode())
    assert _value(samples, "landmarks_model_loaded") == 0
    assert _value(samples, "landmarks_model_info", version=first) == 1
    report = _worker_readiness(pipeline, engine, index)
    assert not report["ok"] and str(model) in report["checks"]["model"]["detail"]

    moved.rename(model)
    metrics.observe_batch(pipeline.process(_uploads("mf", photos["everyday"])), len(photos["everyday"]))
    assert pipeline.loaded_version == second and _model_loaded() == 1
    assert _worker_readiness(pipeline, engine, index)["ok"]


@pytest.mark.slow
def test_a_real_worker_whose_milvus_lost_its_data_turns_unready_and_counts_no_model_until_republished(
        photos, nothing_published, broker_url, tmp_path):
    """The reviewer's case end to end: /readyz and /metrics of a real worker, an event failing on the lost
    version, then `landmarks publish` of the recorded checkpoint bringing it back without a restart."""
    from shared.db.session import make_engine, transaction
    from shared.db.writer import active_model_version
    from shared.index import LandmarkIndex
    from shared.publish import publish_model
    from workers.context import MODEL_RETRY_S
    database_url, milvus_uri = nothing_published
    engine, index = make_engine(database_url), LandmarkIndex(milvus_uri)
    version = fleet.publish_tiny_model(photos, engine, milvus_uri, tmp_path / "models", "dr")
    with transaction(engine) as session:
        checkpoint = active_model_version(session).checkpoint
    port = fleet.free_port()
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home",
                          LANDMARKS_METRICS_PORT=port)
    base = f"http://127.0.0.1:{port}"
    producer = Celery(broker=broker_url)
    producer.conf.update(task_serializer="json")
    worker = fleet.start_worker(env, tmp_path / "worker.log")

    def readiness(status: int):
        if not _port_open(port):
            return None
        answer, body = fleet.http_get(base + "/readyz", 5)
        return json.loads(body) if answer == status else None

    def model_loaded() -> float:
        return _value(_samples(fleet.http_get(base + "/metrics")[1].decode()), "landmarks_model_loaded")

    try:
        fleet.wait(lambda: readiness(200), "readiness", worker=worker)
        assert model_loaded() == 1
        index.deactivate()  # Milvus back on an empty volume
        index.drop(version)
        user = f"dr_{uuid.uuid4().hex[:6]}"
        producer.send_task(fleet.UPLOADED, args=[fleet.event(user, photos["firsts"][0])],
                           queue=env["LANDMARKS_QUEUE"])
        report = fleet.wait(lambda: readiness(503), "the worker to turn unready", timeout_s=60, worker=worker)
        lost = f"Milvus holds no collections of {version} (its data lost?): `landmarks publish {checkpoint}`"
        assert not report["checks"]["model"]["ok"] and lost in report["checks"]["model"]["detail"], report
        assert model_loaded() == 0

        publish_model(Path(checkpoint), engine, index)
        report = fleet.wait(lambda: readiness(200), "readiness after publishing again",
                            timeout_s=3 * MODEL_RETRY_S + 60, worker=worker)
        assert report["checks"]["model"]["detail"] == f"version {version} loaded"
        assert model_loaded() == 1
        fleet.wait(lambda: fleet.processed(engine, user) == 1, "the event, retried", timeout_s=120, worker=worker)
    finally:
        fleet.stop(worker)
        producer.close()
        index.close()
        engine.dispose()


def test_versions_and_health_name_what_milvus_holds_and_postgresql_lacks(photos, unpublished_pipeline,
                                                                        nothing_published, broker_url, tmp_path):
    """PostgreSQL restored from a backup older than a publish: Milvus holds a version PostgreSQL has no row of.
    `landmarks versions` lists it apart, `landmarks health` mentions it; neither fails for it."""
    from shared import rollout
    from shared.publish import gallery_rows
    from shared.model import load_checkpoint
    engine, index = unpublished_pipeline.engine, unpublished_pipeline.index
    kept = fleet.publish_tiny_model(photos, engine, index.uri, tmp_path / "models", "kept")
    lost = f"restored_away_{uuid.uuid4().hex[:8]}"
    index.publish(lost, *gallery_rows(load_checkpoint(fleet.build_model(photos, tmp_path / "models", lost))[2]))

    listed = {item["version"]: item for item in rollout.versions(engine, index)}
    assert set(listed) == {kept, lost}
    assert (listed[kept]["milvus_only"], listed[kept]["in_milvus"], listed[kept]["is_active"]) == (False, True, True)
    assert listed[lost]["milvus_only"] and listed[lost]["in_milvus"] and not listed[lost]["is_active"]
    assert listed[lost]["checkpoint"] is None  # PostgreSQL never recorded it here
    assert "milvus_only" not in rollout.versions(engine)[0]  # without Milvus, nothing to compare

    detail = health.published_model_check(engine, index)()
    assert kept in detail and lost in detail and "PostgreSQL lacks" in detail

    database_url, milvus_uri = nothing_published
    ops_env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home")
    _, out = fleet.ops_cli(ops_env, "versions")
    assert [v["version"] for v in out["versions"] if v["milvus_only"]] == [lost]
    code, report = fleet.ops_cli(ops_env, "health")
    assert code == 0 and report["checks"]["model"]["ok"] and lost in report["checks"]["model"]["detail"]


def test_the_backlog_exporter_serves_what_keda_reads(broker_url, tmp_path):
    """`python -m shared.metrics`: the backlog of both queues with no worker running (scaling from zero)."""
    import subprocess
    import sys

    from celery import Celery

    port = fleet.free_port()
    queue = f"lm_exp_{uuid.uuid4().hex[:8]}"
    env = {**fleet.fleet_env("postgresql://unused@127.0.0.1:1/x", broker_url, "http://127.0.0.1:1", tmp_path,
                             tmp_path / "home"), "LANDMARKS_QUEUE": queue, "LANDMARKS_METRICS_PORT": str(port)}
    producer = Celery(broker=broker_url)
    for k in range(3):
        producer.send_task(fleet.UPLOADED, args=[{"k": k}], queue=queue)
    producer.send_task(fleet.UPLOADED, args=[{"k": 9}], queue=f"{queue}_backfill")
    exporter = subprocess.Popen([sys.executable, "-m", "shared.metrics"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        body = fleet.wait(lambda: _port_open(port) and fleet.http_get(f"http://127.0.0.1:{port}/backlog")[1],
                          "the exporter", timeout_s=60, worker=exporter)
        backlog = json.loads(body)
        assert (backlog["queue"], backlog["backlog"], backlog["waiting"]) == (queue, 3, 3)
        assert backlog["queues"][f"{queue}_backfill"]["backlog"] == 1
        samples = _samples(fleet.http_get(f"http://127.0.0.1:{port}/metrics")[1].decode())
        assert _value(samples, "landmarks_queue_backlog", queue=queue) == 3
        assert fleet.http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    finally:
        exporter.terminate()
        exporter.wait(10)
        import redis
        client = redis.Redis.from_url(broker_url)
        client.delete(queue, f"{queue}_backfill")
        producer.close()


def _exporter_env(home: Path, port: int, **extra: str) -> dict:
    """The exporter's environment with no LANDMARKS_BROKER_URL: unset, or misspelled (`extra`)."""
    env = {k: v for k, v in os.environ.items() if k != "LANDMARKS_BROKER_URL"}
    return {**env, "LANDMARKS_HOME": str(home), "LANDMARKS_METRICS_PORT": str(port), "PYTHONUNBUFFERED": "1",
            **extra}


def test_an_exporter_without_a_broker_url_refuses_to_start_rather_than_read_a_redis_of_its_own():
    """A private Redis would report an empty backlog with landmarks_queue_backlog_up 1: KEDA would scale the
    fleet to its minimum while events pile up in the real broker, and no alert would fire."""
    import subprocess
    import sys

    from shared import stack

    home = Path(tempfile.mkdtemp(prefix="lm-exporter-")) / "home"  # short: Redis' socket path has a limit
    port = fleet.free_port()
    env = _exporter_env(home, port, LANDMARKS_BROKER_UTL="redis://127.0.0.1:6379/0")  # a typo: as unset
    exporter = subprocess.Popen([sys.executable, "-m", "shared.metrics"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        try:
            _, stderr = exporter.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the exporter kept running without LANDMARKS_BROKER_URL (serving: {_port_open(port)})")
        assert exporter.returncode != 0
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "LANDMARKS_BROKER_URL" in lines[0], stderr
        assert not stack.status(home)["running"]["redis"] and not (home / "redis").exists()
        assert not _port_open(port)
    finally:
        if exporter.poll() is None:
            exporter.kill()
            exporter.wait(10)
        stack.down(home)
        shutil.rmtree(home.parent, ignore_errors=True)


def test_an_exporter_without_a_broker_url_reads_the_embedded_stack_already_running():
    """A development machine: `landmarks stack up` runs the embedded Redis, and the exporter reads its queues."""
    import subprocess
    import sys

    from shared import stack

    home = Path(tempfile.mkdtemp(prefix="lm-exporter-")) / "home"
    port = fleet.free_port()
    queue = f"lm_exp_{uuid.uuid4().hex[:8]}"
    broker_url = stack.start_servers(home, ["broker_url"])["broker_url"]
    producer = Celery(broker=broker_url)
    exporter = None
    try:
        for k in range(2):
            producer.send_task(fleet.UPLOADED, args=[{"k": k}], queue=queue)
        exporter = subprocess.Popen([sys.executable, "-m", "shared.metrics"], env=_exporter_env(
            home, port, LANDMARKS_QUEUE=queue), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        body = fleet.wait(lambda: _port_open(port) and fleet.http_get(f"http://127.0.0.1:{port}/backlog")[1],
                          "the exporter", timeout_s=60, worker=exporter)
        assert (json.loads(body)["queue"], json.loads(body)["backlog"]) == (queue, 2)
        samples = _samples(fleet.http_get(f"http://127.0.0.1:{port}/metrics")[1].decode())
        assert _value(samples, "landmarks_queue_backlog_up") == 1
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.wait(10)
        producer.close()
        stack.down(home)
        shutil.rmtree(home.parent, ignore_errors=True)
