"""Catalogue fixes and summary rebuilds lock ``photos`` before ``photo_tags``, as the tag writer does.

0003's ``album_stats_landmarks_moved()`` (a landmark moved to another city) and ``album_stats_rebuild()``
took ``LOCK TABLE photo_tags, photos``. A writer between its photo upsert (holding ``photos``) and its tag
statements (wanting ``photo_tags``) then deadlocked with them, and under steady traffic some writer almost
always is: the catalogue fix was the transaction PostgreSQL aborted. In the writer's order, the lock waits
for the writers in flight and holds off new ones, as 0003 meant.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# 0003's text is frozen: the functions here are 0003's, with the lock statements in the writer's order.
LOCKS_0003_TO_0005 = {
    "LOCK TABLE photo_tags, photos IN SHARE MODE": "LOCK TABLE photos, photo_tags IN SHARE MODE",
    "LOCK TABLE photo_tags, photos, landmarks IN SHARE MODE": "LOCK TABLE photos, photo_tags, landmarks IN SHARE MODE",
}
FUNCTIONS = ("album_stats_landmarks_moved()", "album_stats_rebuild()")


def _definitions(locks: dict[str, str]) -> list[str]:
    """0003's definitions of FUNCTIONS, each lock statement replaced as ``locks`` says."""
    out = []
    for signature in FUNCTIONS:
        sql = _album_stats_0003().FUNCTIONS[signature].replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
        for old, new in locks.items():
            sql = sql.replace(old, new)
        out.append(sql)
    return out


def _album_stats_0003() -> ModuleType:
    # Alembic loads revision files by path, not as a package: 0003 is loaded the same way.
    spec = importlib.util.spec_from_file_location("album_stats_0003", Path(__file__).with_name("0003_album_stats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    for sql in _definitions(LOCKS_0003_TO_0005):
        op.execute(sql)


def downgrade() -> None:
    for sql in _definitions({}):
        op.execute(sql)
