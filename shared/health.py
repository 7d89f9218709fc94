"""Liveness and readiness.

* Liveness (``/healthz``): the worker process answers and no batch has been running for longer than the
  visibility timeout (past it Redis hands the batch to another worker, so this one is stuck). It never
  looks at the broker, database or Milvus: an outage of a shared dependency must not restart every pod. It
  answers before the model is loaded, so it is the startup probe too (deploy/k8s/base/worker-deployment.yaml).
* Readiness (``/readyz``, ``landmarks health``): model loaded, broker, database and Milvus reachable. A worker
  without its model tries loading it again, in the background, while its readiness is asked; one whose active
  version cannot be loaded (its file missing, Milvus without it) is not ready, whatever it loaded before, and
  says why. Milvus without the alias of the version PostgreSQL names active (its data lost) fails the Milvus
  check too; before the first publish PostgreSQL names none, and it passes.

Checks run in parallel, each bounded by a timeout, and a worker caches its readiness for a few seconds
so that frequent probes do not become load on the dependencies.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

CHECK_TIMEOUT_S = 3.0
READY_CACHE_S = 5.0
MAX_BATCH_ENV = "LANDMARKS_LIVENESS_MAX_BATCH_S"

CheckFn = Callable[[], str]  # returns a detail for humans; raises when the check fails


def run_checks(checks: dict[str, CheckFn], timeout_s: float = CHECK_TIMEOUT_S) -> dict[str, Any]:
    """{"ok": all passed, "checks": {name: {"ok", "detail", "ms"}}}; a check past timeout_s fails."""
    results: dict[str, dict[str, Any]] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, len(checks)), thread_name_prefix="health")
    try:
        started = time.perf_counter()
        futures = {name: pool.submit(_timed, fn) for name, fn in checks.items()}
        for name, future in futures.items():
            left = max(0.0, timeout_s - (time.perf_counter() - started))
            try:
                results[name] = future.result(timeout=left)
            except FutureTimeout:
                results[name] = {"ok": False, "detail": f"no answer within {timeout_s:.0f}s", "ms": timeout_s * 1000}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return {"ok": all(r["ok"] for r in results.values()), "checks": results}


def _timed(fn: CheckFn) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        detail, ok = fn(), True
    except Exception as exc:  # noqa: BLE001 - any failure is a failed check, reported, not raised
        detail, ok = f"{type(exc).__name__}: {exc}"[:500], False
    return {"ok": ok, "detail": detail, "ms": round((time.perf_counter() - started) * 1000, 1)}


# --- the checks ----------------------------------------------------------------------------------

def broker_check(broker_url: str, timeout_s: float = CHECK_TIMEOUT_S) -> CheckFn:
    def check() -> str:
        import redis

        from shared.stack import redis_client_url
        client = redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=timeout_s,
                                      socket_connect_timeout=timeout_s)
        try:
            client.ping()
            try:  # managed Redis often forbids CONFIG; the ping is what matters
                aof = client.config_get("appendonly").get("appendonly")
            except redis.RedisError:
                aof = None
        finally:
            client.close()
        return "PONG" + (f", appendonly={aof}" if aof is not None else "")
    return check


def database_check(engine) -> CheckFn:
    def check() -> str:
        from sqlalchemy import text
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            try:
                revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
            except Exception:  # noqa: BLE001 - reachable but not migrated: reported in the detail
                revision = None
        return f"schema revision {revision}" if revision else "reachable, schema not migrated"
    return check


def milvus_check(index, engine=None) -> CheckFn:
    """Milvus answers with the active version's alias. Given ``engine``, a missing alias fails the check when
    PostgreSQL names an active version (Milvus lost its data, or the alias was dropped); with none named either,
    a fleet that never published, it passes."""
    def check() -> str:
        version = index.active_version()
        if version:
            return f"alias -> {version}"
        if engine is None:
            return "reachable, no active version"
        from sqlalchemy.exc import SQLAlchemyError
        try:
            problem = unserved_active_version(engine, index)
        except SQLAlchemyError:  # the database check reports the database; this one is about Milvus
            return "reachable, no active version (PostgreSQL did not answer whether one should be)"
        if problem:
            raise RuntimeError(problem)
        return "reachable, no active version"
    return check


def unserved_active_version(engine, index) -> str | None:
    """Why Milvus serves no version although PostgreSQL names one active, and what restores it; None when
    PostgreSQL names none either (nothing published yet). For a Milvus whose alias ``lm_active`` is missing."""
    active = _active_in_postgres(engine)
    return _not_served(*active, index, alias=None) if active else None


def _active_in_postgres(engine) -> tuple[str, str] | None:
    """(version, checkpoint) of the version PostgreSQL names active, None if none."""
    from shared.db.session import transaction
    from shared.db.writer import active_model_version
    with transaction(engine) as session:
        row = active_model_version(session)
        return (row.version, row.checkpoint) if row else None


def _not_served(version: str, checkpoint: str, index, alias: str | None) -> str:
    """Milvus's alias is not on ``version``, the active one in PostgreSQL: promoting it moves the alias, unless
    Milvus lost its collections, which only publishing its file again recreates."""
    if not index.is_published(version):
        return f"Milvus holds no collections of {version} (its data lost?): `landmarks publish {checkpoint}`"
    return f"PostgreSQL says {version!r} is active, the Milvus alias {alias!r}: run `landmarks promote {version}`"


def model_file(checkpoint: str) -> Path:
    """The file workers load for a version: LANDMARKS_MODEL_PATH when set (for every version, as
    shared/runtime.load_model_runtime does), else the checkpoint it was published from."""
    from shared.settings import get_settings
    return get_settings().model_path or Path(checkpoint)


def unreadable_model_file(checkpoint: str) -> Path | None:
    """The file workers would load for a version (``model_file``) if this process cannot read it; None if it can.
    Only what this node sees: workers on other nodes may mount the models elsewhere."""
    path = model_file(checkpoint)
    return None if path.is_file() and os.access(path, os.R_OK) else path


def worker_model_check(loaded_version: Callable[[], str | None],
                       load_error: Callable[[], str | None] = lambda: None,
                       load_again: Callable[[], None] = lambda: None) -> CheckFn:
    """Ready with the active version loaded. Not ready while it cannot be (a missing, corrupt or mismatched
    model file): the worker hands its batches back meanwhile, even with an older version still loaded.

    A failing check calls ``load_again``, which must return at once (workers/context.ModelRetry loads in the
    background): a worker loads its model at start-up and at each batch, so one started before the first
    `landmarks publish` would otherwise stay unready until an event came."""
    def check() -> str:
        error, version = load_error(), loaded_version()
        if error or version is None:
            load_again()
        if error:
            raise RuntimeError(error)
        if version is None:
            raise RuntimeError("no model loaded yet")
        return f"version {version} loaded"
    return check


def published_model_check(engine, index) -> CheckFn:
    """Outside a worker: the active version agrees between PostgreSQL and Milvus and its file is readable. Its
    detail also names the versions Milvus holds that PostgreSQL lacks (restored from an older backup), which
    fail nothing: no worker loads them unless the alias points at one, which the check fails on."""
    def check() -> str:
        active, milvus_version = _active_in_postgres(engine), index.active_version()
        note = _milvus_only_note(engine, index)
        if active is None:
            raise RuntimeError("no active model version: run `landmarks publish MODEL`" + note)
        pg_version, checkpoint = active
        if milvus_version != pg_version:
            raise RuntimeError(_not_served(pg_version, checkpoint, index, milvus_version) + note)
        unreadable = unreadable_model_file(checkpoint)
        if unreadable is not None:
            raise RuntimeError(f"version {pg_version}: model file {unreadable} is not readable here" + note)
        return f"version {pg_version}, {model_file(checkpoint)}" + note
    return check


def _milvus_only_note(engine, index) -> str:
    from shared.rollout import milvus_only_versions
    unknown = milvus_only_versions(engine, index)
    if not unknown:
        return ""
    return (f"; Milvus also holds {', '.join(unknown)}, which PostgreSQL lacks (restored from an older backup?): "
            "`landmarks versions` lists them, `landmarks publish` of their model files registers them again")


# --- liveness ------------------------------------------------------------------------------------

def max_batch_seconds(default: float, environ: Mapping[str, str] | None = None) -> float:
    """LANDMARKS_LIVENESS_MAX_BATCH_S, seconds > 0 (unset: ``default``). A value that is not is a ValueError
    naming the variable: `landmarks worker` refuses to start with it (shared/cli.py)."""
    raw = (environ if environ is not None else os.environ).get(MAX_BATCH_ENV, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{MAX_BATCH_ENV}={raw!r}: expected a number of seconds greater than 0, such as 900")
    return seconds


def liveness(batch_running_since: Callable[[], float | None], max_batch_s: float) -> dict[str, Any]:
    since = batch_running_since()
    running_s = time.time() - since if since else 0.0
    ok = running_s <= max_batch_s
    return {"ok": ok, "batch_running_s": round(running_s, 1), "max_batch_s": max_batch_s,
            **({} if ok else {"detail": "a batch has run longer than the visibility timeout: stuck"})}


class CachedReadiness:
    """Runs the checks at most once per ``ttl_s``; concurrent probes share one run."""

    def __init__(self, checks: Callable[[], dict[str, CheckFn]], ttl_s: float = READY_CACHE_S,
                 timeout_s: float = CHECK_TIMEOUT_S) -> None:
        self._checks = checks
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._last: dict[str, Any] = {"ok": False, "checks": {}}

    def __call__(self) -> dict[str, Any]:
        with self._lock:
            if time.monotonic() - self._at >= self.ttl_s:
                self._last = run_checks(self._checks(), self.timeout_s)
                self._at = time.monotonic()
            return self._last
