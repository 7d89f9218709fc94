"""`landmarks publish MODEL` against real PostgreSQL and Milvus, run again: the same gallery changes nothing,
another gallery under a published version is refused before PostgreSQL is touched, and the leftovers of an
interrupted publish are never served, but repaired by publishing again."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa

from shared import rollout
from shared.index import FILLING, STATE_KEY, IndexVersionError, LandmarkIndex, centroid_collection, reference_collection
from shared.model import load_checkpoint
from shared.publish import activate_version, gallery_rows, publish_model

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
            activate_version(previous, engine, index)  # leave the active version as it was
