"""`landmarks demo`: the main job on the embedded stack, end to end through Celery."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from sqlalchemy import text

from shared.db import migrate
from shared.db.albums import attractions
from shared.db.session import make_engine, transaction
from shared.index import LandmarkIndex
from shared.publish import publish_model
from shared.settings import Settings
from shared.signing import event_signer
from shared.stack import resolve

DEMO_PRESET = "small"


def presets() -> list[str]:
    """The presets a demo runs: those of the world generator that the builder has too."""
    from shared.training.build import PRESETS as BUILD_PRESETS
    from shared.training.world import PRESETS as WORLD_PRESETS
    return [name for name in WORLD_PRESETS if name in BUILD_PRESETS]


def _world(settings: Settings, preset: str, seed: int, console: Console) -> Path:
    from shared.training.world import generate_world
    out = settings.home_path / "worlds" / f"{preset}-{seed}"
    if not (out / "world.json").exists():
        with _progress(console) as progress:
            task = progress.add_task(f"generating the {preset} world (seed {seed})", total=None)
            generate_world(out, seed=seed, preset=preset,
                           progress=lambda done, total: progress.update(task, completed=done, total=total))
    return out


def _model(settings: Settings, world: Path, preset: str, seed: int, console: Console) -> Path:
    """Built once per world; an interrupted build resumes from its stage checkpoints."""
    from shared.training.build import PRESETS, Builder
    out = settings.home_path / "models" / f"{preset}-{seed}.pt"
    if not out.exists():
        with _progress(console) as progress:
            Builder(world, out, PRESETS[preset], progress=progress, version=f"demo_{preset}_{seed}").run()
    return out


def _progress(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


def _start_worker(settings: Settings, roots: list[Path]) -> subprocess.Popen:
    env = {**os.environ, "LANDMARKS_FILE_ROOTS": ":".join(str(r.resolve()) for r in roots),
           "LANDMARKS_HOME": str(settings.home_path)}
    log = open(settings.home_path / "demo-worker.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--loglevel=WARNING"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _pending(engine, photo_ids: set[str]) -> int:
    with transaction(engine) as session:
        done = session.execute(text("SELECT photo_id FROM processed_events WHERE kind = 'uploaded'")).scalars().all()
    return len(photo_ids - set(done))


def _accuracy(engine, truth: dict[str, int | None]) -> dict[str, float]:
    with transaction(engine) as session:
        rows = session.execute(text(
            "SELECT p.photo_id, t.landmark_id FROM photos p LEFT JOIN album_photos t "
            "ON t.user_id = p.user_id AND t.photo_id = p.photo_id AND t.rank = 0 "
            "WHERE p.photo_id = ANY(:ids)"), {"ids": list(truth)}).all()
    got = dict(rows)
    landmark = [got.get(pid) == lid for pid, lid in truth.items() if lid is not None]
    other = [got.get(pid) is None for pid, lid in truth.items() if lid is None]
    return {"tagged_photos": sum(v is not None for v in got.values()),
            "landmark_accuracy": sum(landmark) / max(1, len(landmark)),
            "non_landmark_accuracy": sum(other) / max(1, len(other))}


def run_demo(settings: Settings, console: Console, preset: str = DEMO_PRESET, seed: int = 0) -> dict:
    from shared.cli import print_albums
    from shared.training.dataset import load_dataset
    from workers.app import app as celery_app
    from workers.tasks import UPLOADED

    started = time.monotonic()
    urls = resolve(settings)
    migrate.upgrade(urls.database_url)
    engine, index = make_engine(urls.database_url), LandmarkIndex(urls.milvus_uri)
    world = _world(settings, preset, seed, console)
    model = _model(settings, world, preset, seed, console)
    meta = publish_model(model, engine, index)
    console.print(f"published model {meta.version}")

    archive = load_dataset(world).archives
    worker = _start_worker(settings, [world])
    try:
        truth = {}
        sign = event_signer(settings)
        for photo in archive:
            event = _event(photo)
            truth[event["photo_id"]] = photo.landmark_id
            celery_app.send_task(UPLOADED, args=[sign(event)])
        _wait(engine, set(truth), console, worker)
        metrics = _accuracy(engine, truth)
    finally:
        worker.terminate()
        worker.wait(60)
    user = archive[0].user_id
    with transaction(engine) as session:
        print_albums(user, [asdict(c) for c in attractions(session, user)])
    return {"photos": len(truth), "landmark_photos": sum(v is not None for v in truth.values()),
            **metrics, "model_version": meta.version, "users": len({p.user_id for p in archive}),
            "album_user": user, "world": str(world),
            "seconds": round(time.monotonic() - started, 1)}


def _event(photo) -> dict:
    """The upload pipeline's event for one archive photo; ids are stable so a rerun is a redelivery."""
    photo_id = uuid.uuid5(uuid.NAMESPACE_URL, str(photo.path)).hex
    return {"event_id": f"demo-{photo_id}", "user_id": photo.user_id, "photo_id": photo_id,
            "uri": photo.path.as_uri(), "uploaded_at": datetime.now(timezone.utc).isoformat()}


def _wait(engine, photo_ids: set[str], console: Console, worker: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    with _progress(console) as progress:
        bar = progress.add_task("recognising uploads", total=len(photo_ids))
        while (left := _pending(engine, photo_ids)) > 0:
            progress.update(bar, completed=len(photo_ids) - left)
            if worker.poll() is not None:
                raise RuntimeError("the worker exited; see demo-worker.log under LANDMARKS_HOME")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left} photos still pending after {timeout_s:.0f}s")
            time.sleep(0.5)
        progress.update(bar, completed=len(photo_ids))
