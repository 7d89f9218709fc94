"""The offline pipeline on a tiny generated world and on the real photos: build (cleaning, curriculum,
centroids, calibration), resume, and evaluation through Milvus equal to exact local search."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared.index import LandmarkIndex
from shared.local_index import LocalIndex
from shared.model import load_checkpoint
from shared.publish import gallery_rows
from shared.training.build import PRESETS, Builder
from shared.training.evaluate import evaluate
from shared.training.world import generate_world

pytestmark = [pytest.mark.integration, pytest.mark.slow]
METRIC_KEYS = {"landmark_accuracy", "landmark_top1_accuracy", "landmark_several_tags_rate", "non_landmark_accuracy", "frequent_accuracy", "rare_accuracy",
               "gps_landmark_accuracy", "no_gps_landmark_accuracy", "gps_non_landmark_accuracy",
               "no_gps_non_landmark_accuracy", "closed_set_accuracy", "pixel_baseline_closed_set_accuracy",
               "n_landmark_photos", "n_non_landmark_photos"}


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, seed=11, preset="tiny")
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model") / "tiny.pt"
    Builder(tiny_world, out, PRESETS["tiny"], version="tiny_world_model").run()
    return out


def test_build_writes_a_model_with_gallery_thresholds_and_report(tiny_model, tiny_world):
    _, meta, gallery = load_checkpoint(tiny_model)
    n_landmarks = sum(1 for _ in csv.DictReader((tiny_world / "landmarks.csv").open()))
    assert len(gallery["landmarks"]) == n_landmarks
    assert set(gallery["centroids"]["landmark_ids"].tolist()) == {lm["id"] for lm in gallery["landmarks"]}
    assert all(np.isfinite([meta.t_geo, meta.t_global, meta.t_ref]))
    report = meta.extra["build"]
    assert [s["stage"] for s in report["stages"]] == [1, 2, 3, 4]
    assert [s["regions"] for s in report["stages"]] == [[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]]  # the curriculum
    cleaning = [c for s in report["stages"] for c in s["cleaning"]]
    assert sorted(r for c in cleaning for r in c["regions"]) == [1, 2, 3, 4]  # every region cleaned once
    assert all(c["precision"] is not None and c["recall"] is not None for c in cleaning)
    assert 0.0 <= report["centroids"]["share_with_several"] <= 1.0
    assert report["calibration"]["photos"] > 0
    validation = meta.extra["metrics"]["validation"]  # what `landmarks publish` records
    assert METRIC_KEYS - {"closed_set_accuracy", "pixel_baseline_closed_set_accuracy"} <= set(validation)
    assert validation["n_non_landmark_photos"] == 400 and validation["rare_accuracy"] is not None
    assert validation["landmark_accuracy"] <= validation["landmark_top1_accuracy"]


def test_an_interrupted_build_resumes_from_its_stage_checkpoints(tiny_world, tiny_model, tmp_path):
    work = tiny_model.with_name(tiny_model.name + ".work")
    out = tmp_path / "again.pt"
    out.with_name(out.name + ".work").mkdir()
    for stage in (1, 2, 3):  # as if the build died during stage 4
        (out.with_name(out.name + ".work") / f"stage{stage}.pt").write_bytes((work / f"stage{stage}.pt").read_bytes())
    builder = Builder(tiny_world, out, PRESETS["tiny"], version="tiny_resumed")
    builder.run()
    stages = builder.report["stages"]
    original = load_checkpoint(tiny_model)[1].extra["build"]["stages"]
    assert [s["epochs"] for s in stages[:3]] == [s["epochs"] for s in original[:3]]  # reused, not retrained


def test_eval_through_milvus_equals_exact_local_search(tiny_world, tiny_model, milvus_uri):
    _, meta, gallery = load_checkpoint(tiny_model)
    milvus = LandmarkIndex(milvus_uri)
    milvus.publish(meta.version, *gallery_rows(gallery))
    through_milvus = evaluate(tiny_world, tiny_model, milvus)
    local = evaluate(tiny_world, tiny_model, LocalIndex(meta.version, *gallery_rows(gallery)))
    assert METRIC_KEYS <= set(through_milvus)
    assert through_milvus == local
    assert through_milvus["n_landmark_photos"] > 0 and through_milvus["n_non_landmark_photos"] > 0
    for key in METRIC_KEYS - {"n_landmark_photos", "n_non_landmark_photos"}:
        assert through_milvus[key] is None or 0.0 <= through_milvus[key] <= 1.0


def _arrange_realdata(realdata: Path, out: Path) -> int:
    """The real photos in the dataset format, read in place (a plumbing test, whatever the accuracy):
    references are each landmark's first two photos, also trained on; a landmark's further photos go in
    turn to validation, test and training, the non-landmarks likewise, so no photo is in two of them.
    Returns the number of validation photos."""
    repo = Path(__file__).resolve().parents[2]
    landmarks = list(csv.DictReader((repo / "deploy/demo/realdata_landmarks.csv").open()))
    with (out / "landmarks.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(landmarks[0]))
        writer.writeheader()
        writer.writerows(landmarks)
    splits = {"train.csv": [], "references.csv": [], "val.csv": [], "test.csv": []}
    for lm in landmarks:
        photos = sorted((realdata / "landmarks" / lm["slug"]).iterdir())
        splits["references.csv"] += [(p, lm["id"]) for p in photos[:2]]
        splits["train.csv"] += [(p, lm["id"]) for p in photos[:2]]
        for k, p in enumerate(photos[2:]):
            splits[("val.csv", "test.csv", "train.csv")[k % 3]].append((p, lm["id"]))
    for k, p in enumerate(sorted((realdata / "nonlandmarks").iterdir())):
        splits[("val.csv", "test.csv", "train.csv")[k % 3]].append((p, ""))
    for name, items in splits.items():
        with (out / name).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "landmark_id"])
            writer.writerows([(str(p), lid) for p, lid in items])
    return len(splits["val.csv"])


def test_build_runs_on_real_photos_arranged_in_the_dataset_format(realdata, tmp_path):
    n_val = _arrange_realdata(realdata, tmp_path)
    cfg = replace(PRESETS["tiny"], min_cluster=3)
    meta = Builder(tmp_path, tmp_path / "real.pt", cfg, version="realdata_tiny").run()
    _, _, gallery = load_checkpoint(tmp_path / "real.pt")
    assert len(gallery["landmarks"]) == 15
    assert meta.extra["build"]["calibration"]["photos"] == n_val
