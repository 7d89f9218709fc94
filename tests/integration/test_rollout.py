"""Model rollout and backfill against real PostgreSQL, Milvus, Redis and a real worker: promote, rollback
(the history is a stack), compare, albums after a rollback, resumable rate-limited backfills."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from shared import rollout
from shared.backfill import EVENT_PREFIX, RateLimiter, Scope, run_backfill
from shared.db.albums import attractions
from shared.db.session import transaction
from shared.db.writer import write_outcomes
from shared.events import PhotoUploaded
from shared.index import LandmarkIndex
from shared.outcomes import Method, PhotoOutcome, PhotoStatus, Tag
from shared.publish import publish_model

import ops_fleet as fleet

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    return fleet.photo_set(tmp_path_factory.mktemp("photos"), n_landmarks=3, n_everyday=2)


@pytest.fixture(scope="module")
def index(milvus_uri):
    with LandmarkIndex(milvus_uri) as idx:
        yield idx


@pytest.fixture(scope="module")
def versions(photos, engine, index, tmp_path_factory) -> dict:
    """A knows landmarks 1-2, B and C know 1-3; A is active, B and C are published only."""
    models = tmp_path_factory.mktemp("models")
    tag = uuid.uuid4().hex[:6]
    names = {"A": f"ro_a_{tag}", "B": f"ro_b_{tag}", "C": f"ro_c_{tag}"}
    paths = {"A": fleet.build_model(photos, models, names["A"], slice(0, 2)),
             "B": fleet.build_model(photos, models, names["B"]),
             "C": fleet.build_model(photos, models, names["C"])}
    publish_model(paths["A"], engine, index)
    publish_model(paths["B"], engine, index, activate=False)
    publish_model(paths["C"], engine, index, activate=False)
    return names


def _active(engine, index) -> tuple[str | None, str | None]:
    with engine.connect() as conn:
        pg = conn.execute(sa.text("SELECT version FROM model_versions WHERE is_active")).scalar()
    return pg, index.active_version()


# --- promote, rollback, history ------------------------------------------------------------------

def test_rollout_stack_replays_promotions_and_rollbacks():
    rows = lambda *pairs: [{"version": v, "action": a} for v, a in pairs]  # noqa: E731
    assert rollout.rollout_stack(rows(("A", "initial"), ("B", "promote"), ("C", "promote")), "C") == ["A", "B", "C"]
    assert rollout.rollout_stack(rows(("A", "initial"), ("B", "promote"), ("C", "promote"), ("B", "rollback")),
                                 "B") == ["A", "B"]
    # an activation the history missed (before migration 0002) still counts as the current one
    assert rollout.rollout_stack(rows(("A", "activate")), "X") == ["A", "X"]
    assert rollout.rollout_stack([], "A") == ["A"]


def test_promote_and_rollback_walk_the_history(versions, engine, index):
    a, b, c = versions["A"], versions["B"], versions["C"]
    assert _active(engine, index) == (a, a)
    before_a = rollout.rollout_stack(rollout.history(engine), a)[:-1]  # what other test modules left

    first = rollout.promote(b, engine, index, who="tester")
    assert first.as_dict() == {"version": b, "previous": a, "action": "promote", "changed": True}
    assert _active(engine, index) == (b, b)
    assert not rollout.promote(b, engine, index).changed  # idempotent
    rollout.promote(c, engine, index)
    last = rollout.history(engine)[-1]
    assert (last["version"], last["previous_version"], last["action"]) == (c, b, "promote")
    assert last["actor"] and last["activated_at"]

    assert rollout.rollback(engine, index).version == b
    assert _active(engine, index) == (b, b)
    assert rollout.rollback(engine, index).version == a  # twice: back past B, not forth to C
    assert _active(engine, index) == (a, a)
    assert rollout.history(engine)[-1]["action"] == "rollback"
    if before_a:
        assert rollout.rollback_target(engine)[0] == before_a[-1]
    with pytest.raises(rollout.RolloutError, match="not registered"):
        rollout.promote("no_such_version", engine, index)


def test_publish_is_recorded_too(versions, engine, index, photos, tmp_path):
    """The history comes from a trigger, so `landmarks publish` (which knows nothing of it) is recorded."""
    a = versions["A"]
    d = f"ro_d_{uuid.uuid4().hex[:6]}"
    publish_model(fleet.build_model(photos, tmp_path, d), engine, index)
    last = rollout.history(engine)[-1]
    assert (last["version"], last["action"], last["previous_version"]) == (d, "activate", a)
    assert rollout.rollback(engine, index).version == a
    assert _active(engine, index) == (a, a)


def test_cli_promote_rollback_versions(versions, env, engine, index):
    a, b = versions["A"], versions["B"]
    code, out = fleet.ops_cli(env, "promote", b)
    assert code == 0 and out == {"ok": True, "version": b, "previous": a, "action": "promote", "changed": True}
    code, out = fleet.ops_cli(env, "versions")
    assert out["active_in_milvus"] == b and out["rollback_target"] == a
    listed = {v["version"]: v for v in out["versions"]}
    assert listed[b]["is_active"] and listed[b]["in_milvus"] and not listed[a]["is_active"]
    assert out["activations"][-1]["version"] == b
    code, out = fleet.ops_cli(env, "rollback")
    assert code == 0 and out["version"] == a and out["previous"] == b and out["action"] == "rollback"
    code, out = fleet.ops_cli(env, "promote", "no_such_version", check=False)
    assert code == 1 and not out["ok"] and "not registered" in out["error"]
    assert _active(engine, index) == (a, a)


# --- albums and compare on tags written directly -------------------------------------------------

def _outcome(user: str, photo: str, *landmarks: int) -> PhotoOutcome:
    event = PhotoUploaded(event_id=uuid.uuid4().hex, user_id=user, photo_id=photo, uri=f"file:///x/{photo}.jpg",
                          uploaded_at=datetime(2024, 6, 1, tzinfo=UTC))
    tags = [Tag(lm, 0.9 - 0.1 * k, Method.REFERENCE) for k, lm in enumerate(landmarks)]
    return PhotoOutcome(event, PhotoStatus.TAGGED if tags else PhotoStatus.NO_LANDMARK, tags)


def _write(engine, version: str, outcomes: list[PhotoOutcome]) -> None:
    with transaction(engine) as session:
        write_outcomes(session, version, outcomes)


def test_a_rollback_brings_back_the_albums_of_the_restored_version(versions, engine, index):
    a, b = versions["A"], versions["B"]
    user = f"rita_{uuid.uuid4().hex[:6]}"
    _write(engine, a, [_outcome(user, "p1", 1)])
    rollout.promote(b, engine, index)
    _write(engine, b, [_outcome(user, "p1")])  # B's verdict: no landmark
    with transaction(engine) as session:
        assert attractions(session, user) == []
    rollout.rollback(engine, index)
    with transaction(engine) as session:
        restored = attractions(session, user)
    assert [lm.landmark_id for city in restored for lm in city.landmarks] == [1]


def test_compare_counts_agreement_gains_and_losses(versions, engine, index):
    a, b = versions["A"], versions["B"]
    user = f"cmp_{uuid.uuid4().hex[:6]}"
    _write(engine, a, [_outcome(user, "same", 1), _outcome(user, "lost", 2), _outcome(user, "top", 1, 2),
                       _outcome(user, "gain", ), _outcome(user, "unseen", 3)])
    _write(engine, b, [_outcome(user, "same", 1), _outcome(user, "lost"), _outcome(user, "top", 2, 1),
                       _outcome(user, "gain", 3)])
    report = rollout.compare(engine, a, b, user=user)
    assert report["tags_both"] == 3 and report["gained"] == 1 and report["lost"] == 1
    assert report["agreement"] == pytest.approx(3 / 5)
    assert report["photos_tagged_both"] == 2 and report["top1_agreement"] == pytest.approx(1 / 2)
    assert report["gained_photos"] == 1 and report["lost_photos"] == 1
    assert report["pending"] == 1  # "unseen": B has not processed it yet, so it is neither lost nor kept
    pairs = lambda items: [(x["photo_id"], x["landmark_id"]) for x in items]  # noqa: E731
    assert pairs(report["gained_examples"]) == [("gain", 3)] and pairs(report["lost_examples"]) == [("lost", 2)]
    assert report["gained_by_landmark"] == [{"landmark_id": 3, "tags": 1}]
    everyone = rollout.compare(engine, a, b)
    assert everyone["tags_both"] >= 3 and everyone["gained"] >= 1 and everyone["user"] is None
    with pytest.raises(rollout.RolloutError, match="unknown"):
        rollout.compare(engine, a, "nope")


# --- backfill --------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0
        self.slept = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s
        self.slept += s


def test_rate_limiter_spaces_events():
    clock = FakeClock()
    limiter = RateLimiter(10, clock, clock.sleep)
    for _ in range(51):
        limiter.wait()
    assert clock.now == pytest.approx(5.0, abs=0.2)
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_backfill_is_resumable_skips_deleted_and_current_and_uses_fresh_ids(versions, engine, index):
    a, b = versions["A"], versions["B"]
    user = f"bf_{uuid.uuid4().hex[:6]}"
    _write(engine, a, [_outcome(user, f"p{k}", 1) for k in range(7)])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE photos SET status = 'deleted' WHERE user_id = :u AND photo_id = 'p6'"), {"u": user})
    rollout.promote(b, engine, index)
    _write(engine, b, [_outcome(user, "p5", 1)])  # already processed by the active version
    try:
        sent: list[dict] = []
        scope = Scope(user=user)
        first = run_backfill(engine, sent.append, scope, limit=3, queue="q_bf")
        assert (first.enqueued, first.status, first.model_version) == (3, "running", b)
        assert first.name == f"{b}:user={user}"
        second = run_backfill(engine, sent.append, scope, queue="q_bf")  # the same command resumes
        assert (second.enqueued, second.enqueued_total, second.status) == (2, 5, "done")
        assert [e["photo_id"] for e in sent] == [f"p{k}" for k in range(5)]  # not p5 (current), not p6 (deleted)
        assert all(e["event_id"].startswith(EVENT_PREFIX) for e in sent)
        assert len({e["event_id"] for e in sent}) == 5
        assert all(PhotoUploaded.model_validate(e).uri == f"file:///x/{e['photo_id']}.jpg" for e in sent)
        assert run_backfill(engine, sent.append, scope).enqueued == 0  # done stays done ...
        again = run_backfill(engine, sent.append, scope, restart=True, include_current=True)  # ... unless restarted
        assert again.enqueued == 6 and again.total == 6
    finally:
        rollout.rollback(engine, index)


def test_backfill_rate_and_backlog_guard(versions, engine):
    user = f"bfr_{uuid.uuid4().hex[:6]}"
    _write(engine, versions["A"], [_outcome(user, f"p{k}", 1) for k in range(20)])
    clock = FakeClock()
    backlog_reads = []

    def backlog(queue: str) -> int:
        backlog_reads.append((clock.now, queue))
        return 5000 if queue == "live" and clock.now < 10 else 0  # live traffic for the first 10 s

    result = run_backfill(engine, lambda e: None, Scope(user=user), rate=4, include_current=True, queue="bf",
                          backlog=backlog, live_queue="live", max_live_backlog=100, max_backfill_backlog=1000,
                          clock=clock, sleep=clock.sleep)
    assert result.enqueued == 20 and result.status == "done"
    assert result.paused_s >= 10  # waited for the live queue to drain
    assert clock.now == pytest.approx(10 + 19 / 4, abs=2.5)  # then 4 events/s (one second's burst)


# --- the whole loop with a real worker -------------------------------------------------------

@pytest.fixture(scope="module")
def env(photos, database_url, broker_url, milvus_uri, tmp_path_factory) -> dict:
    return fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path_factory.mktemp("home"))


@pytest.mark.slow
def test_backfill_retags_stored_photos_under_the_promoted_version_while_live_uploads_flow(
        versions, photos, env, engine, index, broker_url, tmp_path):
    a, b = versions["A"], versions["B"]
    assert _active(engine, index) == (a, a)
    user = f"paul_{uuid.uuid4().hex[:6]}"
    from celery import Celery
    producer = Celery(broker=broker_url)
    producer.conf.update(task_serializer="json")
    send = lambda e: producer.send_task(fleet.UPLOADED, args=[e], queue=env["LANDMARKS_QUEUE"])  # noqa: E731

    # A library of 30 photos, tagged by A (which does not know landmark 3).
    paths = photos["firsts"] + photos["everyday"]
    library = [fleet.event(user, paths[k % len(paths)], photo_id=f"lib{k:02d}") for k in range(30)]
    worker = fleet.start_worker(env, tmp_path / "worker.log")
    try:
        for e in library:
            send(e)
        fleet.wait(lambda: _processed(engine, user) == len(library), "the library under A", worker=worker)
        assert _versions_of(engine, user) == {a}
        third = {e["photo_id"] for e in library if e["uri"] == photos["firsts"][2].as_uri()}
        assert third and not (_tagged(engine, user, b) & third)

        code, out = fleet.ops_cli(env, "promote", b)
        assert out["version"] == b
        # Backfill at 15 events/s (two seconds) while live uploads keep arriving.
        backfill = _popen_ops(env, "backfill", "--user", user, "--rate", "15")
        latencies = []
        live_user = f"live_{uuid.uuid4().hex[:6]}"
        while backfill.poll() is None:
            e = fleet.event(live_user, photos["firsts"][0])
            sent_at = time.monotonic()
            send(e)
            fleet.wait(lambda: _processed(engine, live_user) == len(latencies) + 1, "a live upload", 30, worker)
            latencies.append(time.monotonic() - sent_at)
        out = backfill.communicate(timeout=60)[0]
        assert backfill.returncode == 0, out
        result = __import__("json").loads(out.strip().splitlines()[-1])
        assert result["enqueued"] == len(library) and result["status"] == "done" and result["model_version"] == b
        assert result["queue"] == env["LANDMARKS_QUEUE"] + "_backfill"
        assert result["seconds"] >= (len(library) - 15) / 15  # the rate limit held
        fleet.wait(lambda: _versions_of(engine, user) == {b}, "the library re-tagged under B", worker=worker)
        assert latencies and max(latencies) < 10, latencies
    finally:
        fleet.stop(worker)
        producer.close()

    assert third <= _tagged(engine, user, b)  # B knows landmark 3: gained
    assert _tagged(engine, user, a) == _tagged(engine, user, b) - third  # A's tags are kept, per version
    code, report = fleet.ops_cli(env, "compare", a, b, "--user", user)
    assert (report["a"], report["b"], report["gained"], report["lost"]) == (a, b, len(third), 0)
    assert report["agreement"] == pytest.approx(len(_tagged(engine, user, a)) / len(_tagged(engine, user, b)))
    assert report["gained_by_landmark"] == [{"landmark_id": 3, "tags": len(third)}]
    with transaction(engine) as session:  # the albums read the active version: B's, with landmark 3
        album = {lm.landmark_id for city in attractions(session, user) for lm in city.landmarks}
    assert 3 in album
    fleet.ops_cli(env, "rollback")
    with transaction(engine) as session:
        album = {lm.landmark_id for city in attractions(session, user) for lm in city.landmarks}
    assert 3 not in album and album


def _popen_ops(env, *args):
    import subprocess
    import sys
    return subprocess.Popen([sys.executable, "-m", "shared.ops_cli", *args, "--json"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _processed(engine, user: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM processed_events WHERE user_id = :u"),
                            {"u": user}).scalar_one()


def _versions_of(engine, user: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT DISTINCT model_version FROM photos WHERE user_id = :u"),
                                {"u": user}).scalars())


def _tagged(engine, user: str, version: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT DISTINCT photo_id FROM photo_tags WHERE user_id = :u "
                                        "AND model_version = :v"), {"u": user, "v": version}).scalars())


def test_ops_commands_do_not_clash_with_the_main_command():
    import typer

    from shared.cli import app
    from shared.ops_cli import register

    def names(cli, skip_module=None):
        return {c.name or c.callback.__name__.replace("_", "-") for c in cli.registered_commands
                if c.callback.__module__ != skip_module}

    probe = typer.Typer()
    register(probe)
    assert names(probe) == {"promote", "rollback", "compare", "versions", "backfill", "health"}
    assert not names(probe) & names(app, skip_module="shared.ops_cli")
