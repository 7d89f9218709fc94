"""Machinery for the fault suite (test_faults.py): a stack of our own whose parts can be stopped and
restarted (PostgreSQL from pgserver, Redis with AOF, a milvus-lite server on a fixed port), a worker
kept running the way Kubernetes would restart it, a producer that behaves like the upload pipeline,
and the accounting of where every event ended up."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis
import sqlalchemy as sa
from celery import Celery

from shared.backlog import PRIORITY_SEPARATOR, UNACKED_KEY
from shared.stack import _port_open, _wait_for, redis_client_url, start_postgres, start_redis, stop_postgres, stop_redis

from ops_fleet import UPLOADED, start_worker, stop

# --- the stack -----------------------------------------------------------------------------------


class MilvusServer:
    """milvus-lite as its own process on a fixed port, so it can die and come back at the same URL."""

    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        self.data_dir, self.port, self.log = data_dir, port, log
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_for(lambda: _port_open(self.port) or self.proc.poll() is not None, "Milvus", 60)
        if self.proc.poll() is not None:
            raise RuntimeError(f"milvus-lite exited at start; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # an outage, not a maintenance window
            self.proc.wait(30)


@dataclass
class FaultStack:
    root: Path
    database_url: str
    broker_url: str
    milvus: MilvusServer

    def stop_postgres(self) -> None:
        stop_postgres(self.root / "pg")

    def start_postgres(self) -> None:
        start_postgres(self.root / "pg")

    def restart_redis(self, down_s: float) -> None:
        """A clean restart: Redis writes its append-only file on SIGTERM and replays it at start."""
        stop_redis(self.root / "redis")
        time.sleep(down_s)
        start_redis(self.root / "redis")

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(redis_client_url(self.broker_url), socket_timeout=5)


# --- the worker, restarted like a pod ------------------------------------------------------------


class SupervisedWorker:
    """A real `landmarks worker`; when it exits on its own (e.g. it chose to die so the broker redelivers)
    it is started again after a second, as a Deployment would. ``restarts`` counts those."""

    def __init__(self, env: dict, log: Path) -> None:
        self.env, self.log = env, log
        self.restarts = 0
        self._proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> SupervisedWorker:
        self._proc = start_worker(self.env, self.log)
        self._thread.start()
        return self

    @property
    def process(self) -> subprocess.Popen:
        return self._proc

    def signal_and_restart(self, signum: int, exit_timeout_s: float = 120) -> int:
        """Sends ``signum``, waits for the exit, starts a new worker; returns the old one's exit code."""
        with self._lock:
            self._proc.send_signal(signum)
            code = self._proc.wait(exit_timeout_s)
            self._proc = start_worker(self.env, self.log)
            return code

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                if self._proc.poll() is not None and not self._stopping.is_set():
                    time.sleep(1)
                    self.restarts += 1
                    self._proc = start_worker(self.env, self.log)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        with self._lock:
            stop(self._proc)


# --- the producer ----------------------------------------------------------------------------------


@dataclass
class Producer:
    """Publishes like the upload pipeline: an event the broker refuses is kept and sent again later
    (an outbox), so every event is eventually accepted; ``refused`` counts the refusals."""

    broker_url: str
    queue: str
    refused: int = 0
    _app: Celery = field(init=False)

    def __post_init__(self) -> None:
        self._app = Celery(broker=self.broker_url)
        self._app.conf.broker_connection_timeout = 2

    def send(self, event: dict) -> bool:
        try:
            self._app.send_task(UPLOADED, args=[event], queue=self.queue, retry=False)
            return True
        except Exception:  # noqa: BLE001 - any refusal: keep it for the next attempt
            self.refused += 1
            return False

    def send_all(self, events: list[dict], per_second: float | None = None, deadline_s: float = 180) -> None:
        pending = list(events)
        deadline = time.monotonic() + deadline_s
        while pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"the broker refused {len(pending)} events for {deadline_s:.0f} s")
            unsent = []
            for event in pending:
                if not self.send(event):
                    unsent.append(event)
                    time.sleep(0.05)
                elif per_second:
                    time.sleep(1 / per_second)
            pending = unsent

    def close(self) -> None:
        self._app.close()


# --- the accounting --------------------------------------------------------------------------------


@dataclass
class Ledger:
    """Where each sent event ended up: processed (tagged or no landmark), recorded failure, still in the
    broker, or nowhere (lost); and whether any event's effect was applied more than once."""

    fault: str
    sent: int
    refused_by_broker: int
    processed: int
    failures: int
    in_broker: int
    lost: int
    duplicated: int
    worker_restarts: int

    def row(self) -> str:
        return (f"{self.fault:<24} sent {self.sent:>5}  refused-then-resent {self.refused_by_broker:>4}  "
                f"tagged {self.processed:>5}  failures {self.failures:>4}  in-broker {self.in_broker:>4}  "
                f"lost {self.lost:>3}  duplicated {self.duplicated:>3}  worker-restarts {self.worker_restarts}")


def outcome_ids(engine: sa.Engine, event_ids: list[str]) -> tuple[set[str], set[str]]:
    """(ids that reached the tag tables without failing, ids recorded as failures)."""
    with engine.connect() as conn:
        done = set(conn.scalars(sa.text("SELECT event_id FROM processed_events WHERE event_id = ANY(:ids)"),
                                {"ids": event_ids}))
        failed = set(conn.scalars(sa.text("SELECT event_key FROM failures WHERE event_key = ANY(:ids)"),
                                  {"ids": event_ids}))
    return done - failed, failed


def broker_event_ids(client: redis.Redis, queue: str) -> set[str]:
    """Event ids of the upload messages waiting in the queue or reserved (unacknowledged) by a worker."""
    raws = []
    for name in [queue.encode()] + list(client.scan_iter(f"{queue}{PRIORITY_SEPARATOR}*")):
        raws += client.lrange(name, 0, -1)
    for _, raw in client.hscan_iter(UNACKED_KEY):
        message, _exchange, routing_key = json.loads(raw)
        if routing_key == queue:
            raws.append(json.dumps(message))
    ids = set()
    for raw in raws:
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        if args and isinstance(args[0], dict) and "event_id" in args[0]:
            ids.add(args[0]["event_id"])
    return ids


_APPLIED = re.compile(r'"applied": (\d+)')


def applied_in_logs(log: Path, since_offset: int) -> int:
    """How many event effects the workers' batches applied (the sum of each batch's ``applied``)."""
    text = log.read_bytes()[since_offset:].decode(errors="replace")
    return sum(int(n) for line in text.splitlines() if "batch of" in line for n in _APPLIED.findall(line))


def make_events(photos: dict, n: int, n_bad: int, tag: str) -> tuple[list[dict], set[str]]:
    """``n`` upload events over the photo set; ``n_bad`` of them point at a corrupt or missing file."""
    good = photos["firsts"] + photos["everyday"]
    events, bad_ids = [], set()
    for i in range(n):
        bad = i % (n // n_bad) == 0 if n_bad else False
        path = (photos["broken"] if i % 2 else photos["root"] / "missing.jpg") if bad else good[i % len(good)]
        event = {"event_id": f"{tag}-{uuid.uuid4().hex}", "user_id": f"u-{tag}-{i % 17}",
                 "photo_id": f"p{i:05d}", "uri": path.as_uri(), "uploaded_at": "2026-11-27T10:00:00Z"}
        events.append(event)
        if bad:
            bad_ids.add(event["event_id"])
    return events, bad_ids
