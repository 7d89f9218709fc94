"""The whole worker end to end: N events published to Redis, real `shared.cli worker` processes, the clock
stopped when the last event's commit is in processed_events; laps, RSS and CPU."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from shared.bench.config import REPO, Reporter
from shared.bench.host import cpu_by_role, cpu_s, descendants, minor_faults, process_cpu, rss_mb
from workers.supervisor import resource_shares

log = logging.getLogger(__name__)

_BATCH_LINE = re.compile(r"batch of (\d+): .*?, ms (\{[^}]*\})(?:, cpu ms (\{[^}]*\}))?\s*$")
_ON_DEVICE = re.compile(r", (\d+) decoded on the device,")
_FREED_MEMORY = re.compile(r"freed memory kept for the next batch: (\w+)")


class WorkerLaps(NamedTuple):
    batches: int
    photos: int
    laps: dict[str, float]  # summed ms per stage
    decoded_on_device: int  # photos the device JPEG decoder decoded (0 on a CPU worker)
    cpu_laps: dict[str, float]  # summed CPU ms of the batch threads per stage


def worker_laps(log_text: str) -> WorkerLaps:
    """What the pipeline's per-batch log lines add up to, plain text or the JSON lines of
    LANDMARKS_LOG_JSON=1 (the message is their `msg`)."""
    batches, photos, laps, cpu_laps, on_device = 0, 0, {}, {}, 0
    for line in log_text.splitlines():
        if line.startswith("{"):
            try:
                line = str(json.loads(line).get("msg", ""))
            except (ValueError, AttributeError):
                continue
        match = _BATCH_LINE.search(line)
        if not match:
            continue
        try:
            timings = ast.literal_eval(match.group(2))
            cpu = ast.literal_eval(match.group(3)) if match.group(3) else {}
        except (ValueError, SyntaxError):
            continue
        batches, photos = batches + 1, photos + int(match.group(1))
        _add(laps, timings)
        _add(cpu_laps, cpu)
        device = _ON_DEVICE.search(line)
        on_device += int(device.group(1)) if device else 0
    return WorkerLaps(batches, photos, laps, on_device, cpu_laps)


def freed_memory_kept(log_text: str) -> str | None:
    """The worker's start-up word on its allocator (workers/pool.py): yes, partly or no."""
    match = _FREED_MEMORY.search(log_text)
    return match.group(1) if match else None


def _add(totals: dict[str, float], more: dict) -> None:
    for key, value in more.items():
        totals[key] = totals.get(key, 0.0) + float(value)


def _processed(engine, user: str) -> int:
    import sqlalchemy as sa
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM processed_events WHERE user_id = :u"),
                            {"u": user}).scalar_one()


def _count_tagged(engine, user: str) -> int:
    import sqlalchemy as sa
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM photos WHERE user_id = :u AND status = 'tagged'"),
                            {"u": user}).scalar_one()


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class E2EPlan:
    database_url: str
    broker_url: str
    milvus_uri: str
    queue: str
    staging: str
    file_root: Path
    events: list[dict]
    warmup: list[dict]
    batch_size: int
    device: str
    workdir: Path
    max_wait_ms: int | None = None
    torch_compile: bool = False  # the worker compiles its model at start (LANDMARKS_TORCH_COMPILE)
    stall_s: float = 180.0
    # How often progress is read from PostgreSQL; every 50 ms near the end whatever this says. Each read costs
    # the machine about 2 ms of CPU (PostgreSQL's and the bench's): every 50 ms throughout, that was 2 % of
    # two cores taken from the worker being measured.
    poll_s: float = 0.25
    workers: int = 1  # worker processes on the queue (several per GPU when one process's Python limits it)


class BenchWorkers:
    """The worker processes of an end-to-end run (`python -m shared.cli worker`), each with its own log."""

    FAMILY_TTL_S = 2.0

    def __init__(self, env: dict, count: int, workdir: Path) -> None:
        self.logs = [workdir / ("worker.log" if count == 1 else f"worker-{i}.log") for i in range(count)]
        self.procs: list[subprocess.Popen] = []
        self._family: list[list[int]] = []
        self._family_read_at: float | None = None
        for path in self.logs:
            with path.open("ab") as log_file:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "shared.cli", "-v", "worker", "--loglevel=INFO"],
                    env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT))

    def check_alive(self, done: int, n: int) -> None:
        for proc, path in zip(self.procs, self.logs):
            if proc.poll() is not None:
                raise RuntimeError(f"a bench worker exited with {proc.returncode} at {done}/{n} events:\n"
                                   f"{_tail(path)}")

    def tail(self) -> str:
        return "\n".join(_tail(path) for path in self.logs)

    def rss_mb(self) -> float | None:
        """All the workers and their decode processes; None once one is gone."""
        each = [rss_mb(proc.pid, members) for proc, members in zip(self.procs, self._families())]
        return None if None in each else round(sum(each), 1)

    def _families(self) -> list[list[int]]:
        """Each worker's descendants, read from /proc at most every FAMILY_TTL_S. Finding them reads every
        process's stat (1.2 ms), and RSS is read at every poll, four times a second, on the machine being
        measured; a worker's decode processes are the same for minutes."""
        now = time.monotonic()
        if self._family_read_at is None or now - self._family_read_at >= self.FAMILY_TTL_S:
            self._family = [descendants(proc.pid) for proc in self.procs]
            self._family_read_at = now
        return self._family

    def cpu_s(self) -> tuple[float, float] | None:
        each = [cpu_s(proc.pid) for proc in self.procs]
        return None if None in each else (sum(c[0] for c in each), sum(c[1] for c in each))

    def minor_faults(self) -> int | None:
        each = [minor_faults(proc.pid) for proc in self.procs]
        return None if None in each else sum(each)

    def roles(self) -> dict[int, str]:
        """For cpu_by_role: the workers, their decode forkserver and processes, and this bench."""
        roles = {os.getpid(): "bench"}
        for proc in self.procs:
            roles.update({child: "decode" for child in descendants(proc.pid)})
            roles[proc.pid] = "worker"
        return roles

    def log_offsets(self) -> list[int]:
        return [path.stat().st_size for path in self.logs]

    def laps_since(self, offsets: list[int]) -> list[WorkerLaps]:
        """Each worker's batch laps written after ``offsets``."""
        laps = []
        for path, offset in zip(self.logs, offsets):
            with path.open("rb") as handle:
                handle.seek(offset)
                laps.append(worker_laps(handle.read().decode(errors="replace")))
        return laps

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # Celery warm shutdown
        for proc in self.procs:
            try:
                # Ample for a batch in flight to finish; a run stopped by its time limit (bench/gpu_bench.sh)
                # must not spend much of what is left of a device call here.
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _dead_letters(engine, user: str) -> tuple[int, str | None]:
    """How many of `user`'s events the workers dead-lettered, and one reason."""
    import sqlalchemy as sa
    with engine.connect() as conn:
        count, reason = conn.execute(sa.text("SELECT count(*), min(reason) FROM failures WHERE user_id = :u"),
                                     {"u": user}).one()
    return count, reason


def _wait_for(engine, user: str, n: int, workers: BenchWorkers, stall_s: float,
              on_poll: Callable[[int], None] | None = None, poll_s: float = 0.25) -> float:
    """Polls processed_events until `n` events of `user` are committed; the time the last one was seen.
    A long run polls every `poll_s`, but every 50 ms once the end may come before the next poll, so the
    end is timed closely. A poll that saw no progress also looks for dead letters: every bench event is a
    valid photo, so one means the workers fail, and the run stops at once with their log instead of
    waiting out `stall_s` (a GPU worker failing every batch had used up a device call that way)."""
    last, last_change, step = -1, time.monotonic(), n
    while True:
        done = _processed(engine, user)
        now = time.perf_counter()
        if on_poll:
            on_poll(done)
        if done >= n:
            return now
        if done != last:
            step = done - max(last, 0)  # the progress of one poll
            last, last_change = done, time.monotonic()
        else:
            failed, reason = _dead_letters(engine, user)
            if failed:
                raise RuntimeError(f"the workers dead-lettered {failed} bench events at {done}/{n} ({reason}):\n"
                                   f"{workers.tail()}")
        workers.check_alive(done, n)
        if time.monotonic() - last_change > stall_s:
            raise TimeoutError(f"no progress for {stall_s:.0f}s at {done}/{n} events:\n{workers.tail()}")
        time.sleep(poll_s if n - done > 2 * step else min(poll_s, 0.05))


def _worker_env(plan: E2EPlan) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LANDMARKS_MODEL_PATH"}
    env.update({"LANDMARKS_DATABASE_URL": plan.database_url, "LANDMARKS_BROKER_URL": plan.broker_url,
                "LANDMARKS_MILVUS_URI": plan.milvus_uri, "LANDMARKS_FILE_ROOTS": str(plan.file_root),
                "LANDMARKS_QUEUE": plan.queue, "LANDMARKS_BATCH_SIZE": str(plan.batch_size),
                "LANDMARKS_DEVICE": plan.device, "LANDMARKS_HOME": str(plan.workdir / "home"),
                "LANDMARKS_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1"})
    env.update(resource_shares(plan.workers, env))  # the cores and the arena, shared out as the supervisor does
    if plan.max_wait_ms is not None:
        env["LANDMARKS_MAX_WAIT_MS"] = str(plan.max_wait_ms)
    if plan.torch_compile:
        env["LANDMARKS_TORCH_COMPILE"] = "1"
    return env


WARM_UP_ROUNDS_AT_MOST = 4


def _warm_up(plan: E2EPlan, workers: BenchWorkers, send: Callable[[dict], object], engine,
             reporter: Reporter) -> None:
    """Rounds of the warm-up events (model load, first forward, connections) until every worker has done a
    batch: with several workers, the first one ready could take a whole round and leave another to pay for
    its first forward pass inside the measured run. Each round's events are new ones (an event delivered
    again changes nothing, and would not be counted)."""
    user, sent = plan.warmup[0]["user_id"], 0
    for round_ in range(WARM_UP_ROUNDS_AT_MOST):
        for event in plan.warmup:
            send({**event, "event_id": uuid.uuid4().hex, "photo_id": f"{event['photo_id']}_{round_}"}
                 if round_ else event)
        sent += len(plan.warmup)
        _wait_for(engine, user, sent, workers, max(plan.stall_s, 600.0), on_poll=lambda d: reporter.advance(0),
                  poll_s=0.2)
        time.sleep(0.5)  # let the last warm-up batch finish acknowledging, and log its line
        if all(laps.batches for laps in workers.laps_since([0] * len(workers.procs))):
            return
    log.warning("a bench worker did no warm-up batch in %d rounds; it warms up in the measured run",
                WARM_UP_ROUNDS_AT_MOST)


def run_end_to_end(plan: E2EPlan, reporter: Reporter) -> dict:
    """Events → Redis → `python -m shared.cli worker` (Celery, batches in a thread pool) → tags in PostgreSQL;
    ``plan.workers`` such processes on one queue, as a fleet runs several per machine.

    A warm-up set first (model load, first forward, connections); then all measured events are published
    into a staging list and moved into the workers' queue with one RENAME, so the clock measures the workers
    draining a backlog, not the producer. e2e_img_s = events / (last commit seen − the RENAME)."""
    import redis
    from celery import Celery
    from shared.db.session import make_engine
    from shared.settings import get_settings
    from shared.signing import event_signer
    from shared.stack import redis_client_url

    producer = Celery(broker=plan.broker_url)
    producer.conf.update(task_serializer="json", broker_connection_retry_on_startup=True)
    client = redis.Redis.from_url(redis_client_url(plan.broker_url), socket_timeout=30)
    engine = make_engine(plan.database_url)
    upload = "landmarks.photo_uploaded"
    reporter.start(f"end-to-end: starting {plan.workers} worker(s) and warming up", len(plan.warmup))
    workers = BenchWorkers(_worker_env(plan), plan.workers, plan.workdir)
    sign = event_signer(get_settings())  # a worker given a signing key refuses unsigned events
    try:
        _warm_up(plan, workers, lambda event: producer.send_task(upload, args=[sign(event)], queue=plan.queue),
                 engine, reporter)
        log_offsets = workers.log_offsets()
        rss_start = workers.rss_mb()

        reporter.start(f"end-to-end: publishing {len(plan.events)} events to a staging list")
        start = time.perf_counter()
        for event in plan.events:
            producer.send_task(upload, args=[sign(event)], queue=plan.staging)
        enqueue_s = time.perf_counter() - start
        if client.llen(plan.queue):
            raise RuntimeError(f"queue {plan.queue} is not empty after the warm-up")
        user, n = plan.events[0]["user_id"], len(plan.events)
        reporter.start(f"end-to-end: {n} events, batch {plan.batch_size}", n)
        rss_peak, seen, series = [rss_start or 0.0], [0], [[0, rss_start, 0.0]]

        def poll(done: int) -> None:
            reporter.advance(done - seen[0])
            seen[0] = done
            rss = workers.rss_mb() or 0.0
            rss_peak.append(rss)
            if done >= series[-1][0] + n / 10 or done >= n > series[-1][0]:  # one sample per tenth
                series.append([done, rss, round(time.perf_counter() - t0, 2)])

        cpu_start, processes_start, faults_start = workers.cpu_s(), process_cpu(), workers.minor_faults()
        t0 = time.perf_counter()
        client.rename(plan.staging, plan.queue)  # the whole backlog appears at once
        t_end = _wait_for(engine, user, n, workers, plan.stall_s, on_poll=poll, poll_s=plan.poll_s)
        elapsed = t_end - t0
        cpu_end, by_role = workers.cpu_s(), cpu_by_role(processes_start, process_cpu(), workers.roles())
        faults_end = workers.minor_faults()
        rss_end = workers.rss_mb()
        time.sleep(0.3)  # the last batch's log line
        per_worker = workers.laps_since(log_offsets)
        tagged = _count_tagged(engine, user)
    except (SystemExit, KeyboardInterrupt):  # stopped from outside (a time limit): say where the workers were
        sys.stderr.write(f"end-to-end stopped; the workers' last lines:\n{workers.tail()}\n")
        raise
    finally:
        workers.stop()
        producer.close()
        client.close()
        engine.dispose()
    return {"e2e_img_s": n / elapsed, "e2e_seconds": round(elapsed, 2), "enqueue_img_s": round(n / enqueue_s, 1),
            "rss_mb_start": rss_start, "rss_mb_end": rss_end, "rss_mb_peak": max(rss_peak),
            "rss_mb_series": series, **_laps_summary(per_worker, elapsed),
            "e2e_tagged": tagged, "worker_cpu_ms_per_img": _cpu_per_img(cpu_start, cpu_end, n),
            # Where the machine's CPU went during the run, every process counted (PostgreSQL, Redis, Milvus,
            # the host's own): what `ratio` leaves to overhead, per photo.
            "e2e_cpu_ms_per_img_by_role": {role: round(s * 1e3 / n, 3) for role, s in sorted(by_role.items())},
            "worker_freed_memory_kept": [freed_memory_kept(path.read_text()) for path in workers.logs],
            "worker_minor_faults_per_img": round((faults_end - faults_start) / n, 1)
            if None not in (faults_start, faults_end) else None,
            "worker_log": str(workers.logs[0])}


def _laps_summary(per_worker: list[WorkerLaps], elapsed: float) -> dict:
    """The workers' batch laps, together: per image, batches busy at once, batches per worker."""
    batches = sum(w.batches for w in per_worker)
    photos = sum(w.photos for w in per_worker)
    laps: dict[str, float] = {}
    cpu_laps: dict[str, float] = {}
    for worker in per_worker:
        _add(laps, worker.laps)
        _add(cpu_laps, worker.cpu_laps)
    return {
        "e2e_batches": batches, "e2e_mean_batch": round(photos / batches, 1) if batches else None,
        "worker_ms_per_img": {k: round(v / max(photos, 1), 3) for k, v in laps.items()},
        # The batch threads' CPU in each stage: with worker_cpu_ms_per_img's `main`, what the rest of the
        # worker's process (Celery's consumer, the tasks around the pipeline) costs a photo.
        "worker_stage_cpu_ms_per_img": {k: round(v / max(photos, 1), 3) for k, v in cpu_laps.items()},
        # Batch-seconds per second: how many batches were being worked on, on average (at most
        # LANDMARKS_BATCHES_IN_FLIGHT per worker); waiting for the model's turn does not count.
        "worker_batches_busy": round(sum(v for k, v in laps.items() if k != "wait_model") / 1e3 / elapsed, 3)
        if laps else None,
        "e2e_decoded_on_device": sum(w.decoded_on_device for w in per_worker),
        "e2e_workers": len(per_worker), "e2e_batches_by_worker": [w.batches for w in per_worker],
    }


def _cpu_per_img(start: tuple[float, float] | None, end: tuple[float, float] | None, n: int) -> dict | None:
    """The workers' CPU per photo during the measured run: `main`, the worker processes' own threads (Celery,
    the batch threads: on CPU the forward pass too), and `pool`, their decode processes. On a GPU worker,
    `main` is the host-side cost of a photo that one Python process must carry."""
    if start is None or end is None or not n:
        return None
    return {"main": round((end[0] - start[0]) * 1e3 / n, 3), "pool": round((end[1] - start[1]) * 1e3 / n, 3)}


def bench_event(user: str, i: int, path: Path, gps: tuple[float, float] | None) -> dict:
    event = {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": f"{user}_{i:07d}",
             "uri": path.resolve().as_uri(), "uploaded_at": "2026-11-26T10:00:00Z"}
    if gps:
        event["gps"] = {"lat": gps[0], "lon": gps[1]}
    return event
