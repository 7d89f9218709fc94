"""A city recount that reads the city's albums only; indexes for backfills by upload time and for pruning
the ``processed_events`` ledger.

* ``album_stats_recount_cities()`` (0003) found a city's albums among all of the user's albums, and
  counted its photos among all of the user's tags of the version, once per city touched, under the user's
  ``album_users`` lock: at 3 M photos, a batch re-tagging 64 photos of the heaviest user (11,000 tags,
  740 cities) took 133 ms. It now starts from the city's landmarks (``ix_landmarks_city``), probes the
  user's album of each (``pk_album_landmark_stats``) and reads each album's tags (``ix_photo_tags_album``):
  46 ms. The counts are the same: a photo of two landmarks of the city still counts once.
* ``ix_photos_uploaded_at``: `landmarks backfill --since DATE` counts and pages through the photos uploaded
  since DATE; without it every chunk read the whole table (0.6-2 s a chunk at 3 M photos).
* ``ix_processed_events_processed_at``, a BRIN index: `landmarks prune-ledger` finds the events older than
  its window. The ledger is appended to in time order, so a BRIN index (a few pages) finds them as well as
  a B-tree would, without a B-tree's insert on every event the writer claims. (Once pruned, new events
  refill the freed pages and those block ranges' summaries widen; the prune reads them again, in a table
  its window now bounds.) ``failures`` gets none: dead letters are kept (support's evidence, and
  `landmarks backfill --failed` compares their ``created_at``).

The indexes are built CONCURRENTLY, outside the migration's transaction (as 0007), so that writers go on
meanwhile, and without the lock and statement timeouts of migrations/env.py, which a large ``photos`` or
``processed_events`` would outlast. The function is replaced first, inside the transaction.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

RECOUNT_CITIES = "album_stats_recount_cities(text[], text[], text[], text[])"

# The planner estimates every user at the average user's tags and albums (the keys arrive as arrays), so
# for a heavy user it picked the plans that read all of the user's rows. Hence:
# * OFFSET 0 in each LATERAL: one probe per landmark, of pk_album_landmark_stats and of ix_photo_tags_album,
#   instead of the user's albums or tags joined whole and filtered;
# * enable_indexonlyscan off: else it reads each landmark's tags by an index-only scan of pk_photo_tags
#   (user_id, photo_id, model_version, landmark_id), whose only bound column is user_id, that is the
#   user's whole slice of the index once per landmark. Nothing else here could be index-only: each
#   other scan reads a column its index lacks.
RECOUNT_CITIES_0008 = r"""
CREATE OR REPLACE FUNCTION album_stats_recount_cities(users text[], versions text[], countries text[], cities text[])
RETURNS void LANGUAGE sql SET enable_indexonlyscan = off AS $$
WITH counted AS (
    SELECT k.user_id, k.model_version, k.country, k.city, a.landmark_count, coalesce(b.photo_count, 0) AS photo_count,
           a.latest_uploaded_at
    FROM (SELECT DISTINCT * FROM unnest(users, versions, countries, cities)) AS k(user_id, model_version, country, city)
    CROSS JOIN LATERAL (
        -- The city's landmarks first (ix_landmarks_city), then the user's album of each.
        SELECT count(*) AS landmark_count, max(s.latest_uploaded_at) AS latest_uploaded_at,
               array_agg(s.landmark_id) AS landmark_ids
        FROM landmarks l
        CROSS JOIN LATERAL (SELECT s.landmark_id, s.latest_uploaded_at FROM album_landmark_stats s
                            WHERE s.user_id = k.user_id AND s.model_version = k.model_version AND s.landmark_id = l.id
                            OFFSET 0) s
        WHERE l.country = k.country AND l.city = k.city
    ) a
    CROSS JOIN LATERAL (
        -- A photo of two landmarks of the city counts once.
        SELECT count(DISTINCT t.photo_id) AS photo_count
        FROM unnest(a.landmark_ids) AS lm(id)
        CROSS JOIN LATERAL (SELECT t.user_id, t.photo_id FROM photo_tags t
                            WHERE t.user_id = k.user_id AND t.landmark_id = lm.id AND t.model_version = k.model_version
                            OFFSET 0) t
        JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
        WHERE p.status <> 'deleted'
    ) b
),
emptied AS (
    DELETE FROM album_city_stats c
    USING counted k
    WHERE (c.user_id, c.model_version, c.country, c.city) = (k.user_id, k.model_version, k.country, k.city)
      AND k.photo_count = 0
)
INSERT INTO album_city_stats AS c
    (user_id, model_version, country, city, landmark_count, photo_count, latest_uploaded_at)
SELECT user_id, model_version, country, city, landmark_count, photo_count, latest_uploaded_at
FROM counted
WHERE photo_count > 0
ORDER BY 1, 2, 3, 4
ON CONFLICT (user_id, model_version, country, city) DO UPDATE
SET landmark_count = EXCLUDED.landmark_count, photo_count = EXCLUDED.photo_count,
    latest_uploaded_at = EXCLUDED.latest_uploaded_at
$$"""

# (name, table, columns, options), built in this order: the recount's index first.
INDEXES = [
    ("ix_landmarks_city", "landmarks", ["country", "city"], {}),
    ("ix_photos_uploaded_at", "photos", ["uploaded_at"], {}),
    # autosummarize: each block range is summarised once filled, so the newest events are not all left in
    # the unsummarised tail that every scan of the index reads.
    ("ix_processed_events_processed_at", "processed_events", ["processed_at"],
     {"postgresql_using": "brin", "postgresql_with": {"autosummarize": "on"}}),
]


def upgrade() -> None:
    op.execute(RECOUNT_CITIES_0008)
    with op.get_context().autocommit_block():
        for name, table, columns, options in INDEXES:
            _drop_if_invalid(name, table)
            op.create_index(name, table, columns, postgresql_concurrently=True, if_not_exists=True, **options)


def _drop_if_invalid(name: str, table: str) -> None:
    """An interrupted CONCURRENTLY build leaves an invalid index behind, which IF NOT EXISTS would keep."""
    invalid = op.get_bind().scalar(sa.text(
        "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"), {"name": name})
    if invalid:
        op.drop_index(name, table_name=table, postgresql_concurrently=True)


def downgrade() -> None:
    recount_0003 = _album_stats_0003().FUNCTIONS[RECOUNT_CITIES]
    op.execute(recount_0003.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
    with op.get_context().autocommit_block():
        for name, table, _columns, _options in reversed(INDEXES):
            op.drop_index(name, table_name=table, postgresql_concurrently=True, if_exists=True)


def _album_stats_0003() -> ModuleType:
    # Alembic loads revision files by path, not as a package: 0003 is loaded the same way (as 0005 does).
    spec = importlib.util.spec_from_file_location("album_stats_0003", Path(__file__).with_name("0003_album_stats.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
