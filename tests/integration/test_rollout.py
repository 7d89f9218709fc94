"""Model rollout and backfill against real PostgreSQL, Milvus, Redis and a real worker: promote, rollback
(the history is a stack), compare, albums after a rollback, resumable rate-limited backfills, and a shadow
version tagging a sample of live uploads beside the active one."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from shared import publish as publish_module
from shared import rollout
from shared.backfill import EVENT_PREFIX, RateLimiter, Scope, run_backfill
from shared.db.albums import attractions
from shared.db.session import transaction
from shared.db.writer import (
    activate_model_version,
    active_model_version,
    register_model_version,
    start_shadow_rollout,
    write_outcomes,
    write_shadow_outcomes,
)
from shared.embedder import Embedder
from shared.events import PhotoUploaded
from shared.gallery import LandmarkPhotos, build_gallery
from shared.imaging import decode_image
from shared.index import LandmarkIndex
from shared.model import load_checkpoint, save_checkpoint
from shared.modelinit import init_model
from shared.outcomes import Method, PhotoOutcome, PhotoStatus, Tag
from shared.pipeline import RecognitionPipeline
from shared.shadow import in_shadow_sample
from shared.publish import publish_model
from shared.settings import Settings

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
    return {**names, "files": paths}


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

    first = rollout.promote(b, engine, index, who="tester", force=True)
    assert (first.version, first.previous, first.action, first.changed) == (b, a, "promote", True)
    assert _active(engine, index) == (b, b)
    assert not rollout.promote(b, engine, index).changed  # idempotent
    rollout.promote(c, engine, index, force=True)
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


def _uncovered(refusal: pytest.ExceptionInfo) -> int:
    return int(re.match(r"(\d+) photos in users' albums have not been through", str(refusal.value)).group(1))


def test_promote_refuses_while_photos_in_the_albums_have_not_been_through_the_candidate(versions, engine, index):
    """The albums show only the active version's tags: promoting B before B has seen a photo in them would
    take the photo out of its user's albums. A shadow pass (a backfill under a share-1 shadow) covers it."""
    a, b = versions["A"], versions["B"]
    rollout.promote(a, engine, index, force=True)
    user = f"cov_{uuid.uuid4().hex[:6]}"
    _write(engine, a, [_outcome(user, "p1", 1), _outcome(user, "p2")])  # p2: no landmark, in no album
    with pytest.raises(rollout.RolloutError, match="shadow start .* --share 1") as before:
        rollout.promote(b, engine, index)
    assert _active(engine, index) == (a, a)
    rollout.start_shadow(b, 1.0, engine, index)
    try:
        with transaction(engine) as session:
            write_shadow_outcomes(session, b, [_outcome(user, "p1")])
    finally:
        rollout.stop_shadow(engine)
    assert rollout.uncovered_photos(b, engine) == _uncovered(before) - 1  # p1 (other tests' photos may not be)
    assert rollout.promote(b, engine, index, force=True).changed
    rollout.promote(a, engine, index, force=True)


def test_a_rollback_after_a_half_done_swap_refuses_instead_of_going_back_two_versions(versions, engine, index):
    """Milvus moved to C, PostgreSQL stayed on B (the promote died between them): the history still ends at
    B, so a rollback would go to A while the operator wants B back."""
    a, b, c = versions["A"], versions["B"], versions["C"]
    rollout.promote(b, engine, index, force=True)
    index.activate(c)  # the first half of `promote C`
    try:
        with pytest.raises(rollout.RolloutError, match=f"half-done swap: workers follow {c}"):
            rollout.rollback(engine, index)
        assert _active(engine, index) == (b, c)
    finally:
        rollout.promote(b, engine, index, force=True)  # the repair the refusal names
    assert _active(engine, index) == (b, b)
    rollout.promote(a, engine, index, force=True)


def test_two_promotes_at_once_leave_workers_and_albums_on_the_same_version(versions, engine, index, milvus_uri):
    """Operator 1 promotes B and stalls between the alias swap and the PostgreSQL step; operator 2 promotes C
    meanwhile. Interleaved, workers would follow C and the albums B while both reported success."""
    a, b, c = versions["A"], versions["B"], versions["C"]
    rollout.promote(a, engine, index, force=True)
    swapped, go_on = threading.Event(), threading.Event()
    with LandmarkIndex(milvus_uri) as stalling:  # operator 1's own client
        swap = stalling.activate

        def swap_then_stall(version: str) -> None:
            swap(version)
            swapped.set()
            go_on.wait(60)

        stalling.activate = swap_then_stall
        first = threading.Thread(target=rollout.promote, args=(b, engine, stalling), kwargs={"force": True})
        second = threading.Thread(target=rollout.promote, args=(c, engine, index), kwargs={"force": True})
        first.start()
        try:
            assert swapped.wait(60), "operator 1's promote never swapped the alias"
            second.start()
            second.join(2)  # time enough to finish, were it not waiting for operator 1
        finally:
            go_on.set()
            first.join(60)
            second.join(60)
    try:
        assert _active(engine, index) == (c, c)
        assert [(r["version"], r["previous_version"]) for r in rollout.history(engine, 2)] == [(b, a), (c, b)]
    finally:
        rollout.promote(a, engine, index, force=True)


def test_a_forced_promote_and_a_rollback_say_which_photos_left_the_albums_and_the_backfill_to_run(
        versions, engine, index):
    a, b = versions["A"], versions["B"]
    rollout.promote(a, engine, index, force=True)
    user = f"left_{uuid.uuid4().hex[:6]}"
    _write(engine, a, [_outcome(user, "old", 1)])
    leaving = rollout.uncovered_photos(b, engine)
    promoted = rollout.promote(b, engine, index, force=True)
    assert leaving >= 1 and (promoted.uncovered, promoted.backfill) == (leaving, "landmarks backfill --all")
    new = _outcome(user, "new", 3)
    new.event = new.event.model_copy(update={"uploaded_at": datetime.now(UTC)})
    _write(engine, b, [new])  # uploaded while B was live: A has never seen it
    assert rollout.uncovered_photos(a, engine) >= 1
    rolled_back = rollout.rollback(engine, index)  # quick: it counts nothing, and names the backfill
    assert (rolled_back.version, rolled_back.uncovered, rolled_back.backfill) == (a, None, "landmarks backfill --all")
    assert rolled_back.as_dict()["backfill"] == rolled_back.backfill
    assert not rollout.promote(a, engine, index).uncovered  # nothing changed, nothing left


def test_promote_and_rollback_refuse_a_version_whose_model_file_is_missing_unless_forced(
        versions, photos, env, engine, index, tmp_path):
    """Workers load the registered checkpoint when the alias moves: activating a version whose file is gone would
    stall the fleet (every batch handed back). Refused with the path; --force, for a file that the workers can read
    where they run though this node cannot, activates it anyway."""
    a = versions["A"]
    rollout.promote(a, engine, index, force=True)
    gone = f"ro_gone_{uuid.uuid4().hex[:6]}"
    model = fleet.build_model(photos, tmp_path, gone)
    publish_model(model, engine, index, activate=False)
    moved = model.rename(model.with_suffix(".moved"))

    code, out = fleet.ops_cli(env, "promote", gone, check=False)
    assert code == 1 and not out["ok"]
    for said in (f"model file {model}", "readable where the workers run", f"`landmarks promote {gone} --force`"):
        assert said in out["error"], out["error"]
    assert _active(engine, index) == (a, a)
    assert rollout.promote(gone, engine, index, force=True).changed and _active(engine, index) == (gone, gone)

    a_file = versions["files"]["A"]
    a_moved = a_file.rename(a_file.with_suffix(".moved"))
    try:
        with pytest.raises(rollout.RolloutError) as refusal:
            rollout.rollback(engine, index)
        assert f"model file {a_file}" in str(refusal.value) and "`landmarks rollback --force`" in str(refusal.value)
        assert _active(engine, index) == (gone, gone)
        code, out = fleet.ops_cli(env, "rollback", "--force")  # the command the refusal names
        assert (code, out["version"]) == (0, a) and _active(engine, index) == (a, a)
    finally:
        a_moved.rename(a_file)
        moved.rename(model)
        rollout.promote(a, engine, index, force=True)


class _PostgresDown(Exception):
    pass


def _failing_activation(session, version):
    raise _PostgresDown(f"the database went away while activating {version}")


@pytest.mark.parametrize("activate", ["promote", "publish"])
def test_a_failed_activation_puts_the_workers_back_on_the_albums_version(versions, engine, index, monkeypatch,
                                                                        activate):
    """The alias moves first, then PostgreSQL: when PostgreSQL fails, the alias goes back, so that workers do
    not tag under B while the albums show A (and a rollback would not go back two versions)."""
    a, b = versions["A"], versions["B"]
    rollout.promote(a, engine, index, force=True)
    monkeypatch.setattr(rollout, "activate_model_version", _failing_activation)
    with pytest.raises(_PostgresDown, match=f"activating {b}"):
        if activate == "promote":
            rollout.promote(b, engine, index, force=True)
        else:  # `landmarks publish --activate` of the published B
            publish_module.publish_model(versions["files"]["B"], engine, index, activate=True)
    assert _active(engine, index) == (a, a)


def test_publish_is_recorded_too(versions, engine, index, photos, tmp_path):
    """The history comes from a trigger, so `landmarks publish` (which knows nothing of it) is recorded."""
    a = versions["A"]
    d = f"ro_d_{uuid.uuid4().hex[:6]}"
    publish_model(fleet.build_model(photos, tmp_path, d), engine, index)
    last = rollout.history(engine)[-1]
    assert (last["version"], last["action"], last["previous_version"]) == (d, "activate", a)
    assert rollout.rollback(engine, index).version == a
    assert _active(engine, index) == (a, a)


def test_cli_publish_activates_a_new_version_only_once_the_albums_are_covered(versions, env, engine, index, photos,
                                                                             tmp_path):
    """`landmarks publish` activates by default: like promote, it must not empty the albums of the photos the
    new version has not seen. Refused, the version stays published for a shadow run."""
    import json
    import subprocess
    import sys
    a = versions["A"]
    rollout.promote(a, engine, index, force=True)
    _write(engine, a, [_outcome(f"pub_{uuid.uuid4().hex[:6]}", "p1", 1)])
    d = f"ro_d_{uuid.uuid4().hex[:6]}"
    model = str(fleet.build_model(photos, tmp_path, d))
    refused = subprocess.run([sys.executable, "-m", "shared.cli", "publish", model, "--json"], env=env,
                             capture_output=True, text=True, timeout=180)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    answer = json.loads(refused.stdout.strip().splitlines()[-1])
    assert "have not been through" in answer["error"] and f"shadow start {d}" in answer["error"]
    assert _active(engine, index) == (a, a) and d in {v["version"] for v in rollout.versions(engine, index)}
    assert _landmarks(env, "publish", model, "--force")["active"]
    assert _active(engine, index) == (d, d)
    rollout.promote(a, engine, index, force=True)


def test_cli_promote_rollback_versions(versions, env, engine, index):
    a, b = versions["A"], versions["B"]
    code, out = fleet.ops_cli(env, "promote", b, "--force")
    assert code == 0 and {k: out[k] for k in ("ok", "version", "previous", "action", "changed")} == {
        "ok": True, "version": b, "previous": a, "action": "promote", "changed": True}
    assert (out["uncovered"] > 0) == (out["backfill"] == "landmarks backfill --all")  # what to run next, if any
    code, out = fleet.ops_cli(env, "versions")
    assert out["active_in_milvus"] == b and out["rollback_target"] == a
    listed = {v["version"]: v for v in out["versions"]}
    assert listed[b]["is_active"] and listed[b]["in_milvus"] and not listed[a]["is_active"]
    assert out["activations"][-1]["version"] == b
    code, out = fleet.ops_cli(env, "rollback")
    assert code == 0 and out["version"] == a and out["previous"] == b and out["action"] == "rollback"
    assert (out["uncovered"], out["backfill"]) == (None, "landmarks backfill --all")  # quick: counts nothing
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
    rollout.promote(b, engine, index, force=True)
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
    rollout.start_shadow(b, 1.0, engine, index)  # B judges them beside A, as before a promote
    try:
        with transaction(engine) as session:
            write_shadow_outcomes(session, b, [_outcome(user, "same", 1), _outcome(user, "lost"),
                                               _outcome(user, "top", 2, 1), _outcome(user, "gain", 3)])
    finally:
        rollout.stop_shadow(engine)
    rollout.promote(b, engine, index, force=True)
    try:
        new = _outcome(user, "new", 3)
        new.event = new.event.model_copy(update={"uploaded_at": datetime.now(UTC)})
        _write(engine, b, [new])  # uploaded after the promote to B: A never saw it
        report = rollout.compare(engine, a, b, user=user)
    finally:
        rollout.promote(a, engine, index, force=True)
    assert report["unseen_by_a"] == 1  # "new" is no gain: A never judged it
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


def test_after_a_rollback_compare_counts_photos_uploaded_under_the_candidate_as_unseen_by_the_baseline(
        versions, engine, index):
    """A is active again, but it was not while C tagged the photos uploaded then: C's tags on them are no gains."""
    a, c = versions["A"], versions["C"]
    rollout.promote(a, engine, index, force=True)
    user = f"cmr_{uuid.uuid4().hex[:6]}"
    _write(engine, a, [_outcome(user, "old", 1)])
    rollout.promote(c, engine, index, force=True)
    new = _outcome(user, "new", 3)
    new.event = new.event.model_copy(update={"uploaded_at": datetime.now(UTC)})
    _write(engine, c, [_outcome(user, "old", 1), new])
    while_c = rollout.compare(engine, a, c, user=user)
    assert rollout.rollback(engine, index).version == a
    after = rollout.compare(engine, a, c, user=user)
    assert (while_c["unseen_by_a"], while_c["gained"], while_c["tags_both"]) == (1, 0, 1)
    assert (after["unseen_by_a"], after["gained"], after["tags_both"]) == (1, 0, 1)


@contextmanager
def _active_in_postgres(engine, version: str):
    """``version`` active on the albums' side only, then the version before it back as a rollback, so that
    the rollout history replays as before (``rollout_stack`` pops the pair)."""
    with transaction(engine) as session:
        previous = active_model_version(session).version
        activate_model_version(session, version)
    try:
        yield
    finally:
        with transaction(engine) as session:
            session.execute(sa.select(sa.func.set_config("landmarks.activation_action", "rollback", True)))
            activate_model_version(session, previous)


def _uploaded_now(user: str, photo: str, at: datetime, *landmarks: int) -> PhotoOutcome:
    outcome = _outcome(user, photo, *landmarks)
    outcome.event = outcome.event.model_copy(update={"uploaded_at": at})
    return outcome


def _varied_comparison(engine) -> dict:
    """Two fresh versions, X (baseline) and Y (candidate), over two users' photos: tagged alike, with another
    best landmark, with more or fewer landmarks, by one version only, by neither yet (pending), deleted, by
    Y both live and as a shadow, seen by X only through its term as the active version, and never seen by X.
    User U sorts before V in
    code-point order ("_Z" < "_a") but after it in a case-insensitive one."""
    tag = uuid.uuid4().hex[:6]
    x, y, u, v = f"gx_{tag}", f"gy_{tag}", f"gold_{tag}_Z", f"gold_{tag}_a"
    with transaction(engine) as session:
        for version in (x, y):
            register_model_version(session, version, backbone="tiny", embedding_dim=64, t_geo=0.5, t_global=0.7,
                                   t_ref=0.6, checkpoint=f"/m/{version}.pt", metrics={})
    _write(engine, x, [_outcome(u, "same", 1), _outcome(u, "swap", 1, 2), _outcome(u, "Part", 1, 2),
                       _outcome(u, "lost", 2), _outcome(u, "gain"), _outcome(u, "pending", 1), _outcome(u, "gone", 1),
                       _outcome(u, "shadow_none", 3),
                       _outcome(v, "same", 2), _outcome(v, "more", 1), _outcome(v, "lost", 3), _outcome(v, "wait", 2),
                       _outcome(v, "relive", 1), _outcome(v, "back", 2), _outcome(v, "both_ways", 1)])
    _write(engine, y, [_outcome(v, "relive"), _outcome(v, "back", 2), _outcome(u, "unseen", 3), _outcome(v, "late", 1),
                       _outcome(v, "both_ways", 1)])
    _write(engine, x, [_outcome(v, "back", 2)])  # X's verdict is the latest again; Y's tags stay
    with transaction(engine) as session:
        start_shadow_rollout(session, y, 1.0, "tester")
    try:
        with transaction(engine) as session:
            write_shadow_outcomes(session, y, [
                _outcome(u, "same", 1), _outcome(u, "swap", 2, 1), _outcome(u, "Part", 1, 3), _outcome(u, "lost"),
                _outcome(u, "gain", 3), _outcome(u, "gone", 2), _outcome(u, "shadow_none"),
                _outcome(v, "same", 2), _outcome(v, "more", 1, 2), _outcome(v, "lost", 1), _outcome(v, "both_ways", 1)])
    finally:
        rollout.stop_shadow(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE photos SET status = 'deleted' WHERE user_id = :u AND photo_id = 'gone'"), {"u": u})
    with _active_in_postgres(engine, x):  # X's term: it has seen what was uploaded then, "no landmark" included
        now = datetime.now(UTC)
        _write(engine, x, [_uploaded_now(u, "term_none", now), _uploaded_now(u, "term_tag", now, 2)])
        # The albums show X's tags: of those photos, Y has not been through pending, term_tag and wait.
        uncovered = {w: rollout.uncovered_photos(w, engine) for w in (x, y)}
    _write(engine, y, [_uploaded_now(u, "term_none", now, 3), _uploaded_now(u, "term_tag", now, 2)])
    return {"x": x, "y": y, "u": u, "v": v, "uncovered_while_x_active": uncovered}


def test_compare_and_versions_report_the_same_figures_on_a_varied_data_set(versions, engine):
    """The figures of `landmarks compare` (every key and value) and of `landmarks versions`, fixed on a data set
    that exercises every branch, so that moving their counting between Python and SQL changes none."""
    data = _varied_comparison(engine)
    x, y, u, v = data["x"], data["y"], data["u"], data["v"]
    assert data["uncovered_while_x_active"] == {x: 0, y: 3}
    expected_one_user = {
        "a": x, "b": y, "user": u,
        "photos_compared": 8, "photos_processed_by_b": 9, "photos_shadowed_by_b": 6,
        "tags_a": 8, "tags_b": 8, "tags_both": 5, "agreement": round(5 / 11, 6),
        "photos_tagged_a": 6, "photos_tagged_b": 6, "photos_tagged_both": 4, "top1_agreement": 0.75,
        "gained": 3, "lost": 3, "gained_photos": 2, "lost_photos": 2, "pending": 1, "unseen_by_a": 1,
        "gained_by_landmark": [{"landmark_id": 3, "tags": 3}],
        "lost_by_landmark": [{"landmark_id": 2, "tags": 2}, {"landmark_id": 3, "tags": 1}],
        "gained_examples": [{"user_id": u, "photo_id": p, "landmark_id": 3} for p in ("Part", "gain", "term_none")],
        "lost_examples": [{"user_id": u, "photo_id": "Part", "landmark_id": 2},
                          {"user_id": u, "photo_id": "lost", "landmark_id": 2},
                          {"user_id": u, "photo_id": "shadow_none", "landmark_id": 3}],
    }
    one_user = rollout.compare(engine, x, y, user=u)
    assert one_user == expected_one_user and list(one_user) == list(expected_one_user)  # the JSON, key order too
    assert rollout.compare(engine, x, y, examples=4) == {
        "a": x, "b": y, "user": None,
        "photos_compared": 14, "photos_processed_by_b": 15, "photos_shadowed_by_b": 10,
        "tags_a": 14, "tags_b": 14, "tags_both": 9, "agreement": round(9 / 19, 6),
        "photos_tagged_a": 12, "photos_tagged_b": 11, "photos_tagged_both": 9, "top1_agreement": round(7 / 9, 6),
        "gained": 5, "lost": 5, "gained_photos": 2, "lost_photos": 3, "pending": 2, "unseen_by_a": 2,
        "gained_by_landmark": [{"landmark_id": 3, "tags": 3}, {"landmark_id": 1, "tags": 1},
                               {"landmark_id": 2, "tags": 1}],
        "lost_by_landmark": [{"landmark_id": 2, "tags": 2}, {"landmark_id": 3, "tags": 2},
                             {"landmark_id": 1, "tags": 1}],
        "gained_examples": [{"user_id": u, "photo_id": "Part", "landmark_id": 3},
                            {"user_id": u, "photo_id": "gain", "landmark_id": 3},
                            {"user_id": u, "photo_id": "term_none", "landmark_id": 3},
                            {"user_id": v, "photo_id": "lost", "landmark_id": 1}],
        "lost_examples": [{"user_id": u, "photo_id": "Part", "landmark_id": 2},
                          {"user_id": u, "photo_id": "lost", "landmark_id": 2},
                          {"user_id": u, "photo_id": "shadow_none", "landmark_id": 3},
                          {"user_id": v, "photo_id": "lost", "landmark_id": 3}],
    }
    assert rollout.compare(engine, x, y, examples=0, user=v)["gained_examples"] == []
    nobody = rollout.compare(engine, x, y, user=f"{u}_nobody")
    assert {k: nobody[k] for k in ("photos_compared", "tags_both", "gained", "pending", "agreement", "top1_agreement",
                                   "gained_by_landmark", "lost_examples")} == {
        "photos_compared": 0, "tags_both": 0, "gained": 0, "pending": 0, "agreement": None, "top1_agreement": None,
        "gained_by_landmark": [], "lost_examples": []}
    counted = {item["version"]: item for item in rollout.versions(engine, counts=True)}
    assert [(counted[w]["tagged_photos"], counted[w]["shadow_photos"]) for w in (x, y)] == [(15, 0), (14, 11)]


def test_a_plain_versions_listing_leaves_out_the_counts_that_read_every_tag(versions, engine):
    """`landmarks versions` read all of photo_tags (about a minute at 30 M tags) for its photo counts: they are
    asked for, not given by default."""
    _write(engine, versions["A"], [_outcome(f"vl_{uuid.uuid4().hex[:6]}", "p1", 1)])
    listed = {item["version"]: item for item in rollout.versions(engine)}
    counted = {item["version"]: item for item in rollout.versions(engine, counts=True)}
    assert {(item["tagged_photos"], item["shadow_photos"]) for item in listed.values()} == {(None, None)}
    assert counted[versions["A"]]["tagged_photos"] > 0
    uncounted = [{**item, "tagged_photos": None, "shadow_photos": None} for item in counted.values()]
    assert uncounted == list(listed.values())  # the rest alike


def test_versions_history_and_compare_examples_take_only_counts_that_make_sense(versions, engine):
    import typer
    from typer.testing import CliRunner

    from shared.ops_cli import register
    cli = typer.Typer()
    register(cli)
    for args in (["versions", "--history", "-1"], ["compare", versions["A"], versions["B"], "--examples", "-1"]):
        refused = CliRunner().invoke(cli, args)
        assert refused.exit_code == 2 and "Invalid value" in refused.output, (args, refused.output)
    assert rollout.history(engine, 0) == [] and len(rollout.history(engine, 1)) == 1


# --- shadow: a candidate beside the active version ----------------------------------------------

def test_the_shadow_sample_is_per_photo_stable_and_near_its_share():
    ids = [f"p{k}" for k in range(4000)]
    quarter = {p for p in ids if in_shadow_sample("u", p, 0.25)}
    assert 0.22 < len(quarter) / len(ids) < 0.28
    assert quarter == {p for p in ids if in_shadow_sample("u", p, 0.25)}  # a redelivery chooses alike
    assert quarter < {p for p in ids if in_shadow_sample("u", p, 0.5)}  # a larger share keeps the sample
    assert all(in_shadow_sample("u", p, 1.0) for p in ids)
    assert {p for p in ids if in_shadow_sample("v", p, 0.25)} != quarter  # per (user, photo)


def test_shadow_start_refusals_replacement_and_promotion(versions, engine, index):
    a, b, c = versions["A"], versions["B"], versions["C"]
    with pytest.raises(rollout.RolloutError, match="active"):
        rollout.start_shadow(a, 0.5, engine, index)
    with pytest.raises(rollout.RolloutError, match="no collections"):
        rollout.start_shadow("no_such_version", 0.5, engine, index)
    with pytest.raises(rollout.RolloutError, match="share"):
        rollout.start_shadow(b, 0.0, engine, index)
    try:
        assert rollout.start_shadow(b, 0.5, engine, index)["share"] == 0.5
        assert rollout.start_shadow(c, 0.2, engine, index)["version"] == c  # one shadow at a time
        assert rollout.shadow_status(engine)["version"] == c
        assert _shadow_runs(engine)[-2:] == [(b, "replaced"), (c, None)]
        listed = {v["version"]: v for v in rollout.versions(engine, index)}
        assert listed[c]["shadow"]["share"] == pytest.approx(0.2) and listed[b]["shadow"] is None
        rollout.promote(c, engine, index, force=True)  # a shadow ends once it is live
        assert rollout.shadow_status(engine) is None and _shadow_runs(engine)[-1] == (c, "promoted")
    finally:
        _back_to(a, engine, index)


def test_shadow_writes_replace_their_tags_and_leave_the_live_verdict_alone(versions, engine, index):
    a, b = versions["A"], versions["B"]
    user = f"sw_{uuid.uuid4().hex[:6]}"
    _write(engine, a, [_outcome(user, "kept", 1), _outcome(user, "lost", 2), _outcome(user, "gone", 1),
                       _outcome(user, "unseen", 1)])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE photos SET status = 'deleted' WHERE user_id = :u AND photo_id = 'gone'"),
                     {"u": user})
    before = _photo_rows(engine, user)
    rollout.start_shadow(b, 1.0, engine, index)
    try:
        assert _write_shadow(engine, b, [_outcome(user, "kept", 2), _outcome(user, "lost"), _outcome(user, "gone", 1),
                                         _outcome(user, "never_uploaded", 1)]) == {"kept", "lost"}
        assert _write_shadow(engine, b, [_outcome(user, "kept", 1, 3)]) == {"kept"}  # replaces, idempotent
        assert _write_shadow(engine, b, [_outcome(user, "kept", 1, 3)]) == {"kept"}
    finally:
        rollout.stop_shadow(engine)
    assert _write_shadow(engine, b, [_outcome(user, "kept", 2)]) == set()  # stopped: nothing more is written
    assert _photo_rows(engine, user) == before  # status, model_version, processed_events: the active path's
    assert _tags(engine, user, b) == {("kept", 1), ("kept", 3)}
    with transaction(engine) as session:
        assert {lm.landmark_id for city in attractions(session, user) for lm in city.landmarks} == {1, 2}
    report = rollout.compare(engine, a, b, user=user)
    # "lost" was seen by the shadow (no landmark), "unseen" was not: lost, and pending.
    assert (report["tags_both"], report["gained"], report["lost"], report["pending"]) == (1, 1, 1, 1)
    assert report["photos_shadowed_by_b"] == 2 and report["lost_examples"][0]["photo_id"] == "lost"


def _back_to(active: str, engine, index) -> None:
    rollout.stop_shadow(engine)
    if _active(engine, index) != (active, active):
        assert rollout.rollback(engine, index).version == active


def _write_shadow(engine, version: str, outcomes: list[PhotoOutcome]) -> set[str]:
    with transaction(engine) as session:
        return {photo for _, photo in write_shadow_outcomes(session, version, outcomes)}


def _photo_rows(engine, user: str) -> tuple:
    with engine.connect() as conn:
        photos = conn.execute(sa.text("SELECT photo_id, status, model_version, processed_at FROM photos "
                                      "WHERE user_id = :u ORDER BY photo_id"), {"u": user}).all()
        events = conn.execute(sa.text("SELECT count(*) FROM processed_events WHERE user_id = :u"), {"u": user}).scalar()
    return tuple(photos), events


def _tags(engine, user: str, version: str) -> set[tuple[str, int]]:
    with engine.connect() as conn:
        return {tuple(row) for row in conn.execute(sa.text("SELECT photo_id, landmark_id FROM photo_tags WHERE "
                                                           "user_id = :u AND model_version = :v"),
                                                   {"u": user, "v": version})}


def _shadow_runs(engine) -> list[tuple[str, str | None]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text("SELECT version, stop_reason FROM shadow_rollouts ORDER BY id"))]


def _shadowed(engine, user: str, version: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT photo_id FROM shadow_photos WHERE user_id = :u "
                                        "AND model_version = :v"), {"u": user, "v": version}).scalars())


@pytest.fixture
def pipeline(photos, engine, index):
    settings = Settings(file_roots=str(photos["root"]), device="cpu", model_path=None)
    pipe = RecognitionPipeline(settings, engine, index)
    pipe.shadow.refresh_s = 0  # see every start and stop at the next batch
    yield pipe
    pipe.close()


def _uploads(user: str, paths: list[Path], prefix: str = "p") -> list[PhotoUploaded]:
    return [PhotoUploaded.model_validate(fleet.event(user, path, photo_id=f"{prefix}{k}")) for k, path in enumerate(paths)]


def test_the_pipeline_tags_the_sample_under_the_shadow_and_albums_stay_on_the_active(
        versions, photos, engine, index, pipeline):
    a, b = versions["A"], versions["B"]
    user = f"sp_{uuid.uuid4().hex[:6]}"
    uploads = _uploads(user, photos["firsts"] + photos["everyday"])  # landmarks 1-3, then two non-landmarks
    rollout.start_shadow(b, 1.0, engine, index)
    try:
        report = pipeline.process(uploads)
        assert report.applied == 5 and report.model_version == a
        assert (report.shadow.version, report.shadow.photos) == (b, {"tagged": 3, "no_landmark": 2})
        assert _tags(engine, user, b) == {("p0", 1), ("p1", 2), ("p2", 3)} and len(_shadowed(engine, user, b)) == 5
        assert _versions_of(engine, user) == {a}
        again = pipeline.process(uploads)  # a redelivery: the live path skips it, the shadow rewrites alike
        assert again.applied == 0 and again.shadow.photos == {"tagged": 3, "no_landmark": 2}
        assert _tags(engine, user, b) == {("p0", 1), ("p1", 2), ("p2", 3)}
        with transaction(engine) as session:
            assert {lm.landmark_id for city in attractions(session, user) for lm in city.landmarks} == {1, 2}
        report = rollout.compare(engine, a, b, user=user)
        assert (report["tags_both"], report["gained"], report["lost"], report["pending"]) == (2, 1, 0, 0)
        assert report["photos_shadowed_by_b"] == 5 and report["agreement"] == pytest.approx(2 / 3)

        rollout.stop_shadow(engine)
        later = pipeline.process(_uploads(user, photos["firsts"], prefix="q"))
        assert later.shadow is None and pipeline.shadow.loaded_version is None  # the model is unloaded
        assert not {p for p, _ in _tags(engine, user, b)} & {"q0", "q1", "q2"}

        rollout.promote(b, engine, index, force=True)  # promoting the shadow switches the albums to its tags
        with transaction(engine) as session:
            assert {lm.landmark_id for city in attractions(session, user) for lm in city.landmarks} == {1, 2, 3}
    finally:
        _back_to(a, engine, index)


def test_a_broken_shadow_costs_the_live_batch_nothing(versions, photos, engine, index, pipeline, tmp_path):
    a = versions["A"]
    user = f"sb_{uuid.uuid4().hex[:6]}"
    missing_file = f"sb_file_{uuid.uuid4().hex[:6]}"
    model = fleet.build_model(photos, tmp_path, missing_file)
    publish_model(model, engine, index, activate=False)
    model.rename(model.with_suffix(".moved"))
    missing_collections = f"sb_milvus_{uuid.uuid4().hex[:6]}"
    publish_model(fleet.build_model(photos, tmp_path, missing_collections), engine, index, activate=False)
    try:
        rollout.start_shadow(missing_file, 1.0, engine, index)
        first = pipeline.process(_uploads(user, photos["firsts"], prefix="f"))
        assert first.applied == 3 and first.shadow.photos == {"error": 3}
        second = pipeline.process(_uploads(user, photos["firsts"], prefix="g"))
        assert second.applied == 3 and second.shadow.photos == {"skipped": 3}  # backing off: no retry per batch

        rollout.start_shadow(missing_collections, 1.0, engine, index)
        third = pipeline.process(_uploads(user, photos["firsts"], prefix="h"))
        assert third.applied == 3 and "error" not in third.shadow.photos  # loaded, checked against Milvus
        index.drop(missing_collections)
        fourth = pipeline.process(_uploads(user, photos["firsts"], prefix="i"))
        assert fourth.applied == 3 and fourth.shadow.photos == {"error": 3}
        assert pipeline.shadow.loaded_version == missing_collections  # its model loaded, its search failed
        assert _processed(engine, user) == 12 and _versions_of(engine, user) == {a}
    finally:
        rollout.stop_shadow(engine)


def test_a_shadow_with_another_input_size_decodes_the_same_fetch_at_its_size(
        versions, photos, engine, index, tmp_path, monkeypatch):
    version = f"s128_{uuid.uuid4().hex[:6]}"
    publish_model(_model_of_size(photos, tmp_path, version, 128), engine, index, activate=False)
    import shared.loading as loading_module
    fetched: list[str] = []
    real_fetch = loading_module.fetch_bytes
    monkeypatch.setattr(loading_module, "fetch_bytes", lambda uri, settings: fetched.append(uri) or real_fetch(uri, settings))
    # Decoding in threads, so that this process sees the fetches.
    settings = Settings(file_roots=str(photos["root"]), device="cpu", model_path=None, decode_pool="threads")
    pipeline = RecognitionPipeline(settings, engine, index)
    pipeline.shadow.refresh_s = 0
    user = f"ss_{uuid.uuid4().hex[:6]}"
    try:
        rollout.start_shadow(version, 1.0, engine, index)
        loading = pipeline.process(_uploads(user, photos["firsts"], prefix="a"))  # decoded before its model loaded
        assert loading.shadow.photos == {"skipped": 3}
        report = pipeline.process(_uploads(user, photos["firsts"], prefix="b"))
        # Tagged with similarity 1 only if decoded at 128 from the same bytes as its gallery.
        assert report.shadow.photos == {"tagged": 3}
        assert _tags(engine, user, version) == {("b0", 1), ("b1", 2), ("b2", 3)}
        assert len(fetched) == 6  # one fetch per photo, shadow or not
    finally:
        rollout.stop_shadow(engine)
        pipeline.close()


def _model_of_size(photos: dict, out: Path, version: str, size: int) -> Path:
    """As ops_fleet.build_model, at another input size: its gallery is the first photos decoded at ``size``."""
    init_model(out / f"{version}_init.pt", backbone="tiny", dim=64, size=size, version=version,
               calibrate=photos["root"], seed=2)
    net, meta, _ = load_checkpoint(out / f"{version}_init.pt")
    embedder = Embedder(out / f"{version}_init.pt", "cpu")
    items = [LandmarkPhotos(info, emb, emb) for info, first in zip(photos["infos"], photos["firsts"])
             for emb in [embedder.embed(decode_image(first.read_bytes(), size=size, max_pixels=10**8).pixels[None])]]
    meta = dataclasses.replace(meta, t_geo=0.99, t_global=0.999, t_ref=0.999)
    save_checkpoint(out / f"{version}.pt", net, meta, build_gallery(items, min_cluster=1))
    return out / f"{version}.pt"


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
    rollout.promote(b, engine, index, force=True)
    _write(engine, b, [_outcome(user, "p5", 1)])  # already processed by the active version
    try:
        sent: list[dict] = []
        scope = Scope(user=user)
        first = run_backfill(engine, sent.append, scope, limit=3, queue="q_bf")
        assert (first.enqueued, first.status, first.model_version) == (3, "running", b)
        assert re.fullmatch(rf"{b}@\d+:user={user}", first.name)  # the version's current activation
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


def test_a_backfill_of_failed_photos_retries_those_the_active_version_failed(versions, engine, index):
    """After a storage outage: the photos the active version could not fetch, and only those."""
    a = versions["A"]
    user = f"bff_{uuid.uuid4().hex[:6]}"
    _write(engine, a, [_outcome(user, f"p{k}", 1) for k in range(4)])
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE photos SET status = 'failed' WHERE user_id = :u AND photo_id IN ('p1', 'p3')"),
                     {"u": user})
    assert _active(engine, index) == (a, a)
    sent: list[dict] = []
    scope = Scope(user=user, failed=True)
    result = run_backfill(engine, sent.append, scope, queue="q_bf")
    assert [e["photo_id"] for e in sent] == ["p1", "p3"]
    assert re.fullmatch(rf"{a}@\d+:user={user}:failed", result.name) and result.status == "done"
    assert run_backfill(engine, sent.append, Scope(user=user), queue="q_bf").enqueued == 0  # all processed by A


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

    # A library of 30 photos, uploaded now and tagged by A (which does not know landmark 3): compare counts A
    # as having seen the photos uploaded while it was active, even where its verdict was "no landmark".
    paths = photos["firsts"] + photos["everyday"]
    uploaded_at = datetime.now(UTC).isoformat()
    library = [fleet.event(user, paths[k % len(paths)], photo_id=f"lib{k:02d}") | {"uploaded_at": uploaded_at}
               for k in range(30)]
    worker = fleet.start_worker(env, tmp_path / "worker.log")
    try:
        for e in library:
            send(e)
        fleet.wait(lambda: _processed(engine, user) == len(library), "the library under A", worker=worker)
        assert _versions_of(engine, user) == {a}
        third = {e["photo_id"] for e in library if e["uri"] == photos["firsts"][2].as_uri()}
        assert third and not (_tagged(engine, user, b) & third)

        code, out = fleet.ops_cli(env, "promote", b, "--force")
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


def _user_whose_sample_shows_landmark_3(photos, landmark_of) -> tuple[str, list[dict], set[str]]:
    """A random user whose 50 % shadow sample of 24 uploads holds a landmark-3 photo and leaves some out.

    Five of the 24 uploads show landmark 3; for one user in 32 the sample holds none of them, and then
    nothing the shadow gains would reach the album when it is promoted."""
    paths = photos["firsts"] + photos["everyday"]
    while True:
        user = f"shadow_{uuid.uuid4().hex[:6]}"
        uploads = [fleet.event(user, paths[k % len(paths)], photo_id=f"s{k:02d}") for k in range(24)]
        sampled = {e["photo_id"] for e in uploads if in_shadow_sample(user, e["photo_id"], 0.5)}
        shows_3 = any(landmark_of.get(e["uri"]) == 3 for e in uploads if e["photo_id"] in sampled)
        if shows_3 and len(sampled) < len(uploads):
            return user, uploads, sampled


@pytest.mark.slow
def test_a_shadow_published_from_the_cli_tags_its_sample_of_live_uploads_until_stopped(
        versions, photos, env, engine, index, broker_url, tmp_path):
    a = versions["A"]
    assert _active(engine, index) == (a, a)
    candidate = f"ro_s_{uuid.uuid4().hex[:6]}"  # knows landmarks 1-3; A knows 1-2
    out = _landmarks(env, "publish", str(fleet.build_model(photos, tmp_path, candidate)), "--shadow", "--share", "0.5")
    assert out["ok"] and not out["active"] and (out["shadow"]["version"], out["shadow"]["share"]) == (candidate, 0.5)
    assert _active(engine, index) == (a, a)
    listed = fleet.ops_cli(env, "versions")[1]
    assert listed["shadow"]["version"] == candidate
    assert {v["version"]: v for v in listed["versions"]}[candidate]["shadow"]["share"] == 0.5

    landmark_of = {first.as_uri(): info.id for info, first in zip(photos["infos"], photos["firsts"])}
    user, uploads, sampled = _user_whose_sample_shows_landmark_3(photos, landmark_of)
    expected = {(e["photo_id"], landmark_of[e["uri"]]) for e in uploads
                if e["photo_id"] in sampled and e["uri"] in landmark_of}
    from celery import Celery
    producer = Celery(broker=broker_url)
    producer.conf.update(task_serializer="json")
    send = lambda e: producer.send_task(fleet.UPLOADED, args=[e], queue=env["LANDMARKS_QUEUE"])  # noqa: E731
    port = fleet.free_port()
    log_path = tmp_path / "worker.log"
    worker = fleet.start_worker({**env, "LANDMARKS_METRICS_PORT": str(port)}, log_path)
    try:
        for e in uploads:
            send(e)
        fleet.wait(lambda: _processed(engine, user) == 24 and _shadowed(engine, user, candidate) == sampled,
                   "the sample under the shadow", worker=worker)
        assert _tags(engine, user, candidate) == expected and _versions_of(engine, user) == {a}
        with transaction(engine) as session:  # the albums read the active version only
            assert {lm.landmark_id for city in attractions(session, user) for lm in city.landmarks} == {1, 2}
        report = fleet.ops_cli(env, "compare", a, candidate, "--user", user)[1]
        third = {p for p, landmark in expected if landmark == 3}
        assert (report["gained"], report["lost"], report["tags_both"]) == (len(third), 0, len(expected) - len(third))
        assert report["photos_shadowed_by_b"] == len(sampled)
        assert report["pending"] == len(_tagged(engine, user, a) - sampled)  # A's tags the shadow did not sample
        status, body = fleet.http_get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and _counter(body, "landmarks_shadow_photos_total", version=candidate,
                                          outcome="tagged") == len(expected)

        assert fleet.ops_cli(env, "shadow", "stop")[1]["stopped"]["version"] == candidate
        for k in range(8):
            send(fleet.event(user, photos["firsts"][k % 3], photo_id=f"t{k}"))
        fleet.wait(lambda: _processed(engine, user) == 32, "uploads after the stop", worker=worker)
        assert _shadowed(engine, user, candidate) == sampled  # no shadow write once stopped
        time.sleep(pipeline_refresh_s() + 0.5)  # the worker's view of the shadow is now stale ...
        send(fleet.event(user, photos["firsts"][0], photo_id="u0"))  # ... so this batch unloads its model
        fleet.wait(lambda: f"shadow model {candidate} unloaded" in log_path.read_text(errors="replace"),
                   "the shadow model unloaded", 60, worker)
    finally:
        fleet.stop(worker)
        producer.close()

    fleet.ops_cli(env, "shadow", "start", candidate, "--share", "0.5")
    assert fleet.ops_cli(env, "promote", candidate, "--force")[1]["version"] == candidate
    try:
        assert fleet.ops_cli(env, "versions")[1]["shadow"] is None  # promoting the shadow ends it
        with transaction(engine) as session:  # and the albums show its tags at once
            assert 3 in {lm.landmark_id for city in attractions(session, user) for lm in city.landmarks}
    finally:
        assert fleet.ops_cli(env, "rollback")[1]["version"] == a


def pipeline_refresh_s() -> float:
    from shared.shadow import SHADOW_REFRESH_S
    return SHADOW_REFRESH_S


def _landmarks(env, *args) -> dict:
    """Runs `python -m shared.cli ARGS --json` and returns its last line as JSON."""
    import json
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "shared.cli", *args, "--json"], env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _counter(metrics: bytes, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(metrics.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


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
    assert names(probe) == {"promote", "rollback", "compare", "versions", "backfill", "backfill-jobs", "health",
                            "prune-ledger"}
    assert not names(probe) & names(app, skip_module="shared.ops_cli")
    assert [g.name for g in probe.registered_groups] == ["shadow"]
    assert [g.name for g in app.registered_groups].count("shadow") == 1 and "shadow" not in names(app)
