"""`landmarks demo`: the main job on the embedded stack, end to end through Celery."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from sqlalchemy import text

from shared.db import migrate
from shared.db.albums import attractions
from shared.db.session import make_engine, transaction
from shared.gallery import image_files, read_landmarks_csv
from shared.index import LandmarkIndex
from shared.modelinit import gallery_from_folders, init_model
from shared.publish import publish_model
from shared.settings import Settings
from shared.stack import resolve

DEMO_USER = "demo"
REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"


def _photo_set(settings: Settings, console: Console) -> tuple[Path, Path, Path, list[Path]]:
    """Real photos when ../shared/realdata is there, a generated set otherwise."""
    realdata = Path(os.environ.get("LANDMARKS_REALDATA", REALDATA))
    if (realdata / "landmarks").is_dir():
        csv_path = Path(__file__).resolve().parents[1] / "deploy" / "demo" / "realdata_landmarks.csv"
        extra = [realdata / "exif"] if (realdata / "exif").is_dir() else []
        console.print(f"photos: real ({realdata})")
        return realdata / "landmarks", csv_path, realdata / "nonlandmarks", extra
    from shared.synthetic import write_photo_set
    root = settings.home_path / "demo-photos"
    console.print(f"photos: generated under {root} (no real photo folder found)")
    landmarks, csv_path, everyday = write_photo_set(root)
    return landmarks, csv_path, everyday, []


def _start_worker(settings: Settings, roots: list[Path]) -> subprocess.Popen:
    env = {**os.environ, "LANDMARKS_FILE_ROOTS": ":".join(str(r.resolve()) for r in roots),
           "LANDMARKS_HOME": str(settings.home_path)}
    log = open(settings.home_path / "demo-worker.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--loglevel=WARNING"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _pending(engine, user: str, photo_ids: set[str]) -> int:
    with transaction(engine) as session:
        done = session.execute(text("SELECT photo_id FROM photos WHERE user_id = :u AND status <> 'pending'"),
                               {"u": user}).scalars().all()
    return len(photo_ids - set(done))


def _accuracy(engine, truth: dict[str, int | None]) -> dict[str, float]:
    with transaction(engine) as session:
        rows = session.execute(text(
            "SELECT p.photo_id, t.landmark_id FROM photos p LEFT JOIN album_photos t "
            "ON t.user_id = p.user_id AND t.photo_id = p.photo_id AND t.rank = 0 WHERE p.user_id = :u"),
            {"u": DEMO_USER}).all()
    got = dict(rows)
    landmark = [got.get(pid) == lid for pid, lid in truth.items() if lid is not None]
    other = [got.get(pid) is None for pid, lid in truth.items() if lid is None]
    return {"landmark_accuracy": sum(landmark) / max(1, len(landmark)),
            "non_landmark_accuracy": sum(other) / max(1, len(other)),
            "tagged_photos": sum(v is not None for v in got.values())}


def run_demo(settings: Settings, console: Console) -> dict:
    from shared.cli import print_albums, upload_event
    from workers.app import app as celery_app
    from workers.tasks import UPLOADED

    started = time.monotonic()
    urls = resolve(settings)
    migrate.upgrade(urls.database_url)
    engine, index = make_engine(urls.database_url), LandmarkIndex(urls.milvus_uri)
    landmarks_dir, csv_path, negatives_dir, extra = _photo_set(settings, console)

    models = settings.home_path / "models"
    with console.status("model: random-init backbone, BatchNorm set from the photos, gallery, thresholds"):
        init_model(models / "init.pt", backbone="resnet18", dim=256, size=160, version="demo_resnet18",
                   calibrate=negatives_dir, seed=0)
        meta = gallery_from_folders(models / "init.pt", landmarks_dir, csv_path, negatives_dir, models / "demo.pt")
        publish_model(models / "demo.pt", engine, index)
    console.print(f"published model {meta.version}")

    slugs = {info.slug: info.id for info in read_landmarks_csv(csv_path)}
    archive = [(f, slugs.get(f.parent.name)) for f in image_files(landmarks_dir)]
    archive += [(f, None) for root in [negatives_dir, *extra] for f in image_files(root)]
    worker = _start_worker(settings, [landmarks_dir, negatives_dir, *extra])
    try:
        truth = {}
        for path, landmark_id in archive:
            event = upload_event(DEMO_USER, path)
            truth[event["photo_id"]] = landmark_id
            celery_app.send_task(UPLOADED, args=[event])
        _wait(engine, set(truth), console, worker)
        metrics = _accuracy(engine, truth)
    finally:
        worker.terminate()
        worker.wait(60)
    with transaction(engine) as session:
        print_albums(DEMO_USER, [_city(c) for c in attractions(session, DEMO_USER)])
    return {"photos": len(truth), "landmark_photos": sum(v is not None for v in truth.values()),
            **metrics, "model_version": meta.version, "seconds": round(time.monotonic() - started, 1)}


def _city(city) -> dict:
    from dataclasses import asdict
    return asdict(city)


def _wait(engine, photo_ids: set[str], console: Console, worker: subprocess.Popen, timeout_s: float = 900) -> None:
    from rich.progress import Progress
    deadline = time.monotonic() + timeout_s
    with Progress(console=console) as progress:
        bar = progress.add_task("recognising uploads", total=len(photo_ids))
        while (left := _pending(engine, DEMO_USER, photo_ids)) > 0:
            progress.update(bar, completed=len(photo_ids) - left)
            if worker.poll() is not None:
                raise RuntimeError("the worker exited; see demo-worker.log under LANDMARKS_HOME")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left} photos still pending after {timeout_s:.0f}s")
            time.sleep(0.5)
        progress.update(bar, completed=len(photo_ids))
