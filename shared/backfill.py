"""Backfill: re-enqueue stored photos (the ``photos`` table) so the active model version tags them.

* Events go to a low-priority queue, ``<LANDMARKS_QUEUE>_backfill`` (``LANDMARKS_BACKFILL_QUEUE``), that
  the same workers consume beside the live queue (workers/app.py adds it), at most ``rate`` events/s.
* Live uploads keep their latency: the backfill pauses while the live queue's backlog (waiting +
  reserved) is above ``max_live_backlog``, and while its own queue holds more than
  ``max_backfill_backlog`` events (so a slow fleet is not buried under a million queued events).
* Resumable: a keyset cursor (``Scope.keyset``: by upload time for ``--since``, else by user and photo) is
  saved in ``backfill_jobs`` about once a second; running the same command again resumes the job. A job
  belongs to one activation of the active version: its name derives from the scope, ``failed`` and
  ``include_current`` included, the version and its activation (``model_activations.id``), and with
  ``include_current`` the running shadow, so the same command after another activation (a rollback, or a
  promote back to an earlier version) or, with ``include_current``, under another shadow starts a new job
  instead of finding the old one done. A job named by hand keeps the scope and version it was started with: a
  run asking for others is refused rather than resuming (or finding done) the wrong job. A crash re-sends at
  most the events sent since the last save: they are reprocessed, which is harmless.
* A run stops (status ``version_changed``) when another activation happens while it runs: its photos were
  chosen for the version that was active. It checks every ``ACTIVATION_CHECK_EVERY`` events.
* One run per job at a time: a run holds a session-level advisory lock on the job's name for its whole
  length; a second run (a retried Kubernetes Job, a second shell) is refused instead of resuming from the
  same cursor and sending everything twice.
* Fresh event ids (``backfill-<uuid>``): the writer skips event ids it has already applied, so replaying
  the original upload events would change nothing. Photos already processed by the active version are
  skipped unless ``include_current``. Deleted photos are never re-enqueued (and the writer would ignore
  them anyway).
* A done job sends nothing when run again, but counts (up to ``UNPROCESSED_COUNT_CAP``) the photos of its
  selection the active version has still not processed: events lost with the broker's data leave the job
  done and those photos out of the albums until ``restart``.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, cast, column, exists, func, or_, select, table, text, tuple_, update
from sqlalchemy.dialects.postgresql import OID, insert
from sqlalchemy.engine import Engine

from shared.db.models import BackfillJob, FailureRecord, ModelActivation, ModelVersion, Photo
from shared.db.session import session_lock, transaction
from shared.db.writer import running_shadow

log = logging.getLogger(__name__)

EVENT_PREFIX = "backfill-"
QUEUE_ENV = "LANDMARKS_BACKFILL_QUEUE"
REPROCESSABLE = ("tagged", "no_landmark", "failed")
BACKLOG_CHECK_S = 2.0
SAVE_EVERY_S = 1.0
# Events sent between two checks that the job's activation is still the current one: after a promote or
# rollback, at most this many go out for a version the workers no longer run (one query per this many).
ACTIVATION_CHECK_EVERY = 50
# The first key of the two-key advisory locks that hold backfill jobs (the second is the job name's hash):
# its own key space, apart from the one-key locks of shared/db/writer.py.
JOB_LOCK_CLASS = "landmarks.backfill_jobs"
# A done job's photos still unprocessed are counted up to this many: enough to tell a few stragglers from a
# lost queue, without counting a huge table to the end to print one line.
UNPROCESSED_COUNT_CAP = 10_000
DISABLE_BITMAP_SCANS = text("SET LOCAL enable_bitmapscan = off")

# The server's view of the locks held, as far as _held_by_a_run reads it.
_PG_LOCKS = table("pg_locks", column("locktype"), column("classid"), column("objid"), column("objsubid"),
                  column("granted"))

Sender = Callable[[dict], None]
BacklogReader = Callable[[str], int]


class BackfillRefused(Exception):
    """A run that must not go on: its job is running elsewhere, or was started for another scope or version."""


def backfill_queue(settings: Any) -> str | None:
    """The backfill queue: LANDMARKS_BACKFILL_QUEUE, else ``<queue>_backfill``; 'off' disables it."""
    raw = os.environ.get(QUEUE_ENV)
    if raw is None:
        return f"{settings.queue}_backfill"
    raw = raw.strip()
    return None if raw.lower() in ("", "off", "none", "-") else raw


@dataclass(frozen=True)
class Serving:
    """What a backfill sends photos to: the active version, which activation of it this is (the id of its latest
    ``model_activations`` row; None if it became active before the history began) and the running shadow."""
    version: str
    activation: int | None
    shadow: str | None = None


@dataclass(frozen=True)
class Scope:
    user: str | None = None
    since: datetime | None = None
    all: bool = False
    # Only photos whose last attempt failed, those the active version failed included: the retry after a
    # storage outage, which a plain backfill would skip (already processed) and --include-current would
    # widen to every photo.
    failed: bool = False
    # Photos the active version has already processed too: a different set of photos, hence a different job.
    include_current: bool = False

    def __post_init__(self) -> None:
        if sum([self.user is not None, self.since is not None, self.all]) != 1:
            raise ValueError("a backfill needs exactly one of --user U, --since DATE, --all")
        if self.since is not None and self.since.tzinfo is None:
            object.__setattr__(self, "since", self.since.replace(tzinfo=timezone.utc))

    def as_json(self) -> dict[str, Any]:
        if self.user is not None:
            scope: dict[str, Any] = {"user": self.user}
        elif self.since is not None:
            scope = {"since": self.since.isoformat()}
        else:
            scope = {"all": True}
        flags = {flag: True for flag in ("failed", "include_current") if getattr(self, flag)}
        return {**scope, **flags}

    def job_name(self, serving: Serving) -> str:
        """``<version>@<activation>:<scope>[:failed][:include-current[:shadow=<version>]]``: a new activation,
        or with ``include_current`` another shadow (a new candidate to cover every photo), is a new job."""
        key = next(iter(self.as_json().items()))
        served = serving.version if serving.activation is None else f"{serving.version}@{serving.activation}"
        name = f"{served}:all" if self.all else f"{served}:{key[0]}={key[1]}"
        if self.failed:
            name += ":failed"
        if not self.include_current:
            return name
        return f"{name}:include-current" + (f":shadow={serving.shadow}" if serving.shadow else "")

    def keyset(self) -> tuple:
        """The columns the job pages through its photos by. ``--since``: by upload time, so that each chunk is
        read from the cursor on in ``ix_photos_upload_order``; in (user, photo) order every chunk read the rest
        of the window again and sorted it, a cost that grows with the square of the photos. The others: by
        (user, photo), the primary key."""
        p = Photo.__table__.c
        return (p.uploaded_at, p.user_id, p.photo_id) if self.since is not None else (p.user_id, p.photo_id)

    def where(self, version: str) -> list:
        """The photos to send while ``version`` is the active one."""
        p = Photo.__table__.c
        clauses = [p.status.in_(REPROCESSABLE), p.uri.is_not(None)]
        if self.failed:
            clauses.append(or_(p.status == "failed", _failed_behind_old_verdict(version)))
        elif not self.include_current:
            clauses.append(p.model_version.is_distinct_from(version))
        if self.user is not None:
            clauses.append(p.user_id == self.user)
        if self.since is not None:
            clauses.append(p.uploaded_at >= self.since)
        return clauses


def _failed_behind_old_verdict(version: str):
    """A photo whose latest attempt failed although its status does not say so.

    The writer never lets a failure replace a verdict on the same upload (a failed retry keeps the tags), so a
    backfill that met a storage outage leaves the photo 'tagged' under the old version, its failure recorded
    in ``failures`` after the verdict it kept (``photos.processed_at``)."""
    p, f = Photo.__table__.c, FailureRecord.__table__.c
    newer_failure = exists().where(f.user_id == p.user_id, f.photo_id == p.photo_id, f.created_at > p.processed_at)
    return and_(p.model_version.is_distinct_from(version), newer_failure)


def upload_event(row: Any) -> dict[str, Any]:
    """A fresh upload event for a stored photo (the GPS it came with, if the event carried it)."""
    uploaded_at = row.uploaded_at or row.processed_at or datetime.now(timezone.utc)
    event = {"event_id": f"{EVENT_PREFIX}{uuid.uuid4().hex}", "user_id": row.user_id, "photo_id": row.photo_id,
             "uri": row.uri, "uploaded_at": uploaded_at.isoformat()}
    if row.gps_source == "event" and row.gps_lat is not None and row.gps_lon is not None:
        event["gps"] = {"lat": row.gps_lat, "lon": row.gps_lon}
    return event


class RateLimiter:
    """At most ``rate`` calls per second on average, with bursts of at most one second's worth."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("--rate must be > 0 events/s")
        self.rate = rate
        self._clock, self._sleep = clock, sleep
        self._allowance = 1.0
        self._last = clock()

    def wait(self) -> None:
        if self.rate is None:
            return
        now = self._clock()
        self._allowance = min(max(1.0, self.rate), self._allowance + (now - self._last) * self.rate)
        self._last = now
        if self._allowance < 1.0:
            self._sleep((1.0 - self._allowance) / self.rate)
            self._last = self._clock()
            self._allowance = 1.0
        self._allowance -= 1.0


@dataclass
class BackfillResult:
    name: str
    model_version: str
    queue: str | None
    status: str
    enqueued: int  # by this run
    enqueued_total: int  # by the job, all runs
    total: int | None
    seconds: float
    paused_s: float
    already_done: bool = False  # the job was done before this run: it sent nothing (--restart to redo it)
    finished_at: datetime | None = None
    # With already_done: photos of the job's selection that the active version has still not processed
    # (events still queued, or lost with the broker's data), counted up to UNPROCESSED_COUNT_CAP; capped
    # says there are more.
    unprocessed: int | None = None
    unprocessed_capped: bool = False
    # Set when another version became active during the run (status "version_changed"): the job stopped,
    # since its photos were chosen for model_version; it resumes if that version is active again.
    active_version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def run_backfill(engine: Engine, send: Sender, scope: Scope, *, queue: str | None = None,
                 rate: float | None = None, name: str | None = None, restart: bool = False,
                 include_current: bool = False, limit: int | None = None, chunk: int = 500,
                 backlog: BacklogReader | None = None, live_queue: str | None = None,
                 max_live_backlog: int | None = None, max_backfill_backlog: int | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 progress: Callable[[int, int | None], None] | None = None) -> BackfillResult:
    """Send one fresh upload event per stored photo in ``scope``; returns what this run did.

    Raises BackfillRefused when another run holds the job, or when the job ``name`` was started for
    another scope or version (unless ``restart``)."""
    started = clock()
    limiter = RateLimiter(rate, clock, sleep)  # a bad rate is refused before the job is opened
    if include_current:
        scope = replace(scope, include_current=True)
    serving = _serving(engine)
    version = serving.version
    name = name or scope.job_name(serving)
    with job_lock(engine, name):
        job = _open_job(engine, name, scope, version, rate, restart)
        result = BackfillResult(name, version, queue, job["status"], 0, job["enqueued"], job["total"], 0.0, 0.0)
        if job["status"] == "done":
            result.already_done, result.finished_at = True, job["finished_at"]
            result.unprocessed, result.unprocessed_capped = count_unprocessed(engine, scope, version)
            log.info("backfill %s was already done; %d%s of its photos not processed by %s", name,
                     result.unprocessed, "+" if result.unprocessed_capped else "", version,
                     extra={"model_version": version})
            return result
        guard = _BacklogGuard(backlog, live_queue, max_live_backlog, queue, max_backfill_backlog, clock, sleep)
        _enqueue(engine, send, scope, serving, job, result, limiter, guard, limit=limit, chunk=chunk,
                 clock=clock, progress=progress)
    result.enqueued_total = job["enqueued"] + result.enqueued
    result.seconds = round(clock() - started, 3)
    result.paused_s = round(result.paused_s, 3)
    log.info("backfill %s: %d events this run, %d in all, %s", name, result.enqueued, result.enqueued_total,
             result.status, extra={"model_version": version})
    return result


def _serving(engine: Engine) -> Serving:
    with transaction(engine) as session:
        current = _current_activation(session)
        if current is None:
            raise LookupError("no active model version: publish or promote one before a backfill")
        shadow = running_shadow(session)
        return Serving(*current, shadow.version if shadow is not None else None)


def _current_activation(session) -> tuple[str, int | None] | None:
    """The active version and the id of its latest activation; None if no version is active."""
    mv, activations = ModelVersion.__table__.c, ModelActivation.__table__.c
    latest = select(func.max(activations.id)).where(activations.version == mv.version).scalar_subquery()
    row = session.execute(select(mv.version, latest).where(mv.is_active)).one_or_none()
    return tuple(row) if row is not None else None


def _enqueue(engine: Engine, send: Sender, scope: Scope, serving: Serving, job: dict[str, Any],
             result: BackfillResult, limiter: RateLimiter, guard: _BacklogGuard, *, limit: int | None,
             chunk: int, clock: Callable[[], float], progress: Callable[[int, int | None], None] | None) -> None:
    """Sends the job's photos from its cursor on, saving the cursor about once a second, until they are all
    sent, ``limit`` is reached, or another activation has happened."""
    name, keyset = job["name"], scope.keyset()
    cursor = tuple(job[f"cursor_{c.name}"] for c in keyset) if job["cursor_user_id"] is not None else None
    last_save, unsaved = clock(), 0
    while True:
        rows = _next_photos(engine, scope, serving.version, cursor, chunk)
        if not rows:
            result.finished_at = _save(engine, name, keyset, cursor, unsaved, done=True)
            result.status = "done"
            return
        for k, row in enumerate(rows):
            if (limit is not None and result.enqueued >= limit) or (
                    k % ACTIVATION_CHECK_EVERY == 0 and _activation_changed(engine, serving, result)):
                _save(engine, name, keyset, cursor, unsaved)
                return
            result.paused_s += guard.wait()
            limiter.wait()
            send(upload_event(row))
            cursor = tuple(row._mapping[c.name] for c in keyset)
            result.enqueued += 1
            unsaved += 1
            if clock() - last_save >= SAVE_EVERY_S:
                _save(engine, name, keyset, cursor, unsaved)
                last_save, unsaved = clock(), 0
                if progress:
                    progress(job["enqueued"] + result.enqueued, job["total"])


def count_unprocessed(engine: Engine, scope: Scope, version: str) -> tuple[int, bool]:
    """Photos of ``scope``'s selection that ``version`` has not processed (for an ``include_current`` job
    too: those still without its verdict), counted up to UNPROCESSED_COUNT_CAP; and whether there are more."""
    cap = UNPROCESSED_COUNT_CAP
    p = Photo.__table__.c
    first = (select(p.photo_id).where(*scope.where(version), p.model_version.is_distinct_from(version))
             .limit(cap + 1).subquery())
    with transaction(engine) as session:
        found = session.scalar(select(func.count()).select_from(first))
    return min(found, cap), found > cap


def _next_photos(engine: Engine, scope: Scope, version: str, cursor: tuple | None, chunk: int) -> list:
    p, keyset = Photo.__table__.c, scope.keyset()
    query = (select(p.user_id, p.photo_id, p.uri, p.uploaded_at, p.processed_at, p.gps_lat, p.gps_lon, p.gps_source)
             .where(*scope.where(version)).order_by(*keyset).limit(chunk))
    if cursor is not None:
        query = query.where(tuple_(*keyset) > tuple_(*cursor))
    with transaction(engine) as session:
        if scope.since is not None:
            # The planner takes the window's share of the photos and the cursor's for independent, so it
            # expects a few hundred photos after the cursor, reads them all by a bitmap scan and sorts them,
            # where reading the index in order stops after ``chunk`` (a 20-day window of 2 M photos: 67 ms a
            # chunk against 1.4 ms).
            session.execute(DISABLE_BITMAP_SCANS)
        return session.execute(query).all()


def _activation_changed(engine: Engine, serving: Serving, result: BackfillResult) -> bool:
    """Whether a promote or rollback happened since the run began (recorded in ``result``)."""
    with transaction(engine) as session:
        current = _current_activation(session)
    if current == (serving.version, serving.activation):
        return False
    result.status, result.active_version = "version_changed", current[0] if current else None
    log.warning("backfill %s stopped: %s was activated while it ran", result.name, result.active_version,
                extra={"model_version": serving.version})
    return True


@contextmanager
def job_lock(engine: Engine, name: str) -> Iterator[None]:
    """Holds backfill job ``name`` for the block; raises BackfillRefused if another run holds it.

    A session-level advisory lock: the job row's FOR UPDATE would end with its transaction, long before the
    run; a crashed run's lock goes with its connection, so it never blocks the next one."""
    with session_lock(engine, _job_lock_key(name), f"backfill job {name!r}") as held:
        if not held:
            raise BackfillRefused(f"backfill job {name!r} is already running (another `landmarks backfill` holds "
                                  "it): let it finish, or stop it, before running it again")
        yield


def _open_job(engine: Engine, name: str, scope: Scope, version: str, rate: float | None,
              restart: bool) -> dict[str, Any]:
    """The job's row, created if new, started over if ``restart``; the caller holds ``job_lock``."""
    table = BackfillJob.__table__
    with transaction(engine) as session:
        stored = session.execute(select(table).where(table.c.name == name)).mappings().one_or_none()
        if stored is not None and not restart:
            _check_same_job(stored, scope, version)
            total = stored["total"]  # counted when it started: not the whole scope again on every run
        else:
            total = session.scalar(select(func.count()).select_from(Photo.__table__).where(*scope.where(version)))
        fresh = {"scope": scope.as_json(), "model_version": version, "cursor_uploaded_at": None,
                 "cursor_user_id": None, "cursor_photo_id": None,
                 "enqueued": 0, "total": total, "rate": rate, "status": "running", "finished_at": None,
                 "updated_at": func.now()}
        stmt = insert(table).values(name=name, **fresh)
        if restart:
            stmt = stmt.on_conflict_do_update(index_elements=["name"], set_=fresh)
        else:
            stmt = stmt.on_conflict_do_update(index_elements=["name"], set_={"rate": rate, "updated_at": func.now()})
        session.execute(stmt)
        return dict(session.execute(select(table).where(table.c.name == name)).mappings().one())


def _check_same_job(stored: Any, scope: Scope, version: str) -> None:
    """A job resumes only the photos it was started for: resuming (or finding done) a job of another scope or
    version would leave the photos the command asks for untouched while it reports success."""
    asked = {"scope": scope.as_json(), "model_version": version}
    if {"scope": stored["scope"], "model_version": stored["model_version"]} != asked:
        raise BackfillRefused(
            f"backfill job {stored['name']!r} was started for scope {stored['scope']} under version "
            f"{stored['model_version']}; this command asks for scope {asked['scope']} under version {version}: "
            "use another --name, or --restart to start that job over with this scope and version")


def _save(engine: Engine, name: str, keyset: tuple, cursor: tuple | None, sent: int,
          done: bool = False) -> datetime | None:
    """Records the progress, ``cursor`` being the values of ``keyset``'s columns; returns the job's
    ``finished_at`` (set when ``done``)."""
    table = BackfillJob.__table__
    values: dict[str, Any] = {"enqueued": table.c.enqueued + sent, "updated_at": func.now()}
    if cursor is not None:
        values.update({f"cursor_{c.name}": value for c, value in zip(keyset, cursor)})
    if done:
        values.update(status="done", finished_at=func.now())
    with transaction(engine) as session:
        return session.scalar(update(table).where(table.c.name == name).values(**values)
                              .returning(table.c.finished_at))


class _BacklogGuard:
    """Pauses the backfill while the live queue (or its own queue) holds too much."""

    def __init__(self, backlog: BacklogReader | None, live_queue: str | None, max_live: int | None,
                 own_queue: str | None, max_own: int | None, clock, sleep) -> None:
        self.backlog = backlog
        self.limits = [(q, m) for q, m in ((live_queue, max_live), (own_queue, max_own)) if q and m is not None]
        self._clock, self._sleep = clock, sleep
        self._checked = float("-inf")

    def wait(self) -> float:
        """Seconds spent paused."""
        if self.backlog is None or not self.limits:
            return 0.0
        paused = 0.0
        while self._clock() - self._checked >= BACKLOG_CHECK_S or paused:
            self._checked = self._clock()
            over = [(q, n, m) for q, m in self.limits if (n := self.backlog(q)) > m]
            if not over:
                break
            if not paused:
                log.info("backfill paused: %s", ", ".join(f"{q} backlog {n} > {m}" for q, n, m in over))
            self._sleep(BACKLOG_CHECK_S)
            paused += BACKLOG_CHECK_S
        return paused


def job_status(engine: Engine, name: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Backfill jobs, the latest started first, each with ``state``: ``done``; ``running`` while a run holds
    it (job_lock); ``interrupted``, a job whose run stopped before the end (stopped by hand, a crash), which
    the same `landmarks backfill` command resumes; or ``outdated``, one whose version is no longer active
    (its photos were chosen for that version: a new backfill starts a job of its own)."""
    table = BackfillJob.__table__
    versions = ModelVersion.__table__
    active = select(versions.c.version).where(versions.c.is_active).scalar_subquery()
    query = select(table, _held_by_a_run(table.c.name).label("held"),
                   (table.c.model_version == active).label("for_active")).order_by(table.c.created_at.desc())
    if name:
        query = query.where(table.c.name == name)
    if limit is not None:
        query = query.limit(limit)
    with transaction(engine) as session:
        rows = [dict(r) for r in session.execute(query).mappings()]
    for row in rows:
        held, for_active = row.pop("held"), row.pop("for_active")
        row["state"] = ("done" if row["status"] == "done" else "running" if held
                        else "interrupted" if for_active else "outdated")
    return rows


def _job_lock_key(name):
    """The two int4 keys of job_lock's advisory lock on the job ``name`` (a string or a column)."""
    return func.hashtext(JOB_LOCK_CLASS), func.hashtext(name)


def _held_by_a_run(name):
    """Whether a session holds job_lock's advisory lock on the job ``name``: its two keys are in pg_locks as
    classid and objid (oid, the int4 keys' bits read unsigned)."""
    locks, (class_key, name_key) = _PG_LOCKS.c, _job_lock_key(name)
    return exists().where(locks.locktype == "advisory", locks.granted, locks.objsubid == 2,
                          locks.classid == cast(class_key, OID), locks.objid == cast(name_key, OID))
