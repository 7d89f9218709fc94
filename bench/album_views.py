"""Album-view benchmark: bulk-load synthetic tags, then time the album service's queries.

    .venv/bin/python bench/album_views.py --database-url postgresql://postgres@127.0.0.1:5432/postgres \
        --scratch --users 100000 --tags 10000000

Loads `--tags` photo_tags rows (one photo in ten carries a second landmark) spread over `--users`
users with a skewed distribution (user k owns a share proportional to 1/k^(1-1/skew), so a few heavy
users have tens of thousands of landmark photos and the median user has ~70 at the defaults), all
generated in SQL with generate_series. Rows are inserted in upload order, not clustered by user, as
a live table is. The album summaries (migration 0003) are built by the same triggers the writer
fires: tags go in with `--chunk` rows per committed statement, so a user's summary rows are spread
over the table as in a live one. `--stats rebuild` instead loads with the summary triggers off and
calls album_stats_rebuild(), as the migration does for existing tags. `--verify` users (random, with
albums) are then checked: their album views must equal the aggregates the views replaced.

Then, for `--samples` random users that have an album, it times through
shared.db.albums (what the API runs, client round trip included):

- attractions: the user's Attractions page (album_landmarks + album_cities);
- landmark_page: the first 50 photos of the user's biggest landmark album (album_photos, keyset);
- next_page: the page after it, by cursor (only users whose biggest album has more than 50 photos);
- big_album_page / big_album_next_page: the same two on random albums that have a second page.

Prints one JSON line: sizes, load time, and p50/p99/max in ms per query (plus the heaviest user).
`--scratch` creates a fresh database on the server of --database-url, migrates it to head and drops
it at the end (`--keep` keeps it); without it the database must be migrated and have no tags yet.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from shared.db import albums, migrate  # noqa: E402
from shared.db.session import make_engine  # noqa: E402

VERSION = "bench_v1"
PAGE = 50


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="PostgreSQL URL (the server's, with --scratch)")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--tags", type=int, default=10_000_000)
    parser.add_argument("--landmarks", type=int, default=10_000)
    parser.add_argument("--skew", type=float, default=2.0, help="user = floor(users * random()^skew); 1 = uniform")
    parser.add_argument("--samples", type=int, default=1000, help="random users timed per query")
    parser.add_argument("--seed", type=float, default=0.42)
    parser.add_argument("--stats", choices=("trigger", "rebuild"), default="trigger",
                        help="build the album summaries by the triggers (default) or by album_stats_rebuild()")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="tags per statement with --stats trigger")
    parser.add_argument("--verify", type=int, default=200, help="random users whose albums are checked")
    parser.add_argument("--scratch", action="store_true", help="create a fresh database, drop it at the end")
    parser.add_argument("--keep", action="store_true", help="with --scratch: do not drop the database")
    parser.add_argument("--reuse", action="store_true", help="skip loading: time an already loaded database")
    parser.add_argument("--explain", action="store_true", help="print the query plans to stderr")
    parser.add_argument("--random-page-cost", type=float, default=None,
                        help="planner setting for the timed queries (1.1 suits SSDs; the server default is 4)")
    args = parser.parse_args(argv)

    admin, url = None, args.database_url
    if args.scratch:
        admin = make_engine(args.database_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        name = f"lm_bench_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        _log(f"scratch database {name}")
    try:
        migrate.upgrade(url)
        options = {}
        if args.random_page_cost is not None:
            options["connect_args"] = {"options": f"-c random_page_cost={args.random_page_cost:g}"}
        engine = make_engine(url, pool_size=2, **options)
        result: dict = {"users": args.users, "tags": args.tags, "landmarks": args.landmarks, "skew": args.skew,
                        "random_page_cost": args.random_page_cost}
        if not args.reuse:
            result["load_s"] = round(load(engine, args), 1)
        result.update(sizes(engine))
        result["verified_users"] = verify(engine, args)
        if args.explain:
            explain(engine)
        result.update(measure(engine, args))
        engine.dispose()
        print(json.dumps(result))
    finally:
        if admin is not None:
            if not args.keep:
                with admin.connect() as conn:
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    return 0


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# Triggers of migration 0003 that lock a photo's owner: they order concurrent writers, and the bulk
# load is the only writer, so its millions of photo rows skip them.
OWNER_LOCKS = ("album_stats_lock_on_photo_insert", "album_stats_lock_on_photo_change")
SUMMARY_TRIGGERS = {"photos": (*OWNER_LOCKS, "album_stats_photos_updated"),
                    "photo_tags": ("album_stats_tags_inserted", "album_stats_tags_deleted", "album_stats_tags_updated")}


def load(engine: sa.Engine, args: argparse.Namespace) -> float:
    n_photos = max(1, round(args.tags / 1.1))  # every 10th photo has a second tag
    params = {"users": args.users, "photos": n_photos, "landmarks": args.landmarks, "skew": args.skew,
              "cities": max(1, args.landmarks // 10), "countries": max(1, args.landmarks // 100), "v": VERSION}
    start = time.perf_counter()
    with engine.connect() as conn:
        with conn.begin():
            _load_photos(conn, args, params)
        # Committed chunks in upload order: the summary triggers see a live table's stream of batches.
        step = max(1, round(args.chunk / 1.1)) if args.stats == "trigger" else n_photos
        for first in range(1, n_photos + 1, step):
            with conn.begin():
                _bulk_session(conn)
                _insert_tags(conn, {**params, "first": first, "last": first + step - 1})
            _log(f"tags of photos {first}..{min(first + step - 1, n_photos)} loaded "
                 f"({time.perf_counter() - start:.0f} s)")
        with conn.begin():
            if args.stats == "rebuild":
                _bulk_session(conn)
                conn.execute(sa.text("SELECT album_stats_rebuild()"))
                _set_triggers(conn, sum(SUMMARY_TRIGGERS.values(), ()), enabled=True)
            conn.execute(sa.text("DROP TABLE bench_src"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("photos", "photo_tags", "album_landmark_stats", "album_city_stats", "album_users"):
            conn.execute(sa.text(f"VACUUM ANALYZE {table}"))
        conn.execute(sa.text("ANALYZE landmarks"))
        conn.execute(sa.text("ANALYZE model_versions"))
    elapsed = time.perf_counter() - start
    _log(f"loaded in {elapsed:.1f} s")
    return elapsed


def _load_photos(conn: sa.Connection, args: argparse.Namespace, params: dict) -> None:
    if conn.scalar(sa.text("SELECT EXISTS (SELECT 1 FROM photo_tags)")):
        raise SystemExit("the database already has tags: use --scratch (or --reuse to time it as it is)")
    _bulk_session(conn)
    conn.execute(sa.text("SELECT setseed(:seed)"), {"seed": args.seed})
    conn.execute(sa.text(
        "INSERT INTO model_versions (version, is_active, backbone, embedding_dim, t_geo, t_global, t_ref, checkpoint)"
        " VALUES (:v, true, 'tiny', 32, 0.5, 0.8, 0.7, 'bench.pt')"), params)
    conn.execute(sa.text(
        "INSERT INTO landmarks (id, name, city, country, region, lat, lon)"
        " SELECT i, 'Landmark ' || i, 'City ' || (i % :cities), 'Country ' || (i % :cities % :countries),"
        "        1 + i % 4, -60 + random() * 120, -180 + random() * 360"
        " FROM generate_series(0, :landmarks - 1) i"), params)
    _log(f"loading {params['photos']} photos")
    # Upload order: each user's rows are scattered over the heap, as in a live table.
    conn.execute(sa.text(
        "CREATE TEMP TABLE bench_src AS"
        " SELECT i, floor(:users * power(random(), :skew))::bigint AS u,"
        "        timestamptz '2015-01-01' + random() * interval '3650 days' AS ts,"
        "        floor(power(random(), 3) * 200)::bigint AS pick, random() AS score"
        " FROM generate_series(1, :photos) i"), params)
    off = OWNER_LOCKS if args.stats == "trigger" else sum(SUMMARY_TRIGGERS.values(), ())
    _set_triggers(conn, off, enabled=False)
    conn.execute(sa.text(
        "INSERT INTO photos (user_id, photo_id, uri, uploaded_at, status, model_version, processed_at)"
        " SELECT 'u' || u, 'p' || i, 'https://photos.example/u' || u || '/' || i || '.jpg', ts,"
        "        'tagged', :v, ts FROM bench_src"), params)
    _set_triggers(conn, OWNER_LOCKS, enabled=True)


def _bulk_session(conn: sa.Connection) -> None:
    conn.execute(sa.text("SET LOCAL synchronous_commit = off"))
    conn.execute(sa.text("SET LOCAL maintenance_work_mem = '512MB'"))
    conn.execute(sa.text("SET LOCAL work_mem = '256MB'"))


def _set_triggers(conn: sa.Connection, names: tuple[str, ...], *, enabled: bool) -> None:
    for table, triggers in SUMMARY_TRIGGERS.items():
        for name in triggers:
            if name in names:
                conn.execute(sa.text(f"ALTER TABLE {table} {'ENABLE' if enabled else 'DISABLE'} TRIGGER {name}"))


def _insert_tags(conn: sa.Connection, params: dict) -> None:
    # A user photographs a few landmarks a lot: landmark = user's home spot + a power-law offset.
    conn.execute(sa.text(
        "INSERT INTO photo_tags (user_id, photo_id, model_version, landmark_id, rank, score, method)"
        " SELECT 'u' || u, 'p' || i, :v, (u * 7919 + pick) % :landmarks, 0, 0.5 + score / 2,"
        "        CASE WHEN i % 2 = 0 THEN 'geo' ELSE 'reference' END"
        " FROM bench_src WHERE i BETWEEN :first AND :last"
        " UNION ALL"
        " SELECT 'u' || u, 'p' || i, :v, (u * 7919 + pick + 1) % :landmarks, 1, 0.5 + score / 4, 'geo'"
        " FROM bench_src WHERE i BETWEEN :first AND :last AND i % 10 = 0"), params)


# The views as they were before migration 0003: aggregates over album_photos at read time.
AGGREGATED = {
    "album_landmarks": (
        "SELECT a.user_id, a.landmark_id, l.name, l.city, l.country, count(*),"
        " (array_agg(a.photo_id ORDER BY a.score DESC, a.uploaded_at DESC NULLS LAST, a.photo_id DESC))[1],"
        " max(a.uploaded_at)"
        " FROM album_photos a JOIN landmarks l ON l.id = a.landmark_id WHERE a.user_id = :u"
        " GROUP BY a.user_id, a.landmark_id, l.name, l.city, l.country ORDER BY 2"),
    "album_cities": (
        "SELECT a.user_id, l.country, l.city, count(DISTINCT a.landmark_id), count(DISTINCT a.photo_id),"
        " max(a.uploaded_at)"
        " FROM album_photos a JOIN landmarks l ON l.id = a.landmark_id WHERE a.user_id = :u"
        " GROUP BY a.user_id, l.country, l.city ORDER BY 2, 3"),
}
SUMMARISED = {
    "album_landmarks": "SELECT * FROM album_landmarks WHERE user_id = :u ORDER BY 2",
    "album_cities": "SELECT * FROM album_cities WHERE user_id = :u ORDER BY 2, 3",
}


def verify(engine: sa.Engine, args: argparse.Namespace) -> int:
    """Checks the summaries of random users with albums against the aggregates; exits on a mismatch."""
    rng = random.Random(args.seed + 1)
    checked = 0
    with engine.connect() as conn:
        for _ in range(args.verify * 20):
            if checked == args.verify:
                break
            user = f"u{rng.randrange(args.users)}"
            views = {view: ([tuple(r) for r in conn.execute(sa.text(sql), {"u": user})],
                            [tuple(r) for r in conn.execute(sa.text(AGGREGATED[view]), {"u": user})])
                     for view, sql in SUMMARISED.items()}
            for view, (got, want) in views.items():
                if got != want:
                    raise SystemExit(f"{view} of {user} differs from its aggregate:\n{got[:5]}\n{want[:5]}")
            checked += bool(views["album_landmarks"][0])
    _log(f"album summaries of {checked} users match their tags")
    return checked


def sizes(engine: sa.Engine) -> dict:
    with engine.connect() as conn:
        tags = conn.scalar(sa.text("SELECT count(*) FROM photo_tags"))
        heaviest = conn.execute(sa.text(
            "SELECT user_id, count(*) FROM photo_tags GROUP BY user_id ORDER BY 2 DESC LIMIT 1")).one()
        per_user = conn.execute(sa.text(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY n), count(*) FROM"
            " (SELECT count(*) AS n FROM photo_tags GROUP BY user_id) s")).one()
        biggest_album = conn.scalar(sa.text(
            "SELECT max(n) FROM (SELECT count(*) AS n FROM photo_tags GROUP BY user_id, landmark_id) s"))
        summaries = {table: conn.execute(sa.text(
            f"SELECT count(*), pg_total_relation_size('{table}') / 1048576 FROM {table}")).one()
            for table in ("album_landmark_stats", "album_city_stats")}
    return {"tag_rows": tags, "users_with_tags": per_user[1], "median_tags_per_user": per_user[0],
            "heaviest_user": heaviest[0], "heaviest_user_tags": heaviest[1], "biggest_album": biggest_album,
            **{f"{table}_rows": n for table, (n, _) in summaries.items()},
            **{f"{table}_mb": mb for table, (_, mb) in summaries.items()}}


def explain(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        user = conn.scalar(sa.text("SELECT user_id FROM photo_tags GROUP BY user_id ORDER BY count(*) DESC LIMIT 1"))
        lm = conn.scalar(sa.text("SELECT landmark_id FROM photo_tags WHERE user_id = :u"
                                 " GROUP BY landmark_id ORDER BY count(*) DESC LIMIT 1"), {"u": user})
        queries = {
            "attractions (album_landmarks)": ("SELECT * FROM album_landmarks WHERE user_id = :u", {"u": user}),
            "attractions (album_cities)": ("SELECT * FROM album_cities WHERE user_id = :u", {"u": user}),
            "landmark page": ("SELECT photo_id, uri, uploaded_at FROM album_photos WHERE user_id = :u"
                              " AND landmark_id = :l ORDER BY uploaded_at DESC, photo_id DESC LIMIT 50",
                              {"u": user, "l": lm}),
        }
        for title, (sql, params) in queries.items():
            plan = conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS) " + sql), params).scalars().all()
            _log(f"{title} for the heaviest user {user}:\n  " + "\n  ".join(plan))


def _time(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return (time.perf_counter() - start) * 1000, out


def _stats(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 2), "p99_ms": round(p99, 2),
            "max_ms": round(ordered[-1], 2)}


def _one_user(session: Session, user: str) -> dict[str, float] | None:
    ms, cities = _time(lambda: albums.attractions(session, user))
    if not cities:
        return None
    out = {"attractions": ms}
    biggest = max((lm for c in cities for lm in c.landmarks), key=lambda lm: lm.photo_count)
    ms, page = _time(lambda: albums.landmark_photos(session, user, biggest.landmark_id, limit=PAGE))
    out["landmark_page"] = ms
    if len(page) == PAGE:
        ms, _ = _time(lambda: albums.landmark_photos(session, user, biggest.landmark_id, limit=PAGE,
                                                     after=page[-1].cursor))
        out["next_page"] = ms
    return out


def measure(engine: sa.Engine, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    timings: dict[str, list[float]] = {"attractions": [], "landmark_page": [], "next_page": [],
                                       "big_album_page": [], "big_album_next_page": []}
    with Session(engine) as session:
        for _ in range(20):  # warm the connection and the plan cache
            _one_user(session, f"u{rng.randrange(args.users)}")
        tried = 0
        while len(timings["attractions"]) < args.samples and tried < args.samples * 20:
            tried += 1
            got = _one_user(session, f"u{rng.randrange(args.users)}")
            session.rollback()
            for key, ms in (got or {}).items():
                timings[key].append(ms)
        # Few random users have a second page: time paging on albums that have one, too.
        big = session.execute(sa.text(
            "SELECT user_id, landmark_id FROM photo_tags GROUP BY 1, 2 HAVING count(*) > :n"), {"n": PAGE}).all()
        for user, landmark in rng.sample(big, min(len(big), args.samples)):
            ms, page = _time(lambda: albums.landmark_photos(session, user, landmark, limit=PAGE))
            timings["big_album_page"].append(ms)
            ms, _ = _time(lambda: albums.landmark_photos(session, user, landmark, limit=PAGE, after=page[-1].cursor))
            timings["big_album_next_page"].append(ms)
            session.rollback()
        heaviest = session.scalar(sa.text(
            "SELECT user_id FROM photo_tags GROUP BY user_id ORDER BY count(*) DESC LIMIT 1"))
        heavy = [_one_user(session, heaviest) or {} for _ in range(5)]
    result = {name: _stats(values) for name, values in timings.items()}
    result["albums_over_one_page"] = len(big)
    result["heaviest_user_ms"] = {k: round(statistics.median(h[k] for h in heavy), 2) for k in heavy[0]}
    return result


if __name__ == "__main__":
    raise SystemExit(main())
