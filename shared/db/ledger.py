"""The idempotency ledger's upkeep: processed_events grows by one row per event applied, and
`landmarks prune-ledger` deletes the rows older than the longest an event can come back."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import text
from sqlalchemy.engine import Engine

from shared.db.session import transaction

# The longest an applied event can come back, and so the shortest window the ledger may keep. Redis hands a
# message whose worker died after the commit but before the acknowledgement to another worker one
# visibility timeout later (LANDMARKS_VISIBILITY_TIMEOUT_S, an hour by default), and it then waits behind
# the queue's backlog, which an outage of the workers or of PostgreSQL grows for as long as it lasts; the
# upload pipeline may also send an event twice. A week covers a long weekend's outage. (Fetch retries and
# handed-back events, at most half a visibility timeout late, and deletions retried every 5 minutes all
# come back before their event is applied, so they add nothing.)
MIN_LEDGER_WINDOW = timedelta(days=7)
# Beyond a visibility timeout longer than that, a day for the backlog its redelivery joins.
BACKLOG_MARGIN = timedelta(days=1)
PROGRESS_EVERY_S = 1.0

LEDGER_CUTOFF = text("SELECT now() - make_interval(days => :days)")
OLD_EVENTS = text("SELECT count(*), min(processed_at) FROM processed_events WHERE processed_at < :cutoff")
# The next batch of old events after row ``after``, in the table's order (a TID range scan, or the BRIN
# index ix_processed_events_processed_at's block ranges when few are old): each batch starts where the last
# one stopped, instead of reading again the pages it emptied. Rows of the ledger are never updated, so an
# old row never moves behind the walk.
OLD_EVENTS_AFTER = text("""
    SELECT ctid FROM processed_events
    WHERE processed_at < :cutoff AND ctid > CAST(:after AS tid)
    LIMIT :batch""")
PRUNE_BATCH = text(f"""
    WITH pruned AS (
        DELETE FROM processed_events
        WHERE ctid = ANY (ARRAY({OLD_EVENTS_AFTER.text})) AND processed_at < :cutoff
        RETURNING ctid
    )
    SELECT count(*) AS deleted, CAST(max(ctid) AS text) AS last FROM pruned""")


def ledger_floor(visibility_timeout_s: float) -> timedelta:
    """The shortest window the ledger keeps: the longest an applied event can come back."""
    return max(MIN_LEDGER_WINDOW, timedelta(seconds=visibility_timeout_s) + BACKLOG_MARGIN)


def cutoff(engine: Engine, days: int) -> datetime:
    """The server's now() less ``days``, once: every batch deletes below the same time."""
    with transaction(engine) as session:
        return session.scalar(LEDGER_CUTOFF, {"days": days})


def old_events(engine: Engine, before: datetime) -> tuple[int, datetime | None]:
    """How many events were applied before ``before``, and the oldest one's time."""
    with transaction(engine) as session:
        count, oldest = session.execute(OLD_EVENTS, {"cutoff": before}).one()
    return count, oldest


def prune_events(engine: Engine, before: datetime, batch: int,
                 progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
    """Deletes the processed_events rows applied before ``before``, ``batch`` per transaction, walking the
    table once; returns (rows deleted, batches). ``progress(deleted, batches)`` is called about once a second."""
    deleted, batches, after, last_report = 0, 0, "(0,0)", 0.0
    while True:
        with transaction(engine) as session:
            row = session.execute(PRUNE_BATCH, {"cutoff": before, "after": after, "batch": batch}).one()
        if not row.deleted:
            return deleted, batches
        deleted, batches, after = deleted + row.deleted, batches + 1, row.last
        if progress and time.monotonic() - last_report >= PROGRESS_EVERY_S:
            progress(deleted, batches)
            last_report = time.monotonic()
