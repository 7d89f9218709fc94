"""A worker holding more events for their countdown than its prefetch limit (fetches tried again later,
batches handed back in an outage: workers/tasks.py) still takes and runs a live upload at once. The held
events used to fill the limit, and the live one waited until they fell due (workers/pool.PipelinedBatches)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery

from workers.pool import prefetch_multiplier

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BATCH, IN_FLIGHT = 8, 2
HELD_FOR_S = 600  # far past the test's wait: a live event that waits for the held ones fails it

# A worker with the fleet's transport, pool, batching and prefetch, whose task only records what it ran
# (no model, database or Milvus needed).
WORKER = textwrap.dedent(f"""
    import os
    from celery import Celery
    from workers.broker import install
    from workers.pool import PipelinedBatches, prefetch_multiplier
    install()
    app = Celery("held-retries", broker=os.environ["BROKER_URL"], set_as_current=True)
    app.conf.update(worker_prefetch_multiplier=prefetch_multiplier({BATCH}, {IN_FLIGHT}),
                    worker_concurrency={IN_FLIGHT}, worker_pool="workers.pool:BatchPipelinePool",
                    task_acks_late=True, task_serializer="json", accept_content=["json"],
                    worker_hijack_root_logger=False)

    @app.task(name="held.record", base=PipelinedBatches, flush_every={BATCH}, flush_interval=0.05,
              acks_late=True, typing=False)
    def record(requests):
        with open(os.environ["RAN"], "a") as ran:
            ran.writelines(f"{{r.args[0]}}\\n" for r in requests)

    app.worker_main(["worker", "-Q", os.environ["QUEUE"], "--loglevel=INFO", "--without-gossip",
                     "--without-mingle", "--without-heartbeat"])
""")


def _wait(predicate, what: str, process: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None, f"the worker exited with {process.returncode}: {log.read_text()[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_live_event_runs_at_once_while_more_than_a_prefetch_window_of_events_wait_for_their_countdown(
        tmp_path, broker_url):
    queue = f"lm_held_{uuid.uuid4().hex[:8]}"
    ran, log = tmp_path / "ran", tmp_path / "worker.log"
    env = {**os.environ, "BROKER_URL": broker_url, "QUEUE": queue, "RAN": str(ran),
           "LANDMARKS_HOME": str(tmp_path / "home"), "LANDMARKS_METRICS_PORT": "off",
           # Never reached; set so that nothing falls back to the embedded stack.
           "LANDMARKS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
           "LANDMARKS_MILVUS_URI": "http://127.0.0.1:1"}
    process = subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=REPO, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT)
    producer = Celery("held-retries-producer", broker=broker_url, set_as_current=False)
    try:
        _wait(lambda: " ready." in log.read_text(), "the worker", process, log)
        held = 3 * prefetch_multiplier(BATCH, IN_FLIGHT) * IN_FLIGHT  # three prefetch windows
        for i in range(held):
            producer.send_task("held.record", args=[f"retry{i}"], countdown=HELD_FOR_S, queue=queue)
        producer.send_task("held.record", args=["live"], queue=queue)
        _wait(lambda: ran.exists() and "live" in ran.read_text().split(), "the live event", process, log)
        assert ran.read_text().split() == ["live"]  # the held ones are not due yet
    finally:
        process.terminate()  # warm shutdown: the held messages go back to the queue
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        producer.close()
        redis.Redis.from_url(broker_url).delete(queue)
