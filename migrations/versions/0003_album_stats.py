"""Album summaries kept by triggers, so that ``album_landmarks`` and ``album_cities`` read a user's few
summary rows instead of aggregating all of the user's tags on every request.

* ``album_landmark_stats``: photo count, cover photo and latest upload per (user, version, landmark).
* ``album_city_stats``: landmark count, distinct photo count and latest upload per (user, version, city).
* Both are keyed by model version, so activating another version (promote, rollback) changes nothing
  in them: the views pick the active version's rows, as before.
* ``album_users``: one row per user, locked by every transaction that changes the user's summaries.
  The writer upserts a batch's photos in (user_id, photo_id) order, and a trigger on ``photos`` locks
  each user as its first photo goes by, before any of the user's tags change; so two batches lock users
  in the same order, and neither waits for the other while holding a user it needs. Tag statements
  that do not go through ``photos`` first (SQL by hand) lock their users in that same order.
* Statement-level triggers keep the summaries exact: new tags are added incrementally; deleted or
  updated tags, a photo deleted (or restored) or re-dated, and a landmark moved to another city recount
  the affected rows from ``photo_tags``.
* ``album_stats_rebuild()`` recomputes everything (here, and after a bulk load with the triggers off).

The views keep their names, columns and meaning (docs/albums.md).

Revision ID: 0003
Revises: 0002
Create Date: 2025-03-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
# Room on each page for the updated row version, so the frequent counter updates stay HOT.
FILLFACTOR = {"fillfactor": "80"}

ALBUM_LANDMARKS_0001 = """
SELECT a.user_id, a.landmark_id, l.name, l.city, l.country,
       count(*) AS photo_count,
       (array_agg(a.photo_id ORDER BY a.score DESC, a.uploaded_at DESC NULLS LAST, a.photo_id DESC))[1]
           AS cover_photo_id,
       max(a.uploaded_at) AS latest_uploaded_at
FROM album_photos a
JOIN landmarks l ON l.id = a.landmark_id
GROUP BY a.user_id, a.landmark_id, l.name, l.city, l.country
"""
ALBUM_CITIES_0001 = """
SELECT a.user_id, l.country, l.city,
       count(DISTINCT a.landmark_id) AS landmark_count,
       count(DISTINCT a.photo_id) AS photo_count,
       max(a.uploaded_at) AS latest_uploaded_at
FROM album_photos a
JOIN landmarks l ON l.id = a.landmark_id
GROUP BY a.user_id, l.country, l.city
"""
# OFFSET 0 keeps the landmark lookup a probe of pk_landmarks per album: joined plainly, the planner
# (random_page_cost = 4) hashes the whole landmarks table for a user's few albums, 2-6 ms at 10,000.
ALBUM_LANDMARKS_0003 = """
SELECT s.user_id, s.landmark_id, l.name, l.city, l.country, s.photo_count, s.cover_photo_id, s.latest_uploaded_at
FROM album_landmark_stats s
JOIN model_versions mv ON mv.version = s.model_version AND mv.is_active
CROSS JOIN LATERAL (SELECT l.name, l.city, l.country FROM landmarks l WHERE l.id = s.landmark_id OFFSET 0) l
"""
ALBUM_CITIES_0003 = """
SELECT c.user_id, c.country, c.city, c.landmark_count, c.photo_count, c.latest_uploaded_at
FROM album_city_stats c
JOIN model_versions mv ON mv.version = c.model_version AND mv.is_active
"""
VIEW_COMMENTS_0001 = {
    "album_landmarks": "Album service interface: one album per (user, landmark) of the active model version. "
                       "cover_photo_id = the photo with the highest score (ties: newest upload).",
    "album_cities": "Album service interface: the Attractions album's top level, one row per (user, country, city). "
                    "photo_count counts distinct photos (a photo of two landmarks in one city counts once).",
}
VIEW_COMMENTS_0003 = {
    view: f"{comment} Reads {table} (kept by triggers)."
    for (view, comment), table in zip(VIEW_COMMENTS_0001.items(), ("album_landmark_stats", "album_city_stats"))
}

# Keys travel between the functions as parallel arrays: (users, versions, landmark_ids) for albums,
# (users, versions, countries, cities) for cities.
FUNCTIONS = {
    "album_stats_lock_users(text[])": r"""
CREATE FUNCTION album_stats_lock_users(users text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- One statement, in byte order (the writer's Python sort order); a user this transaction already
    -- locked is passed over without waiting.
    INSERT INTO album_users AS u (user_id)
    SELECT user_id FROM (SELECT DISTINCT user_id FROM unnest(users) AS k(user_id)) k
    ORDER BY user_id COLLATE "C"
    ON CONFLICT (user_id) DO UPDATE SET changed_at = now();
END
$$""",
    "album_stats_lock_photo_owner()": r"""
CREATE FUNCTION album_stats_lock_photo_owner() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    owner text := CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END;
BEGIN
    -- Fires per row, in the order of the statement's rows: the writer's batches lock users in order.
    -- Its rows come sorted, so remembering the last user locked (until the transaction, or the
    -- savepoint that took the lock, ends) skips most calls.
    IF current_setting('landmarks.album_user_locked', true) IS DISTINCT FROM owner THEN
        PERFORM album_stats_lock_users(ARRAY[owner]);
        PERFORM set_config('landmarks.album_user_locked', owner, true);
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$""",
    "album_stats_recount_cities(text[], text[], text[], text[])": r"""
CREATE FUNCTION album_stats_recount_cities(users text[], versions text[], countries text[], cities text[])
RETURNS void LANGUAGE sql AS $$
WITH counted AS (
    SELECT k.user_id, k.model_version, k.country, k.city, a.landmark_count, coalesce(b.photo_count, 0) AS photo_count,
           a.latest_uploaded_at
    FROM (SELECT DISTINCT * FROM unnest(users, versions, countries, cities)) AS k(user_id, model_version, country, city)
    CROSS JOIN LATERAL (
        SELECT count(*) AS landmark_count, max(s.latest_uploaded_at) AS latest_uploaded_at,
               array_agg(s.landmark_id) AS landmark_ids
        FROM album_landmark_stats s
        JOIN landmarks l ON l.id = s.landmark_id
        WHERE s.user_id = k.user_id AND s.model_version = k.model_version AND l.country = k.country AND l.city = k.city
    ) a
    CROSS JOIN LATERAL (
        -- A photo of two landmarks of the city counts once.
        SELECT count(DISTINCT t.photo_id) AS photo_count
        FROM photo_tags t
        JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
        WHERE t.user_id = k.user_id AND t.model_version = k.model_version AND t.landmark_id = ANY (a.landmark_ids)
          AND p.status <> 'deleted'
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
$$""",
    "album_stats_recount(text[], text[], bigint[])": r"""
CREATE FUNCTION album_stats_recount(users text[], versions text[], landmark_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    city_users text[];
    city_versions text[];
    city_countries text[];
    city_names text[];
BEGIN
    -- Counted after the lock, so (READ COMMITTED) the counts include every writer that held it before.
    PERFORM album_stats_lock_users(users);
    WITH counted AS (
        SELECT k.user_id, k.model_version, k.landmark_id, a.photo_count, a.cover_photo_id, a.latest_uploaded_at
        FROM (SELECT DISTINCT * FROM unnest(users, versions, landmark_ids)) AS k(user_id, model_version, landmark_id)
        CROSS JOIN LATERAL (
            SELECT count(*) AS photo_count,
                   (array_agg(t.photo_id ORDER BY t.score DESC, p.uploaded_at DESC NULLS LAST, t.photo_id DESC))[1]
                       AS cover_photo_id,
                   max(p.uploaded_at) AS latest_uploaded_at
            FROM photo_tags t
            JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
            WHERE t.user_id = k.user_id AND t.landmark_id = k.landmark_id AND t.model_version = k.model_version
              AND p.status <> 'deleted'
        ) a
    ),
    emptied AS (
        DELETE FROM album_landmark_stats s
        USING counted k
        WHERE (s.user_id, s.model_version, s.landmark_id) = (k.user_id, k.model_version, k.landmark_id)
          AND k.photo_count = 0
    )
    INSERT INTO album_landmark_stats AS s
        (user_id, model_version, landmark_id, photo_count, cover_photo_id, latest_uploaded_at)
    SELECT user_id, model_version, landmark_id, photo_count, cover_photo_id, latest_uploaded_at
    FROM counted
    WHERE photo_count > 0
    ORDER BY 1, 2, 3
    ON CONFLICT (user_id, model_version, landmark_id) DO UPDATE
    SET photo_count = EXCLUDED.photo_count, cover_photo_id = EXCLUDED.cover_photo_id,
        latest_uploaded_at = EXCLUDED.latest_uploaded_at;

    -- Then the cities of those albums, from the albums just counted.
    SELECT array_agg(user_id), array_agg(model_version), array_agg(country), array_agg(city)
    INTO city_users, city_versions, city_countries, city_names
    FROM (SELECT DISTINCT k.user_id, k.model_version, l.country, l.city
          FROM unnest(users, versions, landmark_ids) AS k(user_id, model_version, landmark_id)
          JOIN landmarks l ON l.id = k.landmark_id) c;
    PERFORM album_stats_recount_cities(city_users, city_versions, city_countries, city_names);
END
$$""",
    "album_stats_tags_inserted()": r"""
CREATE FUNCTION album_stats_tags_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    users text[];
BEGIN
    SELECT array_agg(DISTINCT user_id) INTO users FROM new_tags;
    IF users IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM album_stats_lock_users(users);

    -- New tags only add: counts grow, and the latest upload and the cover can only move to a new photo.
    -- No CTE joins another CTE, so a bulk insert of millions of tags stays linear.
    WITH fresh AS (  -- the new tags that show: their photo is not deleted
        SELECT n.user_id, n.model_version, n.landmark_id, n.photo_id, n.score, p.uploaded_at, l.country, l.city
        FROM new_tags n
        JOIN photos p ON p.user_id = n.user_id AND p.photo_id = n.photo_id
        JOIN landmarks l ON l.id = n.landmark_id
        WHERE p.status <> 'deleted'
    ),
    added AS (  -- per album: how many new photos, the newest upload, and the best new photo
        SELECT DISTINCT ON (user_id, model_version, landmark_id)
               user_id, model_version, landmark_id, country, city,
               count(*) OVER album AS photo_count, max(uploaded_at) OVER album AS latest_uploaded_at,
               photo_id AS best_photo_id, score AS best_score, uploaded_at AS best_uploaded_at
        FROM fresh
        WINDOW album AS (PARTITION BY user_id, model_version, landmark_id)
        ORDER BY user_id, model_version, landmark_id, score DESC, uploaded_at DESC NULLS LAST, photo_id DESC
    ),
    by_landmark AS (  -- read under the users' locks: nobody else changes their summaries meanwhile
        SELECT a.user_id, a.model_version, a.landmark_id, a.country, a.city, a.photo_count, a.latest_uploaded_at,
               s.user_id IS NULL AS opened,
               (SELECT c.photo_id
                FROM (VALUES (a.best_photo_id, a.best_score, a.best_uploaded_at),
                             (s.cover_photo_id, t.score, p.uploaded_at)) AS c(photo_id, score, uploaded_at)
                WHERE c.score IS NOT NULL
                ORDER BY c.score DESC, c.uploaded_at DESC NULLS LAST, c.photo_id DESC
                LIMIT 1) AS cover_photo_id
        FROM added a
        LEFT JOIN album_landmark_stats s
               ON s.user_id = a.user_id AND s.model_version = a.model_version AND s.landmark_id = a.landmark_id
        LEFT JOIN photo_tags t
               ON t.user_id = s.user_id AND t.photo_id = s.cover_photo_id
              AND t.model_version = s.model_version AND t.landmark_id = s.landmark_id
        LEFT JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
    ),
    merged AS (
        INSERT INTO album_landmark_stats AS s
            (user_id, model_version, landmark_id, photo_count, cover_photo_id, latest_uploaded_at)
        SELECT user_id, model_version, landmark_id, photo_count, cover_photo_id, latest_uploaded_at
        FROM by_landmark
        ORDER BY 1, 2, 3
        ON CONFLICT (user_id, model_version, landmark_id) DO UPDATE
        SET photo_count = s.photo_count + EXCLUDED.photo_count,
            latest_uploaded_at = greatest(s.latest_uploaded_at, EXCLUDED.latest_uploaded_at),
            cover_photo_id = EXCLUDED.cover_photo_id
    ),
    photo_cities AS (
        SELECT user_id, model_version, country, city, photo_id, count(*) AS new_tags
        FROM fresh
        GROUP BY user_id, model_version, country, city, photo_id
    ),
    city_deltas AS (
        SELECT user_id, model_version, country, city, opened::int AS landmarks, 0 AS photos, latest_uploaded_at
        FROM by_landmark
        UNION ALL
        -- A photo counts once more in its city only if all its tags of the city are new.
        SELECT user_id, model_version, country, city, 0, 1, NULL
        FROM photo_cities pc
        WHERE pc.new_tags = (SELECT count(*)
                             FROM photo_tags t
                             JOIN landmarks l ON l.id = t.landmark_id
                             WHERE t.user_id = pc.user_id AND t.photo_id = pc.photo_id
                               AND t.model_version = pc.model_version AND l.country = pc.country AND l.city = pc.city)
    )
    INSERT INTO album_city_stats AS c
        (user_id, model_version, country, city, landmark_count, photo_count, latest_uploaded_at)
    SELECT user_id, model_version, country, city, sum(landmarks), sum(photos), max(latest_uploaded_at)
    FROM city_deltas
    GROUP BY user_id, model_version, country, city
    ORDER BY 1, 2, 3, 4
    ON CONFLICT (user_id, model_version, country, city) DO UPDATE
    SET landmark_count = c.landmark_count + EXCLUDED.landmark_count,
        photo_count = c.photo_count + EXCLUDED.photo_count,
        latest_uploaded_at = greatest(c.latest_uploaded_at, EXCLUDED.latest_uploaded_at);
    RETURN NULL;
END
$$""",
    "album_stats_tags_deleted()": r"""
CREATE FUNCTION album_stats_tags_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    users text[];
    versions text[];
    landmark_ids bigint[];
BEGIN
    -- A removed tag may have been the cover or the latest photo: recount, rather than subtract.
    SELECT array_agg(user_id), array_agg(model_version), array_agg(landmark_id)
    INTO users, versions, landmark_ids
    FROM (SELECT DISTINCT user_id, model_version, landmark_id FROM old_tags) k;
    IF users IS NOT NULL THEN
        PERFORM album_stats_recount(users, versions, landmark_ids);
    END IF;
    RETURN NULL;
END
$$""",
    "album_stats_tags_updated()": r"""
CREATE FUNCTION album_stats_tags_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    users text[];
    versions text[];
    landmark_ids bigint[];
BEGIN
    -- The writer never updates tags; SQL by hand may change a score or move a tag.
    SELECT array_agg(user_id), array_agg(model_version), array_agg(landmark_id)
    INTO users, versions, landmark_ids
    FROM (SELECT user_id, model_version, landmark_id FROM old_tags
          UNION
          SELECT user_id, model_version, landmark_id FROM new_tags) k;
    IF users IS NOT NULL THEN
        PERFORM album_stats_recount(users, versions, landmark_ids);
    END IF;
    RETURN NULL;
END
$$""",
    "album_stats_photos_updated()": r"""
CREATE FUNCTION album_stats_photos_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    users text[];
    versions text[];
    landmark_ids bigint[];
BEGIN
    -- Only a photo that is deleted or restored, or whose upload time changes, changes its albums.
    SELECT array_agg(user_id), array_agg(model_version), array_agg(landmark_id)
    INTO users, versions, landmark_ids
    FROM (SELECT DISTINCT t.user_id, t.model_version, t.landmark_id
          FROM old_photos o
          JOIN new_photos n ON n.user_id = o.user_id AND n.photo_id = o.photo_id
          JOIN photo_tags t ON t.user_id = n.user_id AND t.photo_id = n.photo_id
          WHERE (o.status = 'deleted') <> (n.status = 'deleted') OR o.uploaded_at IS DISTINCT FROM n.uploaded_at) k;
    IF users IS NOT NULL THEN
        PERFORM album_stats_recount(users, versions, landmark_ids);
    END IF;
    RETURN NULL;
END
$$""",
    "album_stats_landmarks_moved()": r"""
CREATE FUNCTION album_stats_landmarks_moved() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    users text[];
    versions text[];
    countries text[];
    cities text[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_landmarks o JOIN new_landmarks n ON n.id = o.id
                   WHERE (o.country, o.city) IS DISTINCT FROM (n.country, n.city)) THEN
        RETURN NULL;
    END IF;
    -- A catalogue fix, rare: wait for the writers in flight (they counted the landmark in its old city)
    -- and hold off new ones, then recount both cities of every album of a moved landmark.
    LOCK TABLE photo_tags, photos IN SHARE MODE;
    SELECT array_agg(user_id), array_agg(model_version), array_agg(country), array_agg(city)
    INTO users, versions, countries, cities
    FROM (SELECT s.user_id, s.model_version, o.country, o.city
          FROM old_landmarks o JOIN album_landmark_stats s ON s.landmark_id = o.id
          UNION
          SELECT s.user_id, s.model_version, n.country, n.city
          FROM new_landmarks n JOIN album_landmark_stats s ON s.landmark_id = n.id) k;
    IF users IS NOT NULL THEN
        PERFORM album_stats_recount_cities(users, versions, countries, cities);
    END IF;
    RETURN NULL;
END
$$""",
    "album_stats_truncated()": r"""
CREATE FUNCTION album_stats_truncated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    TRUNCATE album_landmark_stats, album_city_stats;
    RETURN NULL;
END
$$""",
    "album_stats_rebuild()": r"""
CREATE FUNCTION album_stats_rebuild() RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    -- Writers wait until the rebuild commits, so none changes a tag it has not summarised.
    LOCK TABLE photo_tags, photos, landmarks IN SHARE MODE;
    TRUNCATE album_landmark_stats, album_city_stats;
    INSERT INTO album_landmark_stats
        (user_id, model_version, landmark_id, photo_count, cover_photo_id, latest_uploaded_at)
    SELECT t.user_id, t.model_version, t.landmark_id, count(*),
           (array_agg(t.photo_id ORDER BY t.score DESC, p.uploaded_at DESC NULLS LAST, t.photo_id DESC))[1],
           max(p.uploaded_at)
    FROM photo_tags t
    JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
    WHERE p.status <> 'deleted'
    GROUP BY t.user_id, t.model_version, t.landmark_id
    ORDER BY 1, 2, 3;
    INSERT INTO album_city_stats
        (user_id, model_version, country, city, landmark_count, photo_count, latest_uploaded_at)
    SELECT t.user_id, t.model_version, l.country, l.city,
           count(DISTINCT t.landmark_id), count(DISTINCT t.photo_id), max(p.uploaded_at)
    FROM photo_tags t
    JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
    JOIN landmarks l ON l.id = t.landmark_id
    WHERE p.status <> 'deleted'
    GROUP BY t.user_id, t.model_version, l.country, l.city
    ORDER BY 1, 2, 3, 4;
END
$$""",
}

# (name, table, definition)
TRIGGERS = [
    # Before any tag of the photo changes: the writer's photo upsert comes first in its transaction.
    ("album_stats_lock_on_photo_insert", "photos",
     "BEFORE INSERT ON photos FOR EACH ROW WHEN (NEW.status IN ('tagged', 'deleted'))"
     " EXECUTE FUNCTION album_stats_lock_photo_owner()"),
    ("album_stats_lock_on_photo_change", "photos",
     "BEFORE UPDATE OR DELETE ON photos FOR EACH ROW EXECUTE FUNCTION album_stats_lock_photo_owner()"),
    ("album_stats_tags_inserted", "photo_tags",
     "AFTER INSERT ON photo_tags REFERENCING NEW TABLE AS new_tags FOR EACH STATEMENT"
     " EXECUTE FUNCTION album_stats_tags_inserted()"),
    ("album_stats_tags_deleted", "photo_tags",
     "AFTER DELETE ON photo_tags REFERENCING OLD TABLE AS old_tags FOR EACH STATEMENT"
     " EXECUTE FUNCTION album_stats_tags_deleted()"),
    ("album_stats_tags_updated", "photo_tags",
     "AFTER UPDATE ON photo_tags REFERENCING OLD TABLE AS old_tags NEW TABLE AS new_tags FOR EACH STATEMENT"
     " EXECUTE FUNCTION album_stats_tags_updated()"),
    ("album_stats_photos_updated", "photos",
     "AFTER UPDATE ON photos REFERENCING OLD TABLE AS old_photos NEW TABLE AS new_photos FOR EACH STATEMENT"
     " EXECUTE FUNCTION album_stats_photos_updated()"),
    ("album_stats_landmarks_moved", "landmarks",
     "AFTER UPDATE ON landmarks REFERENCING OLD TABLE AS old_landmarks NEW TABLE AS new_landmarks"
     " FOR EACH STATEMENT EXECUTE FUNCTION album_stats_landmarks_moved()"),
    ("album_stats_tags_truncated", "photo_tags",
     "AFTER TRUNCATE ON photo_tags FOR EACH STATEMENT EXECUTE FUNCTION album_stats_truncated()"),
    ("album_stats_photos_truncated", "photos",
     "AFTER TRUNCATE ON photos FOR EACH STATEMENT EXECUTE FUNCTION album_stats_truncated()"),
]


def upgrade() -> None:
    op.create_table(
        "album_users",
        sa.Column("user_id", sa.Text(), nullable=False, comment="Owner"),
        sa.Column("changed_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False,
                  comment="When a transaction last locked it to change the user's albums"),
        sa.PrimaryKeyConstraint("user_id", name="pk_album_users"),
        comment="One row per user with albums: locked, in user order, by every transaction that changes "
                "the user's album summaries.",
        postgresql_with=FILLFACTOR,
    )
    op.create_table(
        "album_landmark_stats",
        sa.Column("user_id", sa.Text(), nullable=False, comment="Owner"),
        sa.Column("model_version", sa.Text(), nullable=False, comment="Model version whose tags are summarised"),
        sa.Column("landmark_id", sa.BigInteger(), nullable=False, comment="Landmark of the album"),
        sa.Column("photo_count", sa.BigInteger(), nullable=False, comment="Photos in the album that are not deleted"),
        sa.Column("cover_photo_id", sa.Text(), nullable=False,
                  comment="Highest score, then newest upload, then highest photo_id"),
        sa.Column("latest_uploaded_at", TIMESTAMPTZ, nullable=True, comment="Newest upload in the album"),
        sa.PrimaryKeyConstraint("user_id", "model_version", "landmark_id", name="pk_album_landmark_stats"),
        comment="Summary of each (user, model version, landmark) album, kept by triggers; read by album_landmarks.",
        postgresql_with=FILLFACTOR,
    )
    op.create_table(
        "album_city_stats",
        sa.Column("user_id", sa.Text(), nullable=False, comment="Owner"),
        sa.Column("model_version", sa.Text(), nullable=False, comment="Model version whose tags are summarised"),
        sa.Column("country", sa.Text(), nullable=False, comment="Country of the city"),
        sa.Column("city", sa.Text(), nullable=False, comment="City (landmarks.city)"),
        sa.Column("landmark_count", sa.BigInteger(), nullable=False, comment="Landmarks of the city with photos"),
        sa.Column("photo_count", sa.BigInteger(), nullable=False,
                  comment="Distinct photos of the city that are not deleted"),
        sa.Column("latest_uploaded_at", TIMESTAMPTZ, nullable=True, comment="Newest upload in the city"),
        sa.PrimaryKeyConstraint("user_id", "model_version", "country", "city", name="pk_album_city_stats"),
        comment="Summary of each (user, model version, city), kept by triggers; read by album_cities.",
        postgresql_with=FILLFACTOR,
    )
    for sql in FUNCTIONS.values():
        op.execute(sql)
    for name, _table, definition in TRIGGERS:
        op.execute(f"CREATE TRIGGER {name} {definition}")
    # Summarise the tags already there. Bounded by the size of photo_tags, not by lock waits (lock_timeout
    # still guards those), so the statement timeout would only turn a long rebuild into a failed upgrade.
    op.execute("SET LOCAL statement_timeout = 0")
    op.execute("SELECT album_stats_rebuild()")
    _replace_views(ALBUM_LANDMARKS_0003, ALBUM_CITIES_0003, VIEW_COMMENTS_0003)


def _replace_views(landmarks: str, cities: str, comments: dict[str, str]) -> None:
    op.execute(f"CREATE OR REPLACE VIEW album_landmarks AS {landmarks.strip()}")
    op.execute(f"CREATE OR REPLACE VIEW album_cities AS {cities.strip()}")
    for view, comment in comments.items():
        op.execute(sa.text(f"COMMENT ON VIEW {view} IS " + _quote(comment)))


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def downgrade() -> None:
    _replace_views(ALBUM_LANDMARKS_0001, ALBUM_CITIES_0001, VIEW_COMMENTS_0001)
    for name, table, _definition in reversed(TRIGGERS):
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    for signature in reversed(FUNCTIONS):
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
    op.drop_table("album_city_stats")
    op.drop_table("album_landmark_stats")
    op.drop_table("album_users")
