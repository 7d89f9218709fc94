"""A stop signal while a worker warms up (loads its model; minutes under torch.compile) ends it at once: it
has taken no event yet. Celery's own handler only sets a flag its event loop reads after the warm-up, so the
pod used to run into its grace period and SIGKILL. Once warmed up, SIGTERM is Celery's warm shutdown again:
the batches running commit, and a batch prefetched for the next free thread does not start but goes back to
the queue (workers/pool.py)."""

from __future__ import annotations

import os
import signal
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

# `landmarks worker` whose warm-up only marks its start and end (no model, database or Milvus needed). The
# warm-up is swapped once the worker has set up its allocator: importing workers.context earlier would start
# threads before it does (shared/allocator.py).
WORKER = textwrap.dedent("""
    import os, sys, time
    import shared.cli
    def warm_up(pool=None):
        open(os.path.join(os.environ["MARKS"], "warming"), "w").close()
        time.sleep(float(os.environ["WARM_UP_S"]))
        open(os.path.join(os.environ["MARKS"], "warmed"), "w").close()
    keep_freed_memory = shared.cli.keep_freed_memory
    def keep_freed_memory_then_swap_the_warm_up():
        kept = keep_freed_memory()
        import workers.context
        workers.context.warm_up = warm_up
        return kept
    shared.cli.keep_freed_memory = keep_freed_memory_then_swap_the_warm_up
    sys.argv = ["landmarks", "worker", "--loglevel=INFO"]
    shared.cli.app()
""")


def _worker(tmp_path: Path, broker_url: str, warm_up_s: float) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "MARKS": str(tmp_path), "WARM_UP_S": str(warm_up_s), "LANDMARKS_HOME": str(tmp_path / "home"),
           "LANDMARKS_BROKER_URL": broker_url, "LANDMARKS_QUEUE": f"lm_warm_{uuid.uuid4().hex[:8]}",
           "LANDMARKS_BACKFILL_QUEUE": "off", "LANDMARKS_METRICS_PORT": "off",
           # Never reached by this warm-up; set so that nothing falls back to the embedded stack.
           "LANDMARKS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "LANDMARKS_MILVUS_URI": "http://127.0.0.1:1"}
    log = tmp_path / "worker.log"
    process = subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=REPO, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT)
    return process, log


def _wait(predicate, what: str, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None, f"the worker exited with {process.returncode} before {what}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_during_the_warm_up_stops_the_worker_at_once(tmp_path, broker_url):
    process, log = _worker(tmp_path, broker_url, warm_up_s=120)
    try:
        _wait(lambda: (tmp_path / "warming").exists(), "the warm-up", process)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - started < 15
    finally:
        process.kill()
        process.wait()
    assert not (tmp_path / "warmed").exists()
    assert "SIGTERM during the warm-up" in log.read_text()


def test_after_the_warm_up_sigterm_is_celerys_warm_shutdown_again(tmp_path, broker_url):
    process, log = _worker(tmp_path, broker_url, warm_up_s=0.2)
    try:
        _wait(lambda: (tmp_path / "warmed").exists() and " ready." in log.read_text(), "the worker", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()[-3000:]
    finally:
        process.kill()
        process.wait()
    text = log.read_text()
    assert "Warm shutdown" in text and "during the warm-up" not in text
    # Its allocator was set before any other thread allocated: the batch threads share the main heap.
    assert "freed memory kept for the next batch: yes" in text, text[-3000:]


BATCH, IN_FLIGHT = 4, 2

# A worker with the fleet's transport, pool, batching and prefetch, whose batches wait while the file HOLD exists
# (a slow storage), then record what they ran (no model, database or Milvus needed).
BATCH_WORKER = textwrap.dedent(f"""
    import os, time
    from celery import Celery
    from workers.broker import install
    from workers.pool import PipelinedBatches, prefetch_multiplier
    install()
    app = Celery("warm-shutdown", broker=os.environ["BROKER_URL"], set_as_current=True)
    app.conf.update(worker_prefetch_multiplier=prefetch_multiplier({BATCH}, {IN_FLIGHT}),
                    worker_concurrency={IN_FLIGHT}, worker_pool="workers.pool:BatchPipelinePool",
                    task_acks_late=True, task_serializer="json", accept_content=["json"],
                    worker_hijack_root_logger=False)

    @app.task(name="warm.record", base=PipelinedBatches, flush_every={BATCH}, flush_interval=0.05,
              acks_late=True, typing=False)
    def record(requests):
        names = [r.args[0] for r in requests]
        with open(os.environ["STARTED"], "a") as started:
            started.write(" ".join(names) + "\\n")
        while os.path.exists(os.environ["HOLD"]):
            time.sleep(0.05)
        with open(os.environ["RAN"], "a") as ran:
            ran.writelines(f"{{name}}\\n" for name in names)

    app.worker_main(["worker", "-Q", os.environ["QUEUE"], "--loglevel=INFO", "--without-gossip",
                     "--without-mingle", "--without-heartbeat"])
""")


def _batch_worker(env: dict, log: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", BATCH_WORKER], env=env, cwd=REPO, stdout=log.open("ab"),
                               stderr=subprocess.STDOUT)
    _wait(lambda: " ready." in log.read_text(), "the worker", process)
    return process


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigterm_lets_the_running_batches_commit_and_leaves_the_prefetched_one_to_the_queue(tmp_path, broker_url):
    """Two batches run (their fetches hang on a slow storage) and a third, prefetched, waits for a thread. A
    SIGTERM used to run that third batch too before the worker exited, past the pod's grace period."""
    queue = f"lm_warm_{uuid.uuid4().hex[:8]}"
    started, ran, hold, log = tmp_path / "started", tmp_path / "ran", tmp_path / "hold", tmp_path / "worker.log"
    env = {**os.environ, "BROKER_URL": broker_url, "QUEUE": queue, "STARTED": str(started), "RAN": str(ran),
           "HOLD": str(hold), "LANDMARKS_HOME": str(tmp_path / "home"), "LANDMARKS_METRICS_PORT": "off",
           # Never reached; set so that nothing falls back to the embedded stack.
           "LANDMARKS_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "LANDMARKS_MILVUS_URI": "http://127.0.0.1:1"}
    client = redis.Redis.from_url(broker_url)
    producer = Celery("warm-shutdown-producer", broker=broker_url, set_as_current=False)
    events = [f"e{i}" for i in range((IN_FLIGHT + 1) * BATCH)]
    assert len(events) == prefetch_multiplier(BATCH, IN_FLIGHT) * IN_FLIGHT  # the whole prefetch window
    hold.touch()
    process = _batch_worker(env, log)
    try:
        for name in events:
            producer.send_task("warm.record", args=[name], queue=queue)
        _wait(lambda: len(_lines(started)) == IN_FLIGHT and client.llen(queue) == 0,
              "the batches in flight and the prefetched one", process)
        time.sleep(0.5)  # the last messages taken are handed to the batcher, which queues the third batch
        process.send_signal(signal.SIGTERM)
        _wait(lambda: "Warm shutdown" in log.read_text(), "the warm shutdown", process)
        hold.unlink()  # the storage answers: the running batches finish
        assert process.wait(60) == 0, log.read_text()[-3000:]
    finally:
        process.kill()
        process.wait()
    in_flight = [name for line in _lines(started) for name in line.split()]
    assert len(_lines(started)) == IN_FLIGHT, "the prefetched batch ran during the shutdown"
    assert sorted(_lines(ran)) == sorted(in_flight)  # the running batches committed

    restarted = _batch_worker(env, tmp_path / "restarted.log")
    try:
        _wait(lambda: len(_lines(ran)) >= len(events), "the events handed back", restarted)
        time.sleep(0.5)  # nothing more comes
    finally:
        restarted.terminate()
        restarted.wait(30)
        producer.close()
        client.delete(queue)
    assert sorted(_lines(ran)) == sorted(events)  # every event exactly once
