"""`landmarks publish MODEL` against real PostgreSQL and Milvus, run again: the same gallery changes nothing,
another gallery under a published version is refused before PostgreSQL is touched, and the leftovers of an
interrupted publish are never served, but repaired by publishing again. Other thresholds under a published
version are refused too, and a file that is not a model is one line from the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from shared import rollout
from shared.index import (
    FILLING,
    STATE_KEY,
    Hit,
    IndexVersionError,
    LandmarkIndex,
    centroid_collection,
    reference_collection,
)
from shared.model import load_checkpoint, save_checkpoint
from shared.publish import gallery_rows, publish_model
from shared.recognition import geo_tag
from shared.runtime import load_model_runtime
from shared.training.calibrate import float32_above

import ops_fleet as fleet

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    return fleet.photo_set(tmp_path_factory.mktemp("photos"), n_landmarks=3, n_everyday=1)


@pytest.fixture(scope="module")
def index(milvus_uri):
    with LandmarkIndex(milvus_uri) as idx:
        yield idx


def _registered(engine, version: str) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT checkpoint, is_active FROM model_versions WHERE version = :v"),
                           {"v": version}).mappings().first()
    return dict(row) if row else None


def _version(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def test_publishing_the_same_model_again_changes_nothing(photos, engine, index, tmp_path, caplog):
    version = _version("pv_same")
    model = fleet.build_model(photos, tmp_path, version)
    publish_model(model, engine, index, activate=False)
    stored = index._stored(version)
    with caplog.at_level(logging.INFO, logger="shared.index"):
        publish_model(model, engine, index, activate=False)
    assert any("already published with this gallery" in r.getMessage() for r in caplog.records)
    assert index._stored(version) == stored and stored.complete and stored.fingerprint
    assert _registered(engine, version)["checkpoint"] == str(model.resolve())


def test_another_gallery_under_a_published_version_is_refused_before_postgresql(photos, engine, index, tmp_path):
    """`landmarks build --version V` run twice, the second model published: PostgreSQL would point at the new
    weights while Milvus keeps the old gallery."""
    version = _version("pv_other")
    first = fleet.build_model(photos, tmp_path / "first", version, slice(0, 2))
    publish_model(first, engine, index, activate=False)
    second = fleet.build_model(photos, tmp_path / "second", version)  # one landmark more
    active = index.active_version()
    with pytest.raises(IndexVersionError, match="another gallery.*new version"):
        publish_model(second, engine, index)
    assert _registered(engine, version) == {"checkpoint": str(first.resolve()), "is_active": False}
    assert index.active_version() == active
    assert index.holds(version, *gallery_rows(load_checkpoint(first)[2]))


def test_the_cli_refuses_another_gallery_in_one_line(photos, engine, index, database_url, broker_url, milvus_uri,
                                                     tmp_path):
    version = _version("pv_cli")
    first = fleet.build_model(photos, tmp_path / "first", version, slice(0, 2))
    publish_model(first, engine, index, activate=False)
    second = fleet.build_model(photos, tmp_path / "second", version)
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home")
    done = subprocess.run([sys.executable, "-m", "shared.cli", "publish", str(second), "--json"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert not answer["ok"] and "another gallery" in answer["error"] and "--version NEW" in answer["error"]
    assert _registered(engine, version)["checkpoint"] == str(first.resolve())


def test_publishing_an_older_model_again_does_not_roll_the_fleet_back(photos, engine, index, database_url,
                                                                    broker_url, milvus_uri, tmp_path):
    """deploy/README's bootstrap step `landmarks publish /models/v1.pt`, run again once v2 is active: v1 is
    already published, so it changes nothing and says how to switch; publishing v2 again keeps it active."""
    older, newer = _version("pv_old"), _version("pv_new")
    old_model = fleet.build_model(photos, tmp_path / "old", older)
    new_model = fleet.build_model(photos, tmp_path / "new", newer)
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home")

    def publish(model: Path, *flags: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "shared.cli", "publish", str(model), "--json", *flags],
                              env=env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    before = index.active_version()
    try:  # --force: other tests' photos in the albums have not been through these models
        assert publish(old_model, "--force")["active"] and publish(new_model, "--force")["active"]
        again = publish(old_model)
        assert not again["active"] and f"landmarks promote {older}" in again["note"]
        assert (_registered(engine, newer)["is_active"], index.active_version()) == (True, newer)
        assert publish(new_model)["active"] and index.active_version() == newer
    finally:
        if before is not None:
            rollout.promote(before, engine, index, force=True)


def test_an_interrupted_publish_is_never_served_and_publishing_again_repairs_it(photos, engine, index, tmp_path,
                                                                               caplog):
    """Both collections left marked as filling, as a publish killed before its last step leaves them (a real
    SIGKILL mid-insert: tests/integration/test_index.py)."""
    version = _version("pv_killed")
    model = fleet.build_model(photos, tmp_path, version)
    publish_model(model, engine, index, activate=False)
    for name in (centroid_collection(version), reference_collection(version)):
        index.client.alter_collection_properties(name, {STATE_KEY: FILLING})
    with pytest.raises(rollout.RolloutError, match="interrupted publish"):
        rollout.promote(version, engine, index)
    with pytest.raises(rollout.RolloutError, match="interrupted publish"):
        rollout.start_shadow(version, 0.1, engine, index)
    assert not {v["version"]: v for v in rollout.versions(engine, index)}[version]["in_milvus"]

    previous = index.active_version()
    with caplog.at_level(logging.WARNING, logger="shared.index"):
        publish_model(model, engine, index)  # what the operator re-runs
    try:
        assert any("incomplete" in r.getMessage() for r in caplog.records)
        assert index.active_version() == version and _registered(engine, version)["is_active"]
        assert index.holds(version, *gallery_rows(load_checkpoint(model)[2]))
    finally:
        if previous is not None and _registered(engine, previous):
            rollout.activate(previous, engine, index)  # leave the active version as it was


def _thresholds(engine, version: str) -> tuple[float, float, float]:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text("SELECT t_geo, t_global, t_ref FROM model_versions WHERE version = :v"),
                                  {"v": version}).one())


def _recalibrated(model: Path, out: Path, **thresholds) -> Path:
    """The same network and gallery with other thresholds (the build re-run on another validation split)."""
    net, meta, gallery = load_checkpoint(model)
    save_checkpoint(out, net, dataclasses.replace(meta, **thresholds), gallery)
    return out


def test_other_thresholds_under_a_published_version_are_refused(photos, engine, index, tmp_path):
    """Running workers keep the thresholds they loaded, restarted ones would read the new ones: under one
    version name, the fleet would tag with two sets."""
    version = _version("pv_thresholds")
    model = fleet.build_model(photos, tmp_path, version)
    publish_model(model, engine, index, activate=False)
    before = _thresholds(engine, version)
    recalibrated = _recalibrated(model, tmp_path / "recalibrated.pt", t_global=0.3, t_ref=0.3)
    with pytest.raises(IndexVersionError, match=r"other settings \(t_global 0\.999 -> 0\.3, t_ref 0\.999 -> 0\.3\).*"
                                                "new version"):
        publish_model(recalibrated, engine, index, activate=False)
    assert _thresholds(engine, version) == before
    assert _registered(engine, version)["checkpoint"] == str(model.resolve())
    publish_model(_recalibrated(model, tmp_path / "copy.pt"), engine, index, activate=False)  # same: accepted


def test_a_worker_decides_at_the_thresholds_calibration_chose(photos, engine, index, tmp_path):
    """PostgreSQL keeps them as REAL and returns their shortest decimal form; the worker gets back the exact
    float32 values calibration chose (shared/training/calibrate.py), so a score equal to one is decided as there."""
    version = _version("pv_real")
    chosen = {"t_geo": float32_above(0.1), "t_global": float32_above(0.7), "t_ref": float32_above(0.3)}
    model = _recalibrated(fleet.build_model(photos, tmp_path, version), tmp_path / "calibrated.pt", **chosen)
    publish_model(model, engine, index, activate=False)
    runtime = load_model_runtime(engine, version, "cpu")
    assert dataclasses.asdict(runtime.thresholds) == chosen
    assert geo_tag(Hit(1, 0, chosen["t_geo"]), runtime.thresholds.t_geo)  # a score at the threshold reaches it


@pytest.mark.parametrize("content", [b"", b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"],
                         ids=["empty", "lfs_pointer"])
def test_the_cli_refuses_a_file_that_is_not_a_model_in_one_line(photos, database_url, broker_url, milvus_uri,
                                                                 tmp_path, content):
    model = tmp_path / "model.pt"
    model.write_bytes(content)
    env = fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path / "home")
    done = subprocess.run([sys.executable, "-m", "shared.cli", "publish", str(model), "--json"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert not answer["ok"] and answer["error"].startswith(f"{model} is not a readable landmarks model checkpoint")


def test_publishing_another_name_under_a_landmark_id_says_so(photos, engine, index, tmp_path, caplog):
    """Landmark ids are one catalogue for all versions: a second version that reuses an id for another name
    renames it in every user's albums. Allowed (catalogue fixes), but never silently."""
    first = fleet.build_model(photos, tmp_path / "first", _version("pv_names"))
    publish_model(first, engine, index, activate=False)
    renamed = [dataclasses.replace(photos["infos"][0], name="Another Landmark", city="Elsewhere"),
               *photos["infos"][1:]]
    second = fleet.build_model({**photos, "infos": renamed}, tmp_path / "second", _version("pv_names"))
    old, lid = photos["infos"][0], photos["infos"][0].id
    expected = f"{lid}: {old.name} ({old.city}, {old.country}) → Another Landmark (Elsewhere, {old.country})"
    try:
        with caplog.at_level(logging.WARNING, logger="shared.publish"):
            meta = publish_model(second, engine, index, activate=False)
        assert meta.extra["catalogue_changes"] == {"count": 1, "changes": [expected]}
        assert any("renamed or moved 1 landmark(s)" in r.getMessage() and expected in r.getMessage()
                   for r in caplog.records if r.levelno == logging.WARNING)
    finally:
        restored = publish_model(first, engine, index, activate=False)  # the catalogue the other tests expect
    assert restored.extra["catalogue_changes"]["count"] == 1
    assert publish_model(first, engine, index, activate=False).extra["catalogue_changes"] == {"count": 0,
                                                                                              "changes": []}
