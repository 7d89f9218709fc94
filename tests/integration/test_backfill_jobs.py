"""Backfill jobs against real PostgreSQL (and Redis for the CLI): a re-run never silently does nothing, a
job runs once at a time, and `--failed` finds the photos a storage outage left behind an old verdict."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared.backfill import ACTIVATION_CHECK_EVERY, BackfillRefused, Scope, job_lock, job_status, run_backfill
from shared.db.session import make_engine, transaction
from shared.db.writer import (
    activate_model_version,
    register_model_version,
    start_shadow_rollout,
    stop_shadow_rollout,
    write_outcomes,
)
from shared.errors import Stage
from shared.events import PhotoUploaded
from shared.outcomes import Failure, PhotoOutcome, PhotoStatus

import ops_fleet as fleet

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def versions(engine) -> dict:
    """Three registered versions, V1 active for each test; the version active before is restored at the end."""
    tag = uuid.uuid4().hex[:6]
    names = {"V1": f"bj_v1_{tag}", "V2": f"bj_v2_{tag}", "V3": f"bj_v3_{tag}"}
    with transaction(engine) as session:
        before = session.scalar(sa.text("SELECT version FROM model_versions WHERE is_active"))
        for version in names.values():
            register_model_version(session, version, backbone="tiny", embedding_dim=8, t_geo=0.5, t_global=0.5,
                                   t_ref=0.5, checkpoint=f"/nowhere/{version}.pt", metrics={})
    yield names
    with transaction(engine) as session:
        if before is not None:
            activate_model_version(session, before)
        else:
            session.execute(sa.text("UPDATE model_versions SET is_active = false WHERE version IN (:a, :b)"),
                            {"a": names["V1"], "b": names["V2"]})


@pytest.fixture(autouse=True)
def v1_active(versions, engine):
    _activate(engine, versions["V1"])


def _activate(engine, version: str) -> None:
    with transaction(engine) as session:
        activate_model_version(session, version)


def _upload(user: str, photo: str) -> PhotoUploaded:
    return PhotoUploaded(event_id=uuid.uuid4().hex, user_id=user, photo_id=photo, uri=f"file:///x/{photo}.jpg",
                         uploaded_at=datetime(2024, 6, 1, tzinfo=UTC))


def _write(engine, version: str, outcomes: list[PhotoOutcome]) -> None:
    with transaction(engine) as session:
        write_outcomes(session, version, outcomes)


def _library(engine, version: str, user: str, n: int) -> None:
    _write(engine, version, [PhotoOutcome(_upload(user, f"p{k}"), PhotoStatus.NO_LANDMARK) for k in range(n)])


def _user(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


# --- 1. a re-run that would do nothing says so, or is refused -------------------------------------------

def test_include_current_is_a_job_of_its_own_that_redoes_every_photo(versions, engine):
    v1, v2 = versions["V1"], versions["V2"]
    user = _user("bji")
    _library(engine, v1, user, 4)
    plain = run_backfill(engine, lambda e: None, Scope(user=user))
    assert (plain.status, plain.enqueued) == ("done", 0)  # V1 processed them all
    sent: list[dict] = []
    redo = run_backfill(engine, sent.append, Scope(user=user), include_current=True)
    assert (redo.status, redo.enqueued, sorted(e["photo_id"] for e in sent)) == ("done", 4, ["p0", "p1", "p2", "p3"])
    assert re.fullmatch(rf"{v1}@\d+:user={user}:include-current", redo.name)

    # An interrupted plain job under V2, resumed with --include-current: every photo, not the rest only.
    _activate(engine, v2)
    assert run_backfill(engine, lambda e: None, Scope(user=user), limit=2).status == "running"
    sent.clear()
    resumed = run_backfill(engine, sent.append, Scope(user=user), include_current=True)
    assert resumed.enqueued == 4 and [e["photo_id"] for e in sent] == ["p0", "p1", "p2", "p3"]


def test_the_same_backfill_after_a_rollback_and_a_promote_back_sends_the_photos_uploaded_meanwhile(versions, engine):
    """The documented `backfill` after `promote V --force` must not find V's job of an earlier activation done."""
    v1, v2 = versions["V1"], versions["V2"]
    user = _user("bja")
    _library(engine, v1, user, 2)
    _activate(engine, v2)
    assert run_backfill(engine, lambda e: None, Scope(user=user)).status == "done"
    _activate(engine, v1)  # a rollback, a user uploads, and V2 is promoted again
    _write(engine, v1, [PhotoOutcome(_upload(user, "new"), PhotoStatus.NO_LANDMARK)])
    _activate(engine, v2)
    sent: list[dict] = []
    again = run_backfill(engine, sent.append, Scope(user=user))
    assert not again.already_done and sorted(e["photo_id"] for e in sent) == ["new", "p0", "p1"]
    assert run_backfill(engine, sent.append, Scope(user=user)).already_done  # this activation's job is done


def test_include_current_for_another_shadow_is_a_job_of_its_own(versions, engine):
    """Covering every photo for candidate V2, then for candidate V3, under the same active V1."""
    v2, v3 = versions["V2"], versions["V3"]
    user = _user("bjs")
    _library(engine, versions["V1"], user, 3)
    runs = []
    try:
        for candidate in (v2, v3):
            with transaction(engine) as session:
                start_shadow_rollout(session, candidate, 1.0, "tester")
            runs.append(run_backfill(engine, lambda e: None, Scope(user=user), include_current=True))
    finally:
        with transaction(engine) as session:
            stop_shadow_rollout(session)
    assert [r.name.rsplit(":", 2)[1:] for r in runs] == [["include-current", f"shadow={v2}"],
                                                         ["include-current", f"shadow={v3}"]]
    assert [(r.already_done, r.enqueued) for r in runs] == [(False, 3), (False, 3)]


def test_a_named_job_refuses_another_scope_or_version(versions, engine):
    v1, v2 = versions["V1"], versions["V2"]
    user, bob, name = _user("bjn"), _user("bjn_bob"), f"retag_{uuid.uuid4().hex[:6]}"
    _library(engine, v1, user, 3)
    _library(engine, v1, bob, 2)
    _activate(engine, v2)
    assert run_backfill(engine, lambda e: None, Scope(user=user), name=name).enqueued == 3
    with pytest.raises(BackfillRefused, match=f"started for scope .*'{user}'.*asks for scope .*'{bob}'"):
        run_backfill(engine, lambda e: None, Scope(user=bob), name=name)
    with pytest.raises(BackfillRefused, match="include_current"):
        run_backfill(engine, lambda e: None, Scope(user=user), name=name, include_current=True)

    _activate(engine, v1)  # a rollback: the job was V2's
    with pytest.raises(BackfillRefused, match=f"under version {v2}.*under version {v1}.*--restart"):
        run_backfill(engine, lambda e: None, Scope(user=user), name=name, include_current=True)
    redone = run_backfill(engine, lambda e: None, Scope(user=bob), name=name, restart=True, include_current=True)
    assert (redone.model_version, redone.enqueued, redone.status) == (v1, 2, "done")
    assert job_status(engine, name)[0]["scope"] == {"user": bob, "include_current": True}


def test_cli_says_a_done_job_is_done_and_refuses_a_mismatched_name(versions, engine, database_url, broker_url,
                                                                   tmp_path):
    v1, v2 = versions["V1"], versions["V2"]
    user, name = _user("bjc"), f"cli_{uuid.uuid4().hex[:6]}"
    _library(engine, v1, user, 3)
    _activate(engine, v2)
    env = _cli_env(database_url, broker_url, tmp_path)
    try:
        code, first, _ = _cli(env, "backfill", "--user", user, "--name", name)
        assert code == 0 and (first["enqueued"], first["status"]) == (3, "done")
        _library(engine, v2, user, 3)  # the workers processed the job's events
        code, again, err = _cli(env, "backfill", "--user", user, "--name", name)
        assert code == 0 and again["enqueued"] == 0 and again["already_done"] and again["unprocessed"] == 0
        assert f"job {name} already done: 3 photos enqueued at " in err and "--restart to run it again" in err
        code, refused, err = _cli(env, "backfill", "--user", user, "--name", name, "--include-current")
        assert code == 1 and not refused["ok"] and "--restart" in refused["error"] and "include_current" in err
    finally:
        _drop_queue(broker_url, env)


def test_cli_says_a_done_job_whose_events_were_lost_has_photos_left_and_restart_sends_them(
        versions, engine, database_url, broker_url, tmp_path):
    """Redis lost the queue (FLUSHALL, a new empty Redis) before any worker took the job's events: the job is
    done, its photos are still out of the active version's albums, and a re-run must say so."""
    import redis
    v2 = versions["V2"]
    user = _user("bjq")
    _library(engine, versions["V1"], user, 3)
    _activate(engine, v2)
    env = _cli_env(database_url, broker_url, tmp_path)
    queue = f"{env['LANDMARKS_QUEUE']}_backfill"
    client = redis.Redis.from_url(broker_url)
    try:
        code, first, _ = _cli(env, "backfill", "--user", user)  # no worker runs: the events wait in Redis
        assert code == 0 and first["enqueued"] == 3 and client.llen(queue) == 3
        code, queued, err = _cli(env, "backfill", "--user", user)
        assert code == 0 and queued["already_done"] and queued["unprocessed"] == 3
        assert f"{queue} still holds 3 events" in err  # not lost yet: the fleet has not taken them

        client.delete(queue)  # the queue is lost
        code, lost, err = _cli(env, "backfill", "--user", user)
        assert code == 0 and (lost["already_done"], lost["enqueued"], lost["unprocessed"]) == (True, 0, 3)
        assert (f"job {first['name']} is done but 3 of its photos are still not processed by {v2} "
                "(events lost with the queue?): `--restart` sends them again") in err
        assert "still holds" not in err

        code, redone, _ = _cli(env, "backfill", "--user", user, "--restart")
        assert code == 0 and (redone["name"], redone["enqueued"], redone["status"]) == (first["name"], 3, "done")
        assert client.llen(queue) == 3
    finally:
        client.delete(queue)
        client.close()


def test_the_photos_left_by_a_done_job_are_counted_up_to_a_cap(versions, engine, monkeypatch):
    """Only what the job's own selection still finds, and never more than the cap (a huge table is not
    counted to the end to print one line)."""
    import shared.backfill
    v1, v2 = versions["V1"], versions["V2"]
    user = _user("bjk")
    _library(engine, v1, user, 4)
    _activate(engine, v2)
    assert run_backfill(engine, lambda e: None, Scope(user=user)).enqueued == 4  # events lost: nobody got them
    _write(engine, v2, [PhotoOutcome(_upload(user, "p0"), PhotoStatus.NO_LANDMARK)])  # one was processed
    again = run_backfill(engine, lambda e: None, Scope(user=user))
    assert again.already_done and (again.unprocessed, again.unprocessed_capped) == (3, False)
    monkeypatch.setattr(shared.backfill, "UNPROCESSED_COUNT_CAP", 2)
    capped = run_backfill(engine, lambda e: None, Scope(user=user))
    assert (capped.unprocessed, capped.unprocessed_capped) == (2, True)
    redo = run_backfill(engine, lambda e: None, Scope(user=user), include_current=True)
    assert redo.enqueued == 4  # an --include-current job sends every photo ...
    again = run_backfill(engine, lambda e: None, Scope(user=user), include_current=True)
    assert (again.unprocessed, again.unprocessed_capped) == (2, True)  # ... but counts those V2 has not processed


def test_a_count_that_reached_the_cap_reads_as_at_least_the_cap(broker_url):
    from shared.backfill import UNPROCESSED_COUNT_CAP, BackfillResult
    from shared.backlog import queue_backlog
    from shared.ops_cli import _job_already_done
    queue = f"lm_test_{uuid.uuid4().hex[:8]}_backfill"  # empty: nothing left to wait for
    result = BackfillResult("v2@1:all", "v2", queue, "done", 0, 2 * UNPROCESSED_COUNT_CAP, None, 0.0, 0.0,
                            already_done=True, unprocessed=UNPROCESSED_COUNT_CAP, unprocessed_capped=True)
    message = _job_already_done(result, lambda q: queue_backlog(broker_url, q)["backlog"])
    assert message.startswith(f"job v2@1:all is done but {UNPROCESSED_COUNT_CAP:,}+ of its photos are still not "
                              "processed by v2") and "still holds" not in message


# --- 2. one run per job -----------------------------------------------------------------------------------

def test_a_second_run_of_a_running_job_is_refused_and_nothing_is_sent_twice(versions, engine, database_url,
                                                                             broker_url, tmp_path):
    v1 = versions["V1"]
    user = _user("bjl")
    _library(engine, v1, user, 5)
    _activate(engine, versions["V2"])
    holding, release = threading.Event(), threading.Event()
    sent: list[dict] = []

    def send_then_hold(event: dict) -> None:  # the first run stalls after its first event, holding the job
        sent.append(event)
        holding.set()
        release.wait(120)

    results: list = []
    first = threading.Thread(target=lambda: results.append(run_backfill(engine, send_then_hold, Scope(user=user))))
    first.start()
    other = make_engine(database_url)  # a second process's connections
    env = _cli_env(database_url, broker_url, tmp_path)
    try:
        assert holding.wait(30), "the first run sent nothing"
        with pytest.raises(BackfillRefused, match="already running"):
            run_backfill(other, sent.append, Scope(user=user))
        code, refused, _ = _cli(env, "backfill", "--user", user)
        assert code == 1 and "already running" in refused["error"]
    finally:
        release.set()
        first.join(60)
    assert results and (results[0].enqueued, results[0].status) == (5, "done")
    assert sorted(e["photo_id"] for e in sent) == ["p0", "p1", "p2", "p3", "p4"]  # each photo once
    assert job_status(engine, results[0].name)[0]["enqueued"] == 5
    try:  # the ended run let go of the job: another process takes it (and finds it done)
        assert run_backfill(other, sent.append, Scope(user=user)).already_done
    finally:
        other.dispose()
        _drop_queue(broker_url, env)


def _activating_after_the_first(engine, version: str, sent: list[dict]):
    """A sender that keeps what it sends and activates ``version`` (a rollback mid-run) after the first event."""
    def send(event: dict) -> None:
        sent.append(event)
        if len(sent) == 1:
            _activate(engine, version)
    return send


def test_a_run_stops_when_another_version_becomes_active_and_a_new_activation_starts_a_new_job(versions, engine):
    """Its photos were chosen for the version active when it began (those that version had not processed):
    after a rollback mid-run it would go on sending them for a version the workers no longer run. Once that
    version is promoted again, the same command sends it the photos it has not processed yet."""
    v1, v2 = versions["V1"], versions["V2"]
    user = _user("bjv")
    _library(engine, v1, user, 5)
    _activate(engine, v2)
    sent: list[dict] = []
    try:
        stopped = run_backfill(engine, _activating_after_the_first(engine, v1, sent), Scope(user=user), chunk=2)
        assert (stopped.status, stopped.active_version, stopped.enqueued) == ("version_changed", v1, 2)
        _activate(engine, v2)
        sent.clear()
        again = run_backfill(engine, sent.append, Scope(user=user), chunk=2)
        assert again.name != stopped.name and (again.status, again.enqueued) == ("done", 5)
        assert sorted(e["photo_id"] for e in sent) == ["p0", "p1", "p2", "p3", "p4"]  # no worker has run them
    finally:
        _activate(engine, v2)


def test_a_promote_mid_chunk_stops_the_run_within_a_few_events(versions, engine):
    v1, v2 = versions["V1"], versions["V2"]
    user = _user("bjm")
    _library(engine, v1, user, 3 * ACTIVATION_CHECK_EVERY)  # one chunk of the default 500
    _activate(engine, v2)
    sent: list[dict] = []
    stopped = run_backfill(engine, _activating_after_the_first(engine, v1, sent), Scope(user=user))
    assert stopped.status == "version_changed" and stopped.enqueued == len(sent) <= ACTIVATION_CHECK_EVERY


def test_a_resumed_run_counts_the_jobs_events_and_a_finished_run_says_when(versions, engine):
    user = _user("bjp")
    _library(engine, versions["V1"], user, 5)
    _activate(engine, versions["V2"])
    ticks = itertools.count()
    a_second_per_reading = lambda: float(next(ticks))  # noqa: E731 - progress after every event
    first = run_backfill(engine, lambda e: None, Scope(user=user), limit=3, clock=a_second_per_reading)
    assert (first.status, first.finished_at) == ("running", None)
    progress: list[tuple] = []
    resumed = run_backfill(engine, lambda e: None, Scope(user=user), clock=a_second_per_reading,
                           progress=lambda done, total: progress.append((done, total)))
    assert progress == [(4, 5), (5, 5)]  # the job's events, this run's two included
    assert resumed.status == "done" and resumed.finished_at == job_status(engine, resumed.name)[0]["finished_at"]
    assert resumed.finished_at is not None


def test_backfill_jobs_says_which_job_is_done_running_now_or_interrupted(versions, engine, database_url, broker_url,
                                                                         tmp_path):
    """An operator finds a job a pod left half-done (the same `landmarks backfill` command resumes it) and
    tells it from one another run is sending right now, and from one a promote left behind, without SQL."""
    user = _user("bjl")
    _library(engine, versions["V1"], user, 3)
    _activate(engine, versions["V2"])
    done = run_backfill(engine, lambda e: None, Scope(user=user), name=f"{user}_done")
    stopped = run_backfill(engine, lambda e: None, Scope(user=user), name=f"{user}_stopped", limit=1)
    env = _cli_env(database_url, broker_url, tmp_path)

    def states() -> dict[str, str]:
        code, listed, _ = _cli(env, "backfill-jobs", "--limit", "100")
        assert code == 0
        return {job["name"]: job["state"] for job in listed["jobs"] if job["name"].startswith(user)}

    assert states() == {done.name: "done", stopped.name: "interrupted"}
    with job_lock(engine, stopped.name):  # a run in another process holds it
        assert states() == {done.name: "done", stopped.name: "running"}
    shown = subprocess.run([sys.executable, "-m", "shared.ops_cli", "backfill-jobs", "--name", stopped.name], env=env,
                           capture_output=True, text=True, timeout=180)
    assert shown.returncode == 0
    assert shown.stdout.startswith(f"{stopped.name}: interrupted, 1 of 3 photos enqueued for {versions['V2']} "
                                   f"(user {user}); last progress ")
    _activate(engine, versions["V3"])  # its photos were chosen for V2
    assert states() == {done.name: "done", stopped.name: "outdated"}
    nothing = subprocess.run([sys.executable, "-m", "shared.ops_cli", "backfill-jobs", "--name", "no-such-job"],
                             env=env, capture_output=True, text=True, timeout=180)
    assert (nothing.returncode, nothing.stdout.strip()) == (0, "no backfill job named no-such-job")


def test_backfill_refuses_rates_and_counts_that_make_no_sense_before_opening_a_job(versions, engine):
    import typer
    from typer.testing import CliRunner

    from shared.ops_cli import register
    user = _user("bjd")
    _library(engine, versions["V1"], user, 2)
    _activate(engine, versions["V2"])
    cli = typer.Typer()
    register(cli)
    for bad in (["--rate", "0"], ["--rate", "-1"], ["--limit", "-5"], ["--limit", "0"],
                ["--max-live-backlog", "-1"], ["--max-backfill-backlog", "-1"]):
        refused = CliRunner().invoke(cli, ["backfill", "--user", user, *bad])
        assert refused.exit_code == 2 and "Invalid value" in refused.output, (bad, refused.output)
    with pytest.raises(ValueError, match="--rate"):
        run_backfill(engine, lambda e: None, Scope(user=user), rate=0)
    assert not [job for job in job_status(engine) if user in job["name"]]


# --- 3. --since pages through the window in upload order ---------------------------------------------------

def _photos_uploaded(engine, user_prefix: str, n: int, first: datetime, step_s: int, users: int = 7) -> None:
    """``n`` photos of ``users`` users, not yet processed by any version, uploaded ``step_s`` apart from
    ``first`` on, stored out of upload order as a library imported later would be (one statement: the plan
    test needs thousands)."""
    with transaction(engine) as session:
        session.execute(sa.text(
            "INSERT INTO photos (user_id, photo_id, uri, uploaded_at, status, processed_at) "
            "SELECT :prefix || (g % :users), 'p' || lpad(g::text, 6, '0'), 'file:///x/' || g || '.jpg', "
            "       :first + make_interval(secs => ((g * 7919 % :n) * :step)::float8), 'no_landmark', now() "
            "FROM generate_series(0, :n - 1) AS g"), {"prefix": user_prefix, "users": users, "n": n,
                                                       "first": first, "step": step_s})
        session.execute(sa.text("ANALYZE photos"))


def _forget_photos(engine, user_prefix: str) -> None:
    with transaction(engine) as session:
        session.execute(sa.text("DELETE FROM photos WHERE user_id LIKE :p || '%'"), {"p": user_prefix})


def test_a_since_job_resumed_many_times_sends_each_photo_of_its_window_once_in_upload_order(versions, engine):
    """Photos sharing an upload time (a burst from one camera roll) are told apart by user and photo: a cursor
    that fell among them neither skips nor repeats one."""
    prefix = _user("bjs") + "_"
    first = datetime(2090, 1, 1, tzinfo=UTC)
    _photos_uploaded(engine, prefix, 40, first, step_s=0)  # all at the same instant ...
    _photos_uploaded(engine, prefix + "late", 12, first.replace(year=2091), step_s=3600)  # ... then one an hour
    try:
        sent: list[dict] = []
        scope = Scope(since=first)
        while (run := run_backfill(engine, sent.append, scope, limit=7, chunk=5)).status == "running":
            assert run.enqueued == 7
        assert (run.status, run.enqueued_total, run.total) == ("done", 52, 52)
        order = [(e["uploaded_at"], e["user_id"], e["photo_id"]) for e in sent]
        assert order == sorted(order) and len(set(order)) == 52
    finally:
        _forget_photos(engine, prefix)


def test_each_chunk_of_a_since_job_reads_its_photos_from_the_cursor_on(versions, engine):
    """A chunk costs the same at the end of a large window as at its start: in (user, photo) order, or with
    the planner's bitmap scan, every chunk read all of the window's photos after the cursor and sorted them,
    so a job's cost grew with the square of its photos."""
    prefix = _user("bjp") + "_"
    first = datetime(2092, 1, 1, tzinfo=UTC)
    _photos_uploaded(engine, prefix, 20_000, first, step_s=600, users=500)
    chunk, read = 200, []

    def explain_chunk_queries(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().startswith("SELECT photos.user_id") and "LIMIT" in statement:
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters)
            read.append(_rows_scanned(cursor.fetchone()[0][0]["Plan"]))

    sa.event.listen(engine, "before_cursor_execute", explain_chunk_queries)
    try:
        since = first + timedelta(seconds=600 * 17_000)  # the last 3,000 photos
        result = run_backfill(engine, lambda event: None, Scope(since=since), limit=10 * chunk, chunk=chunk)
        assert result.enqueued == 10 * chunk
        assert len(read) >= 10 and max(read) <= 2 * chunk, f"photos read by each chunk's query: {read}"
    finally:
        sa.event.remove(engine, "before_cursor_execute", explain_chunk_queries)
        _forget_photos(engine, prefix)


def _rows_scanned(plan: dict) -> int:
    """The rows a plan's scans of ``photos`` produced and filtered out."""
    own = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0) if plan.get("Relation Name") == "photos" else 0
    return own + sum(_rows_scanned(child) for child in plan.get("Plans", []))


# --- 4. --failed after a storage outage -------------------------------------------------------------------

def test_failed_scope_finds_photos_whose_retry_failed_behind_an_old_verdict(versions, engine):
    v1, v2 = versions["V1"], versions["V2"]
    user = _user("bjf")
    _library(engine, v1, user, 4)
    _activate(engine, v2)
    sent: list[dict] = []
    assert run_backfill(engine, sent.append, Scope(user=user)).enqueued == 4
    # The storage is down while the workers process p0 and p1; p2 goes through; p3's event is still queued.
    events = {e["photo_id"]: PhotoUploaded(**e) for e in sent}
    outage = Failure(Stage.FETCH, "HTTP 503 from storage")
    _write(engine, v2, [PhotoOutcome(events[p], PhotoStatus.FAILED, failure=outage) for p in ("p0", "p1")])
    _write(engine, v2, [PhotoOutcome(events["p2"], PhotoStatus.NO_LANDMARK)])
    # What the SRE sees: the failed photos still carry V1's verdict, not status 'failed'.
    assert _photos(engine, user) == [("p0", "no_landmark", v1), ("p1", "no_landmark", v1),
                                     ("p2", "no_landmark", v2), ("p3", "no_landmark", v1)]

    sent.clear()
    retry = run_backfill(engine, sent.append, Scope(user=user, failed=True))
    assert [e["photo_id"] for e in sent] == ["p0", "p1"]  # not p2 (done by V2), not p3 (never failed)
    assert (retry.enqueued, retry.total) == (2, 2) and re.fullmatch(rf"{v2}@\d+:user={user}:failed", retry.name)
    _write(engine, v2, [PhotoOutcome(PhotoUploaded(**e), PhotoStatus.NO_LANDMARK) for e in sent])
    assert run_backfill(engine, sent.append, Scope(user=user, failed=True), restart=True).enqueued == 0


def _photos(engine, user: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT photo_id, status, model_version FROM photos WHERE user_id = :u ORDER BY photo_id"), {"u": user})]


# --- the CLI as an operator runs it -----------------------------------------------------------------------

def _cli_env(database_url: str, broker_url: str, tmp_path) -> dict:
    # The backfill command never reaches Milvus: any URI keeps it off the embedded stack.
    return fleet.fleet_env(database_url, broker_url, "http://127.0.0.1:1", tmp_path, tmp_path / "home")


def _cli(env: dict, *args: str) -> tuple[int, dict, str]:
    """`python -m shared.ops_cli ARGS --json`: exit code, the last stdout line as JSON, stderr."""
    import json
    done = subprocess.run([sys.executable, "-m", "shared.ops_cli", *args, "--json"], env=env, capture_output=True,
                          text=True, timeout=180)
    lines = done.stdout.strip().splitlines()
    return done.returncode, (json.loads(lines[-1]) if lines else {}), done.stderr


def _drop_queue(broker_url: str, env: dict) -> None:
    import redis
    client = redis.Redis.from_url(broker_url)
    client.delete(f"{env['LANDMARKS_QUEUE']}_backfill")
    client.close()
