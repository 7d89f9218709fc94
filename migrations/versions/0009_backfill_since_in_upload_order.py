"""`landmarks backfill --since DATE` pages through its photos in upload order.

It paged through them by (user_id, photo_id), the other scopes' order, which no index of the photos uploaded
since DATE gives: each chunk of 500 either read all of the window's photos after the cursor and sorted them
(a bitmap scan of ``ix_photos_uploaded_at``) or walked the primary key past the photos outside the window.
Either way a chunk's cost grew with the table, and a job's with its square: up to 31 ms a chunk at 2 M photos
(a 7-day window), which at 200 M photos would be seconds a chunk and hours a job. In upload order a chunk
takes 3-4 ms at 2 M photos, whatever the window (measured by hand on a generated database on the 2-core
development machine, not by a repo command; tests/integration/test_backfill_jobs.py checks the photos each
chunk reads). backfill._next_photos says why it turns bitmap scans off.

* ``ix_photos_upload_order`` (uploaded_at, user_id, photo_id) replaces ``ix_photos_uploaded_at``: the count
  of the window still starts from the upload time, and a chunk is the next 500 entries from the cursor on.
* ``backfill_jobs.cursor_uploaded_at``: the cursor of a ``--since`` job. Such a job interrupted before this
  revision kept a (user, photo) cursor, which means nothing in upload order: it starts from the window's
  first photo again. Photos the active version has processed since are skipped; those still queued are sent
  again, which is harmless (the job's events carry fresh ids, and the verdict is the same).

The index is built CONCURRENTLY, outside the migration's transaction, as in 0008.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

NEW_INDEX, OLD_INDEX = "ix_photos_upload_order", "ix_photos_uploaded_at"
# Running --since jobs start over: their cursor belongs to the other order (see the docstring).
FORGET_SINCE_CURSORS = sa.text(
    "UPDATE backfill_jobs SET cursor_user_id = NULL, cursor_photo_id = NULL "
    "WHERE scope ? 'since' AND status = 'running'")


def upgrade() -> None:
    op.add_column("backfill_jobs", sa.Column(
        "cursor_uploaded_at", sa.DateTime(timezone=True),
        comment="Keyset cursor of a --since job: last enqueued photo's upload time"))
    op.execute(FORGET_SINCE_CURSORS)
    _replace_index(OLD_INDEX, NEW_INDEX, ["uploaded_at", "user_id", "photo_id"])


def downgrade() -> None:
    _replace_index(NEW_INDEX, OLD_INDEX, ["uploaded_at"])
    op.execute(FORGET_SINCE_CURSORS)
    op.drop_column("backfill_jobs", "cursor_uploaded_at")


def _replace_index(old: str, new: str, columns: list[str]) -> None:
    """Builds ``new`` before dropping ``old``, so that a --since count is never without an index."""
    with op.get_context().autocommit_block():
        _revision_0008()._drop_if_invalid(new, "photos")
        op.create_index(new, "photos", columns, postgresql_concurrently=True, if_not_exists=True)
        op.drop_index(old, table_name="photos", postgresql_concurrently=True, if_exists=True)


def _revision_0008() -> ModuleType:
    # Alembic loads revision files by path, not as a package: 0008 is loaded the same way (as 0008 loads 0003).
    spec = importlib.util.spec_from_file_location(
        "revision_0008", Path(__file__).with_name("0008_city_recount_and_time_indexes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
