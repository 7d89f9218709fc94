"""`landmarks build` on a hand-made folder of a few dozen photos: what it refuses before training, when it
resumes from its stage checkpoints, the size it stores photos at, empty curriculum stages, and the figures
it leaves for `landmarks publish`."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
import torch
from PIL import Image

from shared.local_index import LocalIndex
from shared.model import load_checkpoint
from shared.publish import gallery_rows, model_metrics
from shared.training import build
from shared.training.build import PRESETS, Builder, fingerprint
from shared.training.dataset import load_dataset
from shared.training.evaluate import evaluate

TINY = replace(PRESETS["tiny"], min_cluster=2)
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40)]
PER_LANDMARK = {"train": 8, "references": 3, "val": 2, "test": 2}
NON_LANDMARKS = {"train": 10, "val": 12, "test": 12}


def _photo(path: Path, colour, rng: np.random.Generator) -> None:
    """A landmark's colour with stripes at its own frequency and noise; grey noise for a non-landmark."""
    base = np.array(colour if colour is not None else (128, 128, 128), np.float32)
    stripes = np.sin(np.arange(128) / (3 + (sum(base) % 7)))[None, :, None] * 40 if colour is not None else 0
    pixels = base + stripes + rng.normal(0, 25, (128, 128, 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def make_world(root: Path, regions=(1, 2, 3, 4), refs_per_landmark: int = 3) -> Path:
    """One landmark per entry of `regions`, in that region; train, references, val and test photos."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    _write(root / "landmarks.csv", ["id", "slug", "name", "city", "country", "region", "lat", "lon"],
           [[k + 1, f"lm{k + 1}", f"Landmark {k + 1}", "Paris", "France", r, 48.85 + k / 100, 2.35]
            for k, r in enumerate(regions)])
    counts = {**PER_LANDMARK, "references": refs_per_landmark}
    for split, per_landmark in counts.items():
        rows = []
        for k in range(len(regions)):
            for j in range(per_landmark):
                _photo(root / split / f"lm{k + 1}_{j}.jpg", COLOURS[k], rng)
                rows.append([f"{split}/lm{k + 1}_{j}.jpg", k + 1])
        for j in range(NON_LANDMARKS.get(split, 0)):
            _photo(root / split / f"other_{j}.jpg", None, rng)
            rows.append([f"{split}/other_{j}.jpg", ""])
        _write(root / f"{split}.csv", ["path", "landmark_id"], rows)
    return root


@pytest.fixture
def world(tmp_path) -> Path:
    return make_world(tmp_path / "world")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("built")
    world = make_world(root / "world")
    Builder(world, root / "model.pt", TINY, version="unit_build").run()
    return world, root / "model.pt"


def _rewrite_csv(path: Path, change) -> None:
    rows = list(csv.reader(path.open()))
    _write(path, rows[0], change(rows[1:]))


# --- refused before training (1, 6) ------------------------------------------------------------------

def test_a_build_without_validation_non_landmarks_fails_before_training(world, tmp_path):
    (world / "val.csv").unlink()
    with pytest.raises(ValueError, match=r"val\.csv with non-landmark photos .* is needed .*; it is missing"):
        Builder(world, tmp_path / "m.pt", TINY)
    assert not (tmp_path / "m.pt.work").exists()  # nothing was started
    _write(world / "val.csv", ["path", "landmark_id"], [["val/lm1_0.jpg", 1]])
    with pytest.raises(ValueError, match=r"it has none"):
        Builder(world, tmp_path / "m.pt", TINY)


def test_cleaning_without_enough_references_is_refused_before_training(tmp_path):
    world = make_world(tmp_path / "world", refs_per_landmark=1)
    with pytest.raises(ValueError, match=r"cleaning needs two or more landmarks with at least two reference"):
        Builder(world, tmp_path / "m.pt", TINY)
    Builder(world, tmp_path / "m.pt", replace(TINY, clean=False))  # the no_cleaning ablation can build


# --- resuming only from the same inputs (2) ----------------------------------------------------------

def _stages(world: Path, out: Path, cfg=TINY) -> Builder:
    builder = Builder(world, out, cfg, version="unit_stages")
    builder.load_training_data()
    builder.run_stages()
    return builder


def test_a_rebuild_with_the_same_inputs_resumes_every_stage(world, tmp_path, caplog):
    first = _stages(world, tmp_path / "m.pt")
    with caplog.at_level(logging.INFO, logger="shared.training.build"):
        again = _stages(world, tmp_path / "m.pt")
    assert sum("resumed from" in r.getMessage() for r in caplog.records) == 4
    assert [s["epochs"] for s in again.report["stages"]] == [s["epochs"] for s in first.report["stages"]]
    for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values()):
        assert torch.equal(a, b)


def test_an_ablation_rebuilt_to_the_same_out_is_trained_not_resumed(world, tmp_path, caplog):
    full = _stages(world, tmp_path / "m.pt")
    assert any(s["cleaning"] for s in full.report["stages"])
    with caplog.at_level(logging.WARNING, logger="shared.training.build"):
        ablation = _stages(world, tmp_path / "m.pt", replace(TINY, clean=False))
    assert all(s["cleaning"] == [] for s in ablation.report["stages"])  # really built without cleaning
    assert ablation.keep.all()
    assert any("stage 1: not resuming" in r.getMessage() and "config" in r.getMessage() for r in caplog.records)


def test_changed_labels_with_the_same_row_count_retrain(world, tmp_path, caplog):
    first = _stages(world, tmp_path / "m.pt")
    _rewrite_csv(world / "train.csv", lambda rows: [[p, {"1": "2", "2": "1"}.get(lid, lid)] for p, lid in rows])
    with caplog.at_level(logging.WARNING, logger="shared.training.build"):
        second = _stages(world, tmp_path / "m.pt")
    assert any("not resuming" in r.getMessage() and "dataset" in r.getMessage() for r in caplog.records)
    assert not np.array_equal(first.train_labels, second.train_labels)
    weights = [not torch.equal(a, b) for a, b in zip(first.net.state_dict().values(), second.net.state_dict().values())]
    assert any(weights)  # trained on the new labels, not the old checkpoint


def test_fewer_training_photos_rebuild_to_the_same_out(world, tmp_path):
    Builder(world, tmp_path / "m.pt", TINY, version="before").run()
    _rewrite_csv(world / "train.csv", lambda rows: rows[:-3])  # three non-landmark photos fewer
    meta = Builder(world, tmp_path / "m.pt", TINY, version="after").run()  # was an IndexError in gallery()
    assert meta.extra["build"]["stages"][0]["photos"] > 0


def test_the_fingerprint_tells_the_dataset_the_config_and_the_init_weights_apart(world, tmp_path):
    data = load_dataset(world)
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"conv1.weight": torch.zeros(2)}, a)
    torch.save({"conv1.weight": torch.ones(2)}, b)
    base = fingerprint(data, TINY, a)
    assert fingerprint(data, TINY, a) == base
    changed = lambda other: {k for k in base if other[k] != base[k]}  # noqa: E731
    assert changed(fingerprint(data, TINY, b)) == {"init"}
    assert changed(fingerprint(data, TINY, None)) == {"init"}
    assert changed(fingerprint(data, replace(TINY, curriculum=False), a)) == {"config"}
    assert changed(fingerprint(data, replace(TINY, train=replace(TINY.train, center_weight=0.0)), a)) == {"config"}
    assert changed(fingerprint(data, replace(TINY, target_accuracy=0.9), a)) == set()  # calibration only
    _rewrite_csv(world / "references.csv", lambda rows: rows[1:])
    assert changed(fingerprint(load_dataset(world), TINY, a)) == {"dataset"}


def test_a_photo_replaced_under_the_same_name_changes_the_dataset_fingerprint(world):
    data = load_dataset(world)
    before = fingerprint(data, TINY, None)
    photo = data.train[0].path
    other = next(p.path for p in data.train if p.path.read_bytes() != photo.read_bytes())
    photo.write_bytes(other.read_bytes())  # no csv changes: only the pixels behind the name
    assert fingerprint(load_dataset(world), TINY, None)["dataset"] != before["dataset"]


# --- stored size (4) ---------------------------------------------------------------------------------

def test_training_and_reference_photos_are_stored_at_least_at_the_input_size(world, tmp_path):
    large = replace(TINY, train=replace(TINY.train, input_size=160))
    builder = Builder(world, tmp_path / "m.pt", large)
    builder.load_training_data()
    assert builder.train_pixels.shape[1:3] == (160, 160)  # as val, test and live photos are decoded
    assert builder.ref_pixels.shape[1:3] == (160, 160)
    small = Builder(world, tmp_path / "s.pt", TINY)  # input 64: kept at 112 for random crops
    small.load_training_data()
    assert small.train_pixels.shape[1:3] == (112, 112)


# --- empty curriculum stages (8) ---------------------------------------------------------------------

def test_an_empty_first_region_is_skipped_and_never_cleaned_with_an_untrained_network(tmp_path, caplog):
    world = make_world(tmp_path / "world", regions=(2, 2, 3, 4))
    with caplog.at_level(logging.WARNING, logger="shared.training.build"):
        builder = _stages(world, tmp_path / "m.pt")
    stages = builder.report["stages"]
    assert stages[0]["skipped"] and stages[0]["photos"] == 0 and stages[0]["epochs"] == []
    assert stages[1]["cleaning"] == []  # stage 2 is the first to train: nothing to clean with yet
    assert [c["regions"] for c in stages[2]["cleaning"]] == [[2, 3]]  # with stage 2's network
    assert [c["regions"] for c in stages[3]["cleaning"]] == [[4]]
    assert any("stage 1: skipped" in r.getMessage() for r in caplog.records)


def test_regions_that_no_trained_stage_follows_are_reported_uncleaned(tmp_path, caplog):
    world = make_world(tmp_path / "world", regions=(4, 4, 4))
    with caplog.at_level(logging.WARNING, logger="shared.training.build"):
        builder = _stages(world, tmp_path / "m.pt")
    assert [bool(s.get("skipped")) for s in builder.report["stages"]] == [True, True, True, False]
    assert all(s["cleaning"] == [] for s in builder.report["stages"])
    assert builder.report["uncleaned_regions"] == [4]
    assert any("were not cleaned" in r.getMessage() for r in caplog.records)


# --- the built model: figures for publish (9) and evaluation without a frequent column (7) ------------

def test_the_build_stores_its_validation_figures_for_publish(built):
    _, model = built
    _, meta, _ = load_checkpoint(model)
    metrics = model_metrics(meta)
    assert metrics["validation"]["n_non_landmark_photos"] == NON_LANDMARKS["val"]
    assert metrics["validation"]["n_landmark_photos"] == 4 * PER_LANDMARK["val"]
    assert 0.0 <= metrics["validation"]["non_landmark_accuracy"] <= 1.0
    assert metrics["calibration"]["t_global"] == meta.t_global and metrics["target_accuracy"] == TINY.target_accuracy


def test_evaluation_without_a_frequent_column_derives_rare_landmarks_from_training_counts(built, tmp_path):
    world, model = built
    (world / "world.json").write_text('{"frequent_threshold": 8}')  # 8 train photos each: none frequent
    try:
        _, meta, gallery = load_checkpoint(model)
        index = LocalIndex(meta.version, *gallery_rows(gallery))
        metrics = evaluate(world, model, index)
        assert metrics["rare_accuracy"] is not None and metrics["frequent_accuracy"] is None
        (world / "world.json").write_text('{"frequent_threshold": 7}')  # more than 7: all frequent
        metrics = evaluate(world, model, index)
        assert metrics["frequent_accuracy"] is not None and metrics["rare_accuracy"] is None
    finally:
        (world / "world.json").unlink()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_evaluation_runs_the_forward_at_the_workers_precision_and_says_so(built, monkeypatch, precision):
    from shared.settings import get_settings
    world, model = built
    _, meta, gallery = load_checkpoint(model)
    monkeypatch.setenv("LANDMARKS_PRECISION", precision)
    get_settings.cache_clear()
    try:
        metrics = evaluate(world, model, LocalIndex(meta.version, *gallery_rows(gallery)))
    finally:
        get_settings.cache_clear()  # monkeypatch puts the variable back after the test
    assert metrics["precision"] == precision


# --- unreadable inputs: checkpoints, photos, init weights, test photos in the report -------------------

def test_a_truncated_stage_checkpoint_is_trained_afresh_with_a_warning(world, tmp_path, caplog):
    """A stage file cut short (a full disk, an interrupted copy) broke the build folder for good."""
    _stages(world, tmp_path / "m.pt")
    work = tmp_path / "m.pt.work"
    with (work / "stage2.pt").open("r+b") as handle:
        handle.truncate(1000)
    with caplog.at_level(logging.INFO, logger="shared.training.build"):
        again = _stages(world, tmp_path / "m.pt")
    messages = [r.getMessage() for r in caplog.records]
    assert any("stage 1: resumed" in m for m in messages)
    assert any("stage 2: not resuming" in m and "cannot be read" in m and "training it afresh" in m for m in messages)
    assert len(again.report["stages"]) == 4
    torch.load(work / "stage2.pt", weights_only=True)  # written again, whole
    assert not list(work.glob("*.tmp"))  # written aside and renamed


def _unreadable(*paths: Path) -> None:
    for path in paths:
        path.write_bytes(b"not a photo")


def test_a_landmark_without_a_readable_reference_photo_is_refused_naming_it(world, tmp_path):
    """Published with no references, it could never be tagged on a photo without GPS."""
    _unreadable(*(world / "references").glob("lm2_*.jpg"))
    with pytest.raises(ValueError, match=r"references\.csv: 1 landmark\(s\) have no readable reference photo: "
                                         r"2 \(lm2\);"):
        Builder(world, tmp_path / "m.pt", TINY).run()
    assert not (tmp_path / "m.pt").exists()


def test_landmarks_left_without_training_photos_are_named_in_one_warning(world, tmp_path, caplog):
    _unreadable(*(world / "train").glob("lm3_*.jpg"), world / "references" / "lm1_0.jpg", world / "val" / "lm1_0.jpg")
    with caplog.at_level(logging.WARNING, logger="shared.training.build"):
        meta = Builder(world, tmp_path / "m.pt", TINY, version="unit_reference_only").run()
    messages = [r.getMessage() for r in caplog.records]
    reference_only = [m for m in messages if "their reference photos only" in m]
    assert len(reference_only) == 1 and reference_only[0].startswith("1 landmark(s)") and "3 (lm3)" in reference_only[0]
    assert sum("unreadable training photo" in m for m in messages) == PER_LANDMARK["train"]
    assert any("unreadable reference photo" in m and "lm1_0.jpg" in m for m in messages)
    assert any("unreadable validation photo" in m and "lm1_0.jpg" in m for m in messages)
    assert 3 in load_checkpoint(tmp_path / "m.pt")[2]["centroids"]["landmark_ids"].tolist()
    assert meta.extra["build"]["centroids"]["landmarks"] == 4


def test_init_weights_for_another_backbone_are_refused_and_a_partial_fit_is_a_warning(world, tmp_path, caplog):
    tiny_stem = {"conv1.weight": torch.ones(32, 3, 3, 3),  # the tiny trunk's first conv and BatchNorm
                 **{f"bn1.{name}": torch.ones(32) for name in ("weight", "bias", "running_mean", "running_var")}}
    torch.save(tiny_stem, tmp_path / "stem.pth")
    with caplog.at_level(logging.WARNING, logger="shared.training.build"):
        builder = Builder(world, tmp_path / "m.pt", TINY, init=tmp_path / "stem.pth")
    assert any("19 of 24 tensors left as initialised" in r.getMessage() for r in caplog.records)
    assert torch.equal(builder.net.trunk[0].weight, tiny_stem["conv1.weight"])
    torch.save({"conv1.weight": torch.ones(64, 3, 7, 7), "fc.weight": torch.ones(10, 512)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth: only 0 of the 24 tensors of backbone 'tiny' match"):
        Builder(world, tmp_path / "m.pt", TINY, init=tmp_path / "resnet.pth")


def test_the_report_skips_an_unreadable_test_photo(built, tmp_path):
    from shared.training.report import write_report
    world, model = built
    photo = world / "test" / "lm1_0.jpg"
    original = photo.read_bytes()
    photo.write_bytes(b"not a photo")
    try:
        write_report(tmp_path / "report.html", world, model, {})
    finally:
        photo.write_bytes(original)
    page = (tmp_path / "report.html").read_text()
    assert page.count("<figure>") == 4 * PER_LANDMARK["test"] - 1  # every readable landmark test photo


# --- the CLI: one line and exit status 2, never a traceback -------------------------------------------

def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("command", ["build", "world"])
def test_an_unknown_preset_lists_the_presets(command, tmp_path):
    world = ["--world", tmp_path] if command == "build" else []
    done = _cli(command, *world, "--out", tmp_path / "out", "--preset", "huge")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    said = " ".join(done.stderr.replace("│", " ").split())  # click's error box wraps at the terminal width
    assert "Invalid value for '--preset': unknown preset 'huge': choose one of tiny, small, medium" in said


def test_a_build_that_fails_after_its_checks_is_one_line(world, tmp_path):
    """The checks before training pass (train.csv has landmark rows), but none of those photos decodes."""
    _unreadable(*(world / "train").glob("lm*.jpg"))
    done = _cli("build", "--world", world, "--out", tmp_path / "m.pt", "--preset", "tiny")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("build: ") and "no stage had landmark photos" in last


def test_a_build_that_cannot_write_its_model_is_one_line(world, tmp_path):
    (tmp_path / "models").write_text("a file where the engineer meant a folder")
    done = _cli("build", "--world", world, "--out", tmp_path / "models" / "m.pt", "--preset", "tiny")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == f"build: [Errno 20] Not a directory: '{tmp_path / 'models' / 'm.pt.work'}'"


@pytest.mark.parametrize("case, message", [
    ("ablation_format", "--ablation-model 'foo': expected NAME=MODEL"),
    ("ablation_missing", "no model file"),
    ("not_a_model", "is not a readable landmarks model checkpoint"),
    ("bad_dataset", "landmarks.csv: missing file"),
    ("no_gallery", "has no gallery"),
])
def test_eval_errors_are_one_line(built, tmp_path, case, message):
    from shared.modelinit import init_model
    world, model = built
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    if case == "no_gallery":  # what `landmarks model init` writes
        init_model(tmp_path / "init.pt", backbone="resnet_small", dim=32, size=64, version=None, calibrate=None)
    report = ["--report", tmp_path / "r.html"]
    args = {"ablation_format": ["--world", world, "--model", model, *report, "--ablation-model", "foo"],
            "ablation_missing": ["--world", world, "--model", model, *report, "--ablation-model",
                                 f"no={tmp_path / 'missing.pt'}"],
            "not_a_model": ["--world", world, "--model", tmp_path / "bad.pt"],
            "bad_dataset": ["--world", tmp_path / "empty", "--model", model],
            "no_gallery": ["--world", world, "--model", tmp_path / "init.pt"]}[case]
    done = _cli("eval", "--local", *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    said = done.stderr[done.stderr.index("eval: "):]  # after what the progress bar left
    assert message in said.splitlines()[0]
    assert not (tmp_path / "r.html").exists()


def test_training_photos_are_decoded_on_every_cpu_the_process_may_use(monkeypatch, tmp_path):
    """A training machine's cores all decode (a GPU box has 16 or more; the loader once kept to 4), and no
    more decodes run at once than there are CPUs to run them."""
    rng = np.random.default_rng(0)
    paths = [tmp_path / f"{k}.jpg" for k in range(24)]
    for path in paths:
        _photo(path, COLOURS[0], rng)
    running, most = [], []
    real_decode = build.decode_image

    def counted(data, **kwargs):
        running.append(1)
        most.append(len(running))
        time.sleep(0.1)  # long enough for every thread to be in a decode at once
        running.pop()
        return real_decode(data, **kwargs)

    monkeypatch.setattr(build, "decode_image", counted)
    monkeypatch.setattr(build, "usable_cpus", lambda: 6)
    images = build.load_images(paths, 64)
    assert images.ok.all() and images.pixels.shape == (24, 64, 64, 3)
    assert max(most) == 6


def test_a_training_heic_is_decoded_on_one_core(monkeypatch, tmp_path):
    """The loader already runs a decode on every core: libheif's own threads for a HEIC's tiles (four; 1.6-1.7
    cores busy on this photo) would only take turns with the other decodes."""
    monkeypatch.setattr(pillow_heif.options, "DECODE_THREADS", 4)  # as a new process has it
    path = tmp_path / "phone.heic"
    pixels = np.random.default_rng(5).integers(0, 256, (1024, 1536, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "HEIF", quality=50, tile_size=512)  # 3x2 tiles, as a phone
    build.load_images([path], 64, threads=1)  # warm: libheif's decoder set up
    wall, cpu = time.perf_counter(), time.process_time()
    images = build.load_images([path] * 3, 64, threads=1)
    cores = (time.process_time() - cpu) / (time.perf_counter() - wall)
    assert images.ok.all()
    assert cores < 1.3, f"a decode kept {cores:.1f} cores busy"
