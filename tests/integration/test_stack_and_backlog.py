"""The embedded stack from wheels (real PostgreSQL, Redis, Milvus) and the queue backlog an autoscaler reads."""

import json
import os
import subprocess
import sys
import uuid

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from shared import stack
from shared.backlog import queue_backlog
from shared.db.session import make_engine
from shared.index import LandmarkIndex
from shared.stack import redis_client_url

pytestmark = pytest.mark.integration


def test_stack_up_status_down_via_the_cli(tmp_path):
    env = {**os.environ, "LANDMARKS_HOME": str(tmp_path / "home")}
    for key in ("LANDMARKS_DATABASE_URL", "LANDMARKS_BROKER_URL", "LANDMARKS_MILVUS_URI"):
        env.pop(key, None)

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout
        return out.strip().splitlines()[-1]

    try:
        urls = json.loads(cli("stack", "up", "--json"))
        status = json.loads(cli("stack", "status", "--json"))
        assert status["running"] == {"postgres": True, "redis": True, "milvus": True}
        assert {k: status[k] for k in urls} == urls
        with make_engine(urls["database_url"]).connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
        assert redis.Redis.from_url(redis_client_url(urls["broker_url"])).ping()
        assert LandmarkIndex(urls["milvus_uri"]).versions() == []
        assert f"revision {_head_revision()}" in cli("db", "upgrade")
    finally:
        cli("stack", "down")
    assert json.loads(cli("stack", "status", "--json"))["running"] == {"postgres": False, "redis": False, "milvus": False}


def test_an_external_url_replaces_only_that_part(tmp_path, monkeypatch):
    from shared.settings import Settings
    settings = Settings(home=tmp_path, database_url="postgresql://db.example/x",
                        broker_url="redis://broker.example/0", milvus_uri="http://milvus.example:19530")
    urls = stack.resolve(settings)
    assert (urls.database_url, urls.broker_url, urls.milvus_uri) == (
        "postgresql://db.example/x", "redis://broker.example/0", "http://milvus.example:19530")
    assert not (tmp_path / "stack.json").exists()  # nothing embedded was started


def test_backlog_counts_waiting_and_reserved(broker_url):
    queue = f"lm_backlog_{uuid.uuid4().hex[:8]}"
    app = Celery(broker=broker_url)
    for _ in range(5):
        app.send_task("landmarks.photo_uploaded", args=[{}], queue=queue)
    assert queue_backlog(broker_url, queue) == {"queue": queue, "waiting": 5, "reserved": 0, "backlog": 5}
    # Reserve two the way a prefetching worker does (kombu's Redis QoS keeps them in 'unacked').
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, no_ack=False)
        held = [simple.get(timeout=5) for _ in range(2)]
        counts = queue_backlog(broker_url, queue)
        assert (counts["waiting"], counts["reserved"], counts["backlog"]) == (3, 2, 5)
        for message in held:
            message.ack()
        simple.close()
    redis.Redis.from_url(redis_client_url(broker_url)).delete(queue)


def _head_revision() -> str:
    from alembic.script import ScriptDirectory
    from shared.db import migrate
    return ScriptDirectory.from_config(migrate.config("postgresql:///unused")).get_current_head()
