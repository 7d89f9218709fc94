"""A stop signal while a worker warms up (loads its model; minutes under torch.compile) ends it at once: it
has taken no event yet. Celery's own handler only sets a flag its event loop reads after the warm-up, so the
pod used to run into its grace period and SIGKILL. Once warmed up, SIGTERM is Celery's warm shutdown again."""

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

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# `landmarks worker` whose warm-up only marks its start and end (no model, database or Milvus needed).
WORKER = textwrap.dedent("""
    import os, sys, time
    import workers.context
    def warm_up(pool=None):
        open(os.path.join(os.environ["MARKS"], "warming"), "w").close()
        time.sleep(float(os.environ["WARM_UP_S"]))
        open(os.path.join(os.environ["MARKS"], "warmed"), "w").close()
    workers.context.warm_up = warm_up
    from shared.cli import app
    sys.argv = ["landmarks", "worker", "--loglevel=INFO"]
    app()
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
