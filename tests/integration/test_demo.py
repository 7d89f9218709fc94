"""`landmarks demo` (what `make demo` runs), whole: a world generated, a model built and published, every
archive photo sent through Redis to a real worker, the result and the demo user's album printed. Run on the
tiny preset, which is for tests (docs/dataset.md): its accuracy is no measure of the model, so none is
asserted; what is checked is what a user of the demo would notice, against the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from shared import stack
from shared.db.session import make_engine

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RESULT_KEYS = {"photos", "landmark_photos", "tagged_photos", "landmark_accuracy", "non_landmark_accuracy",
               "model_version", "users", "album_user", "world", "seconds"}


@pytest.fixture
def demo(empty_database, broker_url, tmp_path):
    """The demo run in a process of its own against the test PostgreSQL and Redis, with the embedded Milvus
    under a home of its own (stopped afterwards): (the process's result, the database's URL)."""
    home, queue = tmp_path / "home", f"lm_demo_{uuid.uuid4().hex[:8]}"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LANDMARKS_")},
           "LANDMARKS_HOME": str(home), "LANDMARKS_DATABASE_URL": empty_database, "LANDMARKS_BROKER_URL": broker_url,
           "LANDMARKS_QUEUE": queue, "LANDMARKS_METRICS_PORT": "0",  # the worker's: any free port
           "COLUMNS": "200"}  # the album table unwrapped
    try:
        done = subprocess.run([sys.executable, "-m", "shared.cli", "demo", "--preset", "tiny", "--json"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        yield done, empty_database
    finally:
        stack.down(home)
        _delete_queues(broker_url, [queue, f"{queue}_backfill"])


def _delete_queues(broker_url: str, queues: list[str]) -> None:
    client = redis.Redis.from_url(stack.redis_client_url(broker_url))
    client.delete(*[key for name in queues
                    for key in (name, f"_kombu.binding.{name}", f"_kombu.binding_permanent.{name}")])
    client.close()


def _printed_album(stdout: str) -> tuple[str, list[tuple[str, str, str, int]]]:
    """The title and the (country, city, landmark, photos) rows of the table the demo printed."""
    lines = stdout.splitlines()
    title = next(line.strip() for line in lines if line.strip().startswith("Attractions of "))
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    return title, [(country, city, name, int(count)) for country, city, name, count in rows]


def test_the_demo_sends_every_photo_through_and_prints_the_album_the_database_holds(demo):
    done, database_url = demo
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == RESULT_KEYS
    assert 0 < result["landmark_photos"] < result["photos"] and result["users"] > 1
    assert 0 <= result["landmark_accuracy"] <= 1 and 0 <= result["non_landmark_accuracy"] <= 1

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            statuses = dict(conn.execute(sa.text("SELECT status, count(*) FROM photos GROUP BY status")).all())
            applied = conn.scalar(sa.text("SELECT count(DISTINCT photo_id) FROM processed_events "
                                          "WHERE kind = 'uploaded'"))
            users = conn.scalar(sa.text("SELECT count(DISTINCT user_id) FROM photos"))
            versions = set(conn.scalars(sa.text("SELECT DISTINCT model_version FROM photos")))
            album = conn.execute(sa.text("SELECT country, city, name, photo_count FROM album_landmarks "
                                         "WHERE user_id = :u"), {"u": result["album_user"]}).all()
    finally:
        engine.dispose()
    # Every photo sent has an outcome, none is left pending, and the counts printed are the database's.
    assert applied == sum(statuses.values()) == result["photos"]
    assert set(statuses) <= {"tagged", "no_landmark", "failed"}
    assert statuses.get("tagged", 0) == result["tagged_photos"] and users == result["users"]
    assert versions == {result["model_version"]}
    title, printed = _printed_album(done.stdout)
    assert title == f"Attractions of {result['album_user']}"
    assert sorted(printed) == sorted(map(tuple, album))
