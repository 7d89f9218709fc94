"""The embedded stack from wheels (real PostgreSQL, Redis, Milvus) and the queue backlog an autoscaler reads."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import redis
import sqlalchemy as sa
from celery import Celery

from shared import stack
from shared import backlog
from shared.backlog import queue_backlog, queue_backlogs
from shared.db import migrate
from shared.db.session import make_engine
from shared.index import LandmarkIndex
from shared.stack import redis_client_url
from workers.broker import install as install_worker_transport

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
        assert migrate.current(urls["database_url"]) == _head_revision()  # the development stack is ready to use
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


def test_an_unset_url_starts_only_that_part_and_says_so(tmp_path, caplog):
    from shared.settings import Settings
    settings = Settings(home=tmp_path, database_url="postgresql://db.example/x", broker_url="redis://broker.example/0")
    try:
        with caplog.at_level("WARNING", logger="shared.stack"):
            urls = stack.resolve(settings)
        assert (urls.database_url, urls.broker_url) == ("postgresql://db.example/x", "redis://broker.example/0")
        assert LandmarkIndex(urls.milvus_uri).versions() == []
        assert stack.status(tmp_path)["running"] == {"postgres": False, "redis": False, "milvus": True}
        assert [r.getMessage() for r in caplog.records] == [
            f"LANDMARKS_MILVUS_URI unset: using the embedded Milvus under {tmp_path}"]
    finally:
        stack.down(tmp_path)


def test_stack_status_and_down_on_a_home_that_never_ran_or_lost_its_state(tmp_path):
    env = {**os.environ, "LANDMARKS_HOME": str(tmp_path / "home")}
    for key in ("LANDMARKS_DATABASE_URL", "LANDMARKS_BROKER_URL", "LANDMARKS_MILVUS_URI"):
        env.pop(key, None)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120, check=True)

    nothing = {"postgres": False, "redis": False, "milvus": False}
    fresh = json.loads(cli("stack", "status", "--json").stdout.splitlines()[-1])
    assert fresh["running"] == nothing and fresh["database_url"] is None
    cli("stack", "down")
    assert json.loads(cli("stack", "status", "--json").stdout.splitlines()[-1])["running"] == nothing
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / stack.STATE_FILE).write_text("")  # what a full disk can leave
    assert "ignoring unreadable" in cli("stack", "status", "--json").stderr
    assert "stack stopped" in cli("stack", "down").stdout


def _kill_hard(home) -> None:
    """What a crash (OOM killer, a node losing power) leaves: servers gone, their pid files and socket not."""
    state = json.loads((home / stack.STATE_FILE).read_text())
    for pid in (int((home / "postgres" / "postmaster.pid").read_text().split()[0]),
                int((home / "redis" / "redis.pid").read_text()), state["milvus_pid"]):
        os.kill(pid, signal.SIGKILL)
        _wait_gone(pid)
    assert (home / "redis" / "redis.sock").exists()


def _wait_gone(pid: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and stack._pid_alive(pid) and not _zombie(pid):
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _point_pid_files_at(home, pid: int) -> None:
    """The pids of crashed servers, reused by an unrelated process."""
    (home / "postgres" / "postmaster.pid").write_text(f"{pid}\n{home / 'postgres'}\n")
    (home / "redis" / "redis.pid").write_text(f"{pid}\n")
    state = json.loads((home / stack.STATE_FILE).read_text())
    (home / stack.STATE_FILE).write_text(json.dumps({**state, "milvus_pid": pid}))


def test_after_a_crash_stale_pid_files_are_neither_trusted_nor_signalled(tmp_path):
    home = tmp_path / "home"
    first = stack.up(home)
    _kill_hard(home)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        _point_pid_files_at(home, bystander.pid)
        assert stack.status(home)["running"] == {"postgres": False, "redis": False, "milvus": False}
        stack.down(home)
        assert bystander.poll() is None  # not mistaken for a server and stopped

        urls = stack.up(home)
        assert stack.status(home)["running"] == {"postgres": True, "redis": True, "milvus": True}
        # At once: the old socket did not pass for a started Redis.
        assert redis.Redis.from_url(redis_client_url(urls.broker_url)).ping()
        # Milvus is back on its port: running workers keep the URL they were given.
        assert urls.milvus_uri == first.milvus_uri
        assert LandmarkIndex(urls.milvus_uri).versions() == []

        stack.down(home)
        assert stack.status(home)["running"] == {"postgres": False, "redis": False, "milvus": False}
        _point_pid_files_at(home, bystander.pid)
        stack.down(home)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        stack.down(home)


def test_concurrent_stack_ups_start_one_stack(tmp_path):
    env = {**os.environ, "LANDMARKS_HOME": str(tmp_path / "home")}
    for key in ("LANDMARKS_DATABASE_URL", "LANDMARKS_BROKER_URL", "LANDMARKS_MILVUS_URI"):
        env.pop(key, None)
    ups = [subprocess.Popen([sys.executable, "-m", "shared.cli", "stack", "up", "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        results = [(p.wait(120), *p.communicate()) for p in ups]
        assert [code for code, _, _ in results] == [0, 0, 0], [err[-2000:] for _, _, err in results]
        assert len({out.strip().splitlines()[-1] for _, out, _ in results}) == 1  # the same URLs for all
        assert stack.status(tmp_path / "home")["running"] == {"postgres": True, "redis": True, "milvus": True}
    finally:
        stack.down(tmp_path / "home")

@pytest.mark.parametrize("name", ["lm_backlog", "lm/backlog", "lm_backlogé"])  # JSON-escaped two ways
def test_backlog_counts_waiting_and_reserved(broker_url, name):
    install_worker_transport()  # as a worker reserves them (its script writes 'unacked' with Redis' cjson)
    queue = f"{name}_{uuid.uuid4().hex[:8]}"
    app = Celery(broker=broker_url)
    for _ in range(5):
        app.send_task("landmarks.photo_uploaded", args=[{}], queue=queue)
    assert queue_backlog(broker_url, queue) == {"queue": queue, "waiting": 5, "reserved": 0, "backlog": 5}
    # Reserve two the way a prefetching worker does (kombu's Redis QoS keeps them in 'unacked').
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue, no_ack=False)
        # A prefetch limit as a worker's: workers/broker.py's transport takes all the limit allows in one go.
        simple.consumer.qos(prefetch_count=2)
        held = [simple.get(timeout=5) for _ in range(2)]
        counts = queue_backlog(broker_url, queue)
        assert (counts["waiting"], counts["reserved"], counts["backlog"]) == (3, 2, 5)
        for message in held:
            message.ack()
        simple.close()
    redis.Redis.from_url(redis_client_url(broker_url)).delete(queue)


def test_one_read_counts_every_queue_inside_redis(broker_url, monkeypatch):
    """The exporter's refresh of N queues: one pass over the keyspace and over kombu's 'unacked' hash (where
    every reserved message of every queue lies, body included), whose entries never leave Redis."""
    queues = [f"lm_pass_{uuid.uuid4().hex[:8]}_{k}" for k in range(3)]
    client = redis.Redis.from_url(redis_client_url(broker_url))
    body = {"body": "x" * 1500, "properties": {"delivery_tag": "t"}}
    tags = {f"{queues[0]}-{k}": queues[k % 2] for k in range(5)}  # as kombu's QoS.append writes them
    client.hset(backlog.UNACKED_KEY, mapping={tag: json.dumps([body, "", q]) for tag, q in tags.items()})
    client.rpush(queues[2], "waiting")
    client.rpush(f"{queues[2]}{backlog.PRIORITY_SEPARATOR}3", "waiting at priority 3")
    sent = []
    send = redis.Redis.execute_command

    def recording(self, *args, **options):
        reply = send(self, *args, **options)
        sent.append(args)  # answered (redis-py sends EVALSHA again, once loaded, to a server without the script)
        return reply

    monkeypatch.setattr(redis.Redis, "execute_command", recording)
    monkeypatch.setattr(backlog, "UNACKED_PAGE", 2)  # several pages, as a large hash takes
    try:
        counts = queue_backlogs(broker_url, queues)
    finally:
        client.hdel(backlog.UNACKED_KEY, *tags)
        client.delete(queues[2], f"{queues[2]}{backlog.PRIORITY_SEPARATOR}3")
    assert [(c["waiting"], c["reserved"], c["backlog"]) for c in counts.values()] == [(0, 3, 3), (0, 2, 2), (2, 0, 2)]
    names = [str(args[0]).upper() for args in sent]
    assert not {"HSCAN", "HGETALL", "HVALS", "HGET", "HMGET"} & set(names)  # no message body came back
    passes = [args for args in sent if str(args[0]).upper() in ("SCAN", "EVALSHA", "EVAL") and _cursor(args) == 0]
    assert sorted(str(args[0]).upper() for args in passes) in (["EVALSHA", "SCAN"], ["EVAL", "SCAN"])


def _cursor(args: tuple) -> int:
    """SCAN's cursor, or the counting script's (its first argument after the key)."""
    return int(args[1] if str(args[0]).upper() == "SCAN" else args[4])


def _head_revision() -> str:
    from alembic.script import ScriptDirectory
    from shared.db import migrate
    return ScriptDirectory.from_config(migrate.config("postgresql:///unused")).get_current_head()
