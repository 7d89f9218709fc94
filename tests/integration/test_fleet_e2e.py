"""The whole fleet: events through Redis to a real `celery worker` process, Milvus in the loop, tags and
album views in PostgreSQL; redelivery, deletion and a worker killed mid-batch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery

from shared.backlog import queue_backlog
from shared.db.albums import attractions, photo_report
from shared.db.session import transaction
from shared.embedder import Embedder
from shared.gallery import LandmarkPhotos, build_gallery
from shared.index import LandmarkIndex
from shared.model import load_checkpoint, save_checkpoint
from shared.modelinit import init_model
from shared.imaging import decode_image
from shared.publish import publish_model
from shared.runtime import default_torch_threads
from shared.synthetic import write_photo_set
from shared.training.dataset import read_landmarks

from ops_fleet import start_worker as _start_worker, stop as _stop, wait as _wait  # noqa: E402  (tests/integration helpers)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
UPLOADED, DELETED = "landmarks.photo_uploaded", "landmarks.photo_deleted"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("photos")
    landmarks_dir, csv_path, everyday = write_photo_set(root, n_landmarks=4, photos_per_landmark=2,
                                                       n_everyday=8, seed=7)
    infos = read_landmarks(csv_path)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return {"root": root, "landmarks_dir": landmarks_dir, "infos": infos, "everyday": sorted(everyday.glob("*.jpg"))}


@pytest.fixture(scope="module")
def model_version(photos, engine, milvus_uri, tmp_path_factory) -> str:
    """A random-init tiny model whose gallery is the first photo of each landmark: those photos must
    come back tagged with their own landmark (similarity 1), everything else must not."""
    models = tmp_path_factory.mktemp("models")
    version = f"e2e_{uuid.uuid4().hex[:8]}"
    init_model(models / "init.pt", backbone="tiny", dim=64, size=96, version=version,
               calibrate=photos["root"], seed=1)
    net, meta, _ = load_checkpoint(models / "init.pt")
    embedder = Embedder(models / "init.pt", "cpu")
    items = []
    for info in photos["infos"]:
        first = sorted((photos["landmarks_dir"] / info.slug).glob("*.jpg"))[0]
        emb = embedder.embed(decode_image(first.read_bytes(), size=96, max_pixels=10**8).pixels[None])
        items.append(LandmarkPhotos(info, emb, emb))
    meta.t_geo, meta.t_global, meta.t_ref = 0.99, 0.999, 0.999
    save_checkpoint(models / "model.pt", net, meta, build_gallery(items, min_cluster=1))
    publish_model(models / "model.pt", engine, LandmarkIndex(milvus_uri))
    return version


@pytest.fixture(scope="module")
def fleet_env(photos, database_url, broker_url, milvus_uri, tmp_path_factory) -> dict:
    return {**os.environ, "LANDMARKS_DATABASE_URL": database_url, "LANDMARKS_BROKER_URL": broker_url,
            "LANDMARKS_MILVUS_URI": milvus_uri, "LANDMARKS_FILE_ROOTS": str(photos["root"]),
            "LANDMARKS_QUEUE": f"lm_test_{uuid.uuid4().hex[:8]}", "LANDMARKS_BATCH_SIZE": "8",
            "LANDMARKS_MAX_WAIT_MS": "200", "LANDMARKS_VISIBILITY_TIMEOUT_S": "10",
            "LANDMARKS_HOME": str(tmp_path_factory.mktemp("home")), "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def producer(fleet_env):
    """What the upload pipeline runs: a plain Celery client that knows only the task names."""
    app = Celery(broker=fleet_env["LANDMARKS_BROKER_URL"])
    app.conf.update(task_serializer="json", broker_transport_options={"visibility_timeout": 10})
    yield lambda name, event: app.send_task(name, args=[event], queue=fleet_env["LANDMARKS_QUEUE"])
    app.close()


def _event(user: str, path: Path, gps: tuple[float, float] | None = None) -> dict:
    event = {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": uuid.uuid4().hex[:12],
             "uri": path.as_uri(), "uploaded_at": "2026-11-26T10:00:00Z", "unknown_field": "ignored"}
    if gps:
        event["gps"] = {"lat": gps[0], "lon": gps[1]}
    return event


def _dump(engine, user: str) -> dict:
    with engine.connect() as conn:
        return {table: sorted(map(tuple, conn.execute(sa.text(
            f"SELECT * FROM {table} WHERE user_id = :u"), {"u": user}).all()), key=repr)
            for table in ("photos", "photo_tags", "failures", "processed_events", "album_photos")}


def _processed(engine, user: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM processed_events WHERE user_id = :u"),
                            {"u": user}).scalar_one()


def _drained(fleet_env) -> bool:
    return queue_backlog(fleet_env["LANDMARKS_BROKER_URL"], fleet_env["LANDMARKS_QUEUE"])["backlog"] == 0


def _cli(env: dict, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_events_become_tags_albums_and_survive_redelivery_and_deletion(
        photos, model_version, fleet_env, engine, producer, tmp_path):
    user = f"alice_{uuid.uuid4().hex[:6]}"
    infos = photos["infos"]
    firsts = [sorted((photos["landmarks_dir"] / i.slug).glob("*.jpg"))[0] for i in infos]
    far_copy = photos["root"] / "far_away.jpg"
    shutil.copy(firsts[1], far_copy)

    expected_tags = {}
    events = []
    for info, path in zip(infos, firsts):
        gps = (info.lat, info.lon) if info.id == infos[0].id else None  # one with GPS, the rest without
        event = _event(user, path, gps)
        events.append(event)
        expected_tags[event["photo_id"]] = (info.id, "geo" if gps else "reference")
    far = _event(user, far_copy, (infos[1].lat + 1.0, infos[1].lon))  # right pixels, 111 km away
    everyday = [_event(user, p) for p in photos["everyday"]]
    broken = _event(user, photos["root"] / "broken.jpg")
    outside = _event(user, Path("/etc/hostname"))
    malformed = {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": "no-uri"}
    events += [far, *everyday, broken, outside]

    # Backlog is visible before any worker runs: an autoscaler would start one now.
    for event in events + [malformed]:
        producer(UPLOADED, event)
    assert _cli(fleet_env, "queue", "--json")["backlog"] == len(events) + 1

    worker = _start_worker(fleet_env, tmp_path / "worker.log")
    try:
        _wait(lambda: _processed(engine, user) == len(events), "all events processed", worker=worker)
        _wait(lambda: _drained(fleet_env), "queue drained", worker=worker)

        with transaction(engine) as session:
            reports = {e["photo_id"]: photo_report(session, user, e["photo_id"]) for e in events}
            cities = attractions(session, user)
        for photo_id, (landmark_id, method) in expected_tags.items():
            report = reports[photo_id]
            assert report["status"] == "tagged"
            assert report["tags"][0]["landmark_id"] == landmark_id
            assert report["tags"][0]["method"] == method
            assert report["tags"][0]["score"] > 0.99
        assert reports[far["photo_id"]]["status"] == "no_landmark"  # the geo filter ruled it out
        assert all(reports[e["photo_id"]]["status"] == "no_landmark" for e in everyday)
        assert reports[broken["photo_id"]]["status"] == "failed"
        assert "corrupt" in reports[broken["photo_id"]]["failure"] or "image" in reports[broken["photo_id"]]["failure"]
        assert reports[outside["photo_id"]]["status"] == "failed"
        assert "root" in reports[outside["photo_id"]]["failure"]
        with engine.connect() as conn:
            reason = conn.execute(sa.text("SELECT reason FROM failures WHERE event_id = :e"),
                                  {"e": malformed["event_id"]}).scalar_one()
        assert "uri" in reason and "uploaded_at" in reason

        album = {(c.city, lm.landmark_id): lm.photo_count for c in cities for lm in c.landmarks}
        assert album == {(i.city, i.id): 1 for i in infos}
        assert _cli(fleet_env, "albums", "--user", user, "--json")["cities"]
        assert _cli(fleet_env, "photo", events[0]["photo_id"], "--user", user, "--json")["status"] == "tagged"

        before = _dump(engine, user)
        for event in events + [malformed]:
            producer(UPLOADED, event)  # redelivery of every event, malformed one included
        time.sleep(1)
        _wait(lambda: _drained(fleet_env), "redelivered events consumed", worker=worker)
        assert _dump(engine, user) == before

        gone = events[1]
        producer(DELETED, {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": gone["photo_id"]})
        _wait(lambda: _cli(fleet_env, "photo", gone["photo_id"], "--user", user, "--json")["status"] == "deleted",
              "photo deleted", worker=worker)
        producer(UPLOADED, gone)  # a late redelivery of its upload must not bring it back
        _wait(lambda: _drained(fleet_env), "late upload consumed", worker=worker)
        with transaction(engine) as session:
            assert photo_report(session, user, gone["photo_id"])["tags"] == []
            remaining = {lm.landmark_id for c in attractions(session, user) for lm in c.landmarks}
        assert expected_tags[gone["photo_id"]][0] not in remaining
    finally:
        _stop(worker)


def test_worker_killed_mid_batch_loses_nothing_and_writes_nothing_twice(
        photos, model_version, fleet_env, engine, producer, tmp_path):
    user = f"bob_{uuid.uuid4().hex[:6]}"
    paths = [p for i in photos["infos"] for p in sorted((photos["landmarks_dir"] / i.slug).glob("*.jpg"))]
    paths += photos["everyday"]
    # Enough batches of 8 that a starved poll on a busy machine still catches the worker mid-stream.
    events = [_event(user, paths[k % len(paths)]) for k in range(480)]
    for event in events:
        producer(UPLOADED, event)

    log = tmp_path / "worker.log"
    worker = _start_worker(fleet_env, log)
    try:
        _wait(lambda: _processed(engine, user) > 0, "a first batch", worker=worker)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        killed_at = _processed(engine, user)
        assert killed_at < len(events), "the worker finished before it could be killed"
        # Reserved-but-unacknowledged events come back after the visibility timeout (10 s here).
        worker = _start_worker(fleet_env, log)
        _wait(lambda: _processed(engine, user) == len(events), "every event after the restart",
              timeout_s=300, worker=worker)
        _wait(lambda: _drained(fleet_env), "queue drained", worker=worker)
    finally:
        _stop(worker)
    with engine.connect() as conn:
        photos_written = conn.execute(sa.text("SELECT count(*) FROM photos WHERE user_id = :u"), {"u": user}).scalar_one()
        statuses = set(conn.execute(sa.text("SELECT DISTINCT status FROM photos WHERE user_id = :u"), {"u": user}).scalars())
    assert photos_written == len(events)
    assert statuses <= {"tagged", "no_landmark"}


def test_a_version_published_while_the_worker_runs_takes_over_at_the_next_batch(
        photos, model_version, fleet_env, engine, milvus_uri, producer, tmp_path):
    import dataclasses
    user = f"carol_{uuid.uuid4().hex[:6]}"
    first = sorted((photos["landmarks_dir"] / photos["infos"][0].slug).glob("*.jpg"))[0]
    worker = _start_worker(fleet_env, tmp_path / "worker.log")
    try:
        before = _event(user, first)
        producer(UPLOADED, before)
        _wait(lambda: _processed(engine, user) == 1, "the first event", worker=worker)
        # Before its first batch, the worker ran the model once on each of its two batch threads, and measured
        # its forward: a light model, so one torch thread per 4 cores.
        assert (f"model {model_version} loaded, warmed up on 2 batch threads; torch threads per forward: "
                f"{default_torch_threads()}") in (tmp_path / "worker.log").read_text()

        with engine.connect() as conn:
            checkpoint = conn.execute(sa.text("SELECT checkpoint FROM model_versions WHERE version = :v"),
                                      {"v": model_version}).scalar_one()
        net, meta, gallery = load_checkpoint(Path(checkpoint))
        new_version = f"{model_version}_v2"
        save_checkpoint(tmp_path / "v2.pt", net, dataclasses.replace(meta, version=new_version), gallery)
        publish_model(tmp_path / "v2.pt", engine, LandmarkIndex(milvus_uri))  # the worker keeps running

        after = _event(user, first)
        producer(UPLOADED, after)
        _wait(lambda: _processed(engine, user) == 2, "the second event", worker=worker)
    finally:
        _stop(worker)
        publish_model(Path(checkpoint), engine, LandmarkIndex(milvus_uri))  # back to the module's version
    with engine.connect() as conn:
        versions = dict(conn.execute(sa.text("SELECT photo_id, model_version FROM photos WHERE user_id = :u"),
                                     {"u": user}).all())
        tag_versions = dict(conn.execute(sa.text("SELECT photo_id, model_version FROM photo_tags WHERE user_id = :u"),
                                         {"u": user}).all())
    assert versions == {before["photo_id"]: model_version, after["photo_id"]: new_version}
    assert tag_versions == versions  # each photo's tags carry the version that decided it
