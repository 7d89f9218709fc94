"""load_dataset: a generated world, and hand-written folders with mistakes (clear messages)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from shared.training.dataset import load_dataset
from shared.training.world import generate_world

LANDMARKS = "id,slug,name,city,country,region,lat,lon,style\n1,tower,Tower,Paris,France,1,48.85,2.29,gothic\n" \
            "2,arch,Arch,Paris,France,1,48.87,2.29,\n"


def _folder(tmp_path: Path, **files: str) -> Path:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    base = {"landmarks.csv": LANDMARKS, "train.csv": "path,landmark_id\na.jpg,1\nb.jpg,\n",
            "references.csv": "path,landmark_id\na.jpg,1\nb.jpg,2\n"}
    base.update({k.replace("_csv", ".csv"): v for k, v in files.items()})
    for name, text in base.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_generated_world_loads(tmp_path):
    generate_world(tmp_path, seed=11, preset="tiny")
    data = load_dataset(tmp_path)
    assert len(data.landmarks) == 12 and data.meta["preset"] == "tiny"
    assert all(p.path.is_absolute() and p.path.exists() for p in data.train[:50])
    assert any(p.landmark_id is None for p in data.train)
    assert {p.extra["dirty_kind"] for p in data.train} >= {"", "neighbour", "generic", "non_landmark"}
    assert sum(p.landmark_id is not None for p in data.test) == 60 and len(data.val) == 460
    assert data.archives and data.archives[0].user_id == "1"
    lm = next(iter(data.landmarks.values()))
    assert lm.extra["kind"] and 3 <= len(data.references_of(lm.id)) <= 5


def test_hand_written_folder(tmp_path):
    root = _folder(tmp_path, train_csv=f"path,landmark_id\na.jpg,1\n{tmp_path / 'b.jpg'},\n\n")
    data = load_dataset(root)
    assert data.landmarks[1].extra == {"style": "gothic"} and data.landmarks[2].region == 1
    assert [p.landmark_id for p in data.train] == [1, None]
    assert data.train[1].path == tmp_path / "b.jpg"
    assert data.val == [] and data.archives == [] and data.meta == {}


@pytest.mark.parametrize("files, message", [
    ({"train_csv": "path,landmark_id\na.jpg,7\n"}, r"train\.csv:2: unknown landmark id 7"),
    ({"train_csv": "path,landmark_id\na.jpg,1\nmissing.jpg,2\n"}, r"train\.csv:3: photo file not found"),
    ({"train_csv": "path,label\na.jpg,1\n"}, r"train\.csv:1: missing column\(s\) landmark_id"),
    ({"references_csv": "path,landmark_id\na.jpg,\n"}, r"references\.csv:2: landmark_id is required"),
    ({"train_csv": "path,landmark_id\na.jpg,one\n"}, r"train\.csv:2: landmark_id must be an integer"),
    ({"landmarks_csv": LANDMARKS + "1,x,X,Rome,Italy,1,41.9,12.5,\n"}, r"landmarks\.csv:4: duplicate landmark id 1"),
    ({"landmarks_csv": LANDMARKS + "3,x,X,Rome,Italy,5,41.9,12.5,\n"}, r"landmarks\.csv:4: region must be 1–4"),
    ({"landmarks_csv": LANDMARKS + "3,x,X,Rome,Italy,1,91,12.5,\n"}, r"landmarks\.csv:4: lat must be within"),
    ({"landmarks_csv": LANDMARKS + "3,tower,X,Rome,Italy,1,41,12.5,\n"}, r"landmarks\.csv:4: duplicate slug"),
    ({"test_csv": "path,landmark_id\nb.jpg,\na.jpg,1,extra\n"}, r"test\.csv:3: wrong number of fields"),
    ({"archives_csv": "user_id,path,landmark_id\n,a.jpg,\n"}, r"archives\.csv:2: empty user_id"),
])
def test_errors_name_file_and_line(tmp_path, files, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(_folder(tmp_path, **files))


def test_missing_required_file(tmp_path):
    root = _folder(tmp_path)
    (root / "references.csv").unlink()
    with pytest.raises(ValueError, match=r"references\.csv: missing file"):
        load_dataset(root)


def test_a_gallery_from_folders_with_a_bad_landmarks_csv_names_its_line(tmp_path):
    """`landmarks model gallery` reads its CSV with the dataset's checks: a clear message naming the file
    and line, exit status 2, and no model written."""
    import subprocess
    import sys
    from shared.modelinit import init_model
    from shared.training.dataset import read_landmarks
    init_model(tmp_path / "m.pt", backbone="tiny", dim=16, size=32, version="v1", calibrate=None)
    (tmp_path / "photos" / "tower").mkdir(parents=True)
    csv_path = tmp_path / "landmarks.csv"
    csv_path.write_text(LANDMARKS.replace("2,arch,Arch,Paris,France,1,48.87", "2,arch,Arch,Paris,France,1,98.87"))
    with pytest.raises(ValueError, match=r"landmarks\.csv:3: lat must be within"):
        read_landmarks(csv_path)
    done = subprocess.run([sys.executable, "-m", "shared.cli", "model", "gallery", "--model", str(tmp_path / "m.pt"),
                           "--landmarks", str(tmp_path / "photos"), "--csv", str(csv_path),
                           "--negatives", str(tmp_path / "photos"), "--out", str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "landmarks.csv:3: lat must be within" in done.stderr
    assert not (tmp_path / "out.pt").exists()
    csv_path.write_text(LANDMARKS)
    assert [(lm.id, lm.slug, lm.region, lm.lat) for lm in read_landmarks(csv_path)] == [(1, "tower", 1, 48.85),
                                                                                       (2, "arch", 1, 48.87)]


@pytest.mark.parametrize("files, message", [
    ({"val_csv": "path,landmark_id\nc.jpg,\n", "test_csv": "path,landmark_id\nd.jpg,1\n./c.jpg,\n"},
     r"test\.csv:3: photo .*c\.jpg is also in val\.csv:2"),
    ({"test_csv": "path,landmark_id\nb.jpg,\n"}, r"test\.csv:2: photo .*b\.jpg is also in train\.csv:3"),
    ({"train_csv": "path,landmark_id\nb.jpg,\n", "val_csv": "path,landmark_id\nsub/../a.jpg,1\n"},
     r"val\.csv:2: photo .*a\.jpg is also in references\.csv:2"),
])
def test_a_photo_in_two_of_training_val_and_test_is_refused(tmp_path, files, message):
    """Thresholds chosen on training photos, or test figures on photos that chose them, are optimistic;
    paths are compared resolved, so ./b.jpg and b.jpg are one photo."""
    (tmp_path / "sub").mkdir()
    for name in ("c.jpg", "d.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    with pytest.raises(ValueError, match=message):
        load_dataset(_folder(tmp_path, **files))


def test_train_and_references_may_share_photos_and_splits_may_be_disjoint(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "c.jpg")
    data = load_dataset(_folder(tmp_path, val_csv="path,landmark_id\nc.jpg,\n"))
    assert data.train[0].path == data.references[0].path and len(data.val) == 1


def test_a_landmark_without_references_is_refused_naming_it(tmp_path):
    """Recognition without GPS verifies a candidate against its references: with none it is never tagged."""
    with pytest.raises(ValueError, match=r"references\.csv: no reference photos for landmark\(s\) 2 \(arch\)"):
        load_dataset(_folder(tmp_path, references_csv="path,landmark_id\na.jpg,1\nb.jpg,1\n"))


def test_frequent_comes_from_the_column_or_else_from_the_training_counts(tmp_path):
    from shared.training.dataset import FREQUENT_THRESHOLD, Photo, frequent_landmarks, is_frequent
    train = "path,landmark_id\n" + "a.jpg,1\n" * 3 + "b.jpg,2\n"
    data = load_dataset(_folder(tmp_path, train_csv=train))
    assert frequent_landmarks(data) == set() and FREQUENT_THRESHOLD == 100  # the article's: > 100 photos
    (tmp_path / "world.json").write_text('{"frequent_threshold": 2}')
    data = load_dataset(tmp_path)
    assert frequent_landmarks(data) == {1}  # 3 photos > 2; landmark 2 has 1
    photo = lambda lid, **extra: Photo(tmp_path / "a.jpg", lid, extra)  # noqa: E731
    assert is_frequent(photo(1), {1}) and not is_frequent(photo(2), {1})
    assert not is_frequent(photo(1, frequent="0"), {1}) and is_frequent(photo(2, frequent="1"), {1})
    assert is_frequent(photo(1, frequent=""), {1})  # an empty value is derived too


def test_a_csv_that_is_not_utf8_is_named(tmp_path):
    root = _folder(tmp_path)
    (root / "landmarks.csv").write_bytes(LANDMARKS.replace("Tower", "Tour é").encode("latin-1"))
    with pytest.raises(ValueError, match=r"landmarks\.csv: not UTF-8 text \(.*\): CSV files must be saved as UTF-8"):
        load_dataset(root)


def test_a_gallery_from_folders_that_match_no_landmark_names_the_folder(tmp_path):
    import subprocess
    import sys
    from shared.modelinit import init_model
    init_model(tmp_path / "m.pt", backbone="tiny", dim=16, size=32, version="v1", calibrate=None)
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "not_a_slug.jpg")  # photos, but in no landmark's folder
    (tmp_path / "landmarks.csv").write_text(LANDMARKS)
    done = subprocess.run([sys.executable, "-m", "shared.cli", "model", "gallery", "--model", str(tmp_path / "m.pt"),
                           "--landmarks", str(tmp_path / "photos"), "--csv", str(tmp_path / "landmarks.csv"),
                           "--negatives", str(tmp_path / "photos"), "--out", str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'photos'}: no landmark folder with readable photos" in done.stderr
    assert not (tmp_path / "out.pt").exists()
