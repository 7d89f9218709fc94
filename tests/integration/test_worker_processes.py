"""`landmarks worker --processes 2`: two real worker processes under one supervisor on the real stack. The
pod's one port answers for both; events are processed by the pair; a worker killed mid-run is restarted and
loses nothing; SIGTERM stops both and the supervisor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from shared.stack import _port_open

import ops_fleet as fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    return fleet.photo_set(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def model_version(photos, engine, milvus_uri, tmp_path_factory) -> str:
    return fleet.publish_tiny_model(photos, engine, milvus_uri, tmp_path_factory.mktemp("models"), "procs")


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _by_process(samples: dict, name: str, **labels) -> dict[str, float]:
    out = {}
    for (sample_name, sample_labels), value in samples.items():
        found = dict(sample_labels)
        if sample_name == name and all(found.get(k) == v for k, v in labels.items()):
            out[found["process"]] = out.get(found["process"], 0.0) + value
    return out


def _tagged(engine, user: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(DISTINCT photo_id) FROM photo_tags WHERE user_id = :u"),
                            {"u": user}).scalar_one()


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_worker_processes_share_a_queue_behind_one_port(photos, model_version, database_url, broker_url,
                                                            milvus_uri, engine, tmp_path):
    port = fleet.free_port()
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home",
                          LANDMARKS_METRICS_PORT=port, LANDMARKS_BATCH_SIZE=4, LANDMARKS_LOG_JSON=1)
    base = f"http://127.0.0.1:{port}"
    user = f"duo_{uuid.uuid4().hex[:6]}"
    producer = Celery(broker=env["LANDMARKS_BROKER_URL"])
    producer.conf.update(task_serializer="json")
    log = tmp_path / "supervisor.log"
    supervisor = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--processes", "2"], env=env,
                                  stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def ready():
        status, body = fleet.http_get(base + "/readyz", 10) if _port_open(port) else (None, b"")
        return json.loads(body) if status == 200 else None

    def send(paths):
        for path in paths:
            producer.send_task(fleet.UPLOADED, args=[fleet.event(user, path)], queue=env["LANDMARKS_QUEUE"])

    try:
        report = fleet.wait(ready, "both workers ready", timeout_s=300, worker=supervisor)
        assert set(report["processes"]) == {"0", "1"} and all(p["ok"] for p in report["processes"].values())
        assert report["checks"]["model"]["ok"] and model_version in report["checks"]["model"]["detail"]
        pids = [report["processes"][i]["pid"] for i in ("0", "1")]
        assert len(set(pids)) == 2 and all(_alive(pid) for pid in pids)
        status, body = fleet.http_get(base + "/healthz")
        assert status == 200 and json.loads(body)["ok"]

        uploads = photos["firsts"] * 4 + photos["everyday"] * 4  # distinct events, several batches
        send(uploads)
        fleet.wait(lambda: fleet.processed(engine, user) == len(uploads), "the first uploads", worker=supervisor)
        assert _tagged(engine, user) == len(photos["firsts"]) * 4

        s = _samples(fleet.http_get(base + "/metrics")[1].decode())
        assert _by_process(s, "landmarks_worker_process_up") == {"0": 1.0, "1": 1.0}
        assert _by_process(s, "landmarks_model_loaded") == {"0": 1.0, "1": 1.0}
        events = _by_process(s, "landmarks_events_total")
        assert sum(events.values()) == len(uploads)

        # One worker killed outright: the supervisor starts another; what it held comes back from Redis.
        os.kill(pids[0], signal.SIGKILL)
        fleet.wait(lambda: (r := ready()) and r["processes"]["0"]["pid"] not in (None, pids[0]), "the restart",
                   timeout_s=300, worker=supervisor)
        s = _samples(fleet.http_get(base + "/metrics")[1].decode())
        assert _by_process(s, "landmarks_worker_process_restarts_total") == {"0": 1.0, "1": 0.0}
        more = photos["everyday"] * 3
        send(more)
        fleet.wait(lambda: fleet.processed(engine, user) == len(uploads) + len(more), "uploads after the restart",
                   worker=supervisor)

        code, health = fleet.ops_cli(env, "health", "--url", base)
        assert code == 0 and health["ok"] and set(health["processes"]) == {"0", "1"}
        workers_now = [p["pid"] for p in health["processes"].values()]
    finally:
        fleet.stop(supervisor)
        producer.close()
    assert supervisor.returncode == 0, log.read_text()[-3000:]
    assert not any(_alive(pid) for pid in workers_now)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(x["level"] == "ERROR" and "exited with -9" in x["msg"] and "worker" not in x for x in lines)
    loaded = {x["worker"].split("@")[0] for x in lines if x.get("logger") == "workers.context" and "worker" in x}
    assert loaded == {"worker0", "worker1"}  # each worker's lines say which it is
