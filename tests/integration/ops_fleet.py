"""Helpers shared by the operations tests (metrics/health, rollout/backfill): a photo set, tiny models
whose galleries are the photos themselves, a real `landmarks worker` subprocess and a plain producer."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from shared.embedder import Embedder
from shared.gallery import LandmarkPhotos, build_gallery
from shared.imaging import decode_image
from shared.model import load_checkpoint, save_checkpoint
from shared.modelinit import init_model
from shared.synthetic import write_photo_set
from shared.training.dataset import read_landmarks

UPLOADED, DELETED = "landmarks.photo_uploaded", "landmarks.photo_deleted"


def wait(predicate, what: str, timeout_s: float = 180.0, worker: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if worker is not None and worker.poll() is not None:
            raise AssertionError(f"worker exited with {worker.returncode} while waiting for {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processed(engine, user: str) -> int:
    """Events of ``user`` committed so far (processed_events)."""
    import sqlalchemy as sa
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM processed_events WHERE user_id = :u"),
                            {"u": user}).scalar_one()


def photo_set(root: Path, n_landmarks: int = 3, n_everyday: int = 3) -> dict:
    landmarks_dir, csv_path, everyday = write_photo_set(root, n_landmarks=n_landmarks, photos_per_landmark=2,
                                                       n_everyday=n_everyday, seed=11)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    infos = read_landmarks(csv_path)
    firsts = [sorted((landmarks_dir / i.slug).glob("*.jpg"))[0] for i in infos]
    return {"root": root, "infos": infos, "firsts": firsts, "everyday": sorted(everyday.glob("*.jpg")),
            "broken": root / "broken.jpg"}


def build_model(photos: dict, out: Path, version: str, landmarks: slice = slice(None)) -> Path:
    """A random-init tiny model whose gallery is the first photo of each landmark in ``landmarks``:
    those photos come back tagged with their own landmark (similarity 1), nothing else does."""
    out.mkdir(parents=True, exist_ok=True)
    init_model(out / f"{version}_init.pt", backbone="tiny", dim=64, size=96, version=version,
               calibrate=photos["root"], seed=1)
    net, meta, _ = load_checkpoint(out / f"{version}_init.pt")
    embedder = Embedder(out / f"{version}_init.pt", "cpu")
    items = []
    for info, first in list(zip(photos["infos"], photos["firsts"]))[landmarks]:
        emb = embedder.embed(decode_image(first.read_bytes(), size=96, max_pixels=10**8).pixels[None])
        items.append(LandmarkPhotos(info, emb, emb))
    meta = dataclasses.replace(meta, t_geo=0.99, t_global=0.999, t_ref=0.999)
    save_checkpoint(out / f"{version}.pt", net, meta, build_gallery(items, min_cluster=1))
    return out / f"{version}.pt"


def publish_tiny_model(photos: dict, engine, milvus_uri: str, out: Path, prefix: str) -> str:
    """``build_model`` under a fresh version name ``PREFIX_xxxxxxxx``, published and active; its version."""
    from shared.index import LandmarkIndex
    from shared.publish import publish_model
    version = f"{prefix}_{uuid.uuid4().hex[:8]}"
    publish_model(build_model(photos, out, version), engine, LandmarkIndex(milvus_uri))
    return version


def fleet_env(database_url: str, broker_url: str, milvus_uri: str, photos_root: Path, home: Path, **extra) -> dict:
    env = {**os.environ, "LANDMARKS_DATABASE_URL": database_url, "LANDMARKS_BROKER_URL": broker_url,
           "LANDMARKS_MILVUS_URI": milvus_uri, "LANDMARKS_FILE_ROOTS": str(photos_root),
           "LANDMARKS_QUEUE": f"lm_test_{uuid.uuid4().hex[:8]}", "LANDMARKS_BATCH_SIZE": "8",
           "LANDMARKS_MAX_WAIT_MS": "200", "LANDMARKS_VISIBILITY_TIMEOUT_S": "10",
           "LANDMARKS_HOME": str(home), "PYTHONUNBUFFERED": "1", "LANDMARKS_METRICS_PORT": "off"}
    env.pop("LANDMARKS_BACKFILL_QUEUE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_worker(env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--loglevel=INFO"], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def stop(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)


def ops_cli(env: dict, *args: str, check: bool = True) -> tuple[int, dict]:
    """Runs `python -m shared.ops_cli ARGS --json`; returns (exit code, the last line as JSON)."""
    done = subprocess.run([sys.executable, "-m", "shared.ops_cli", *args, "--json"], env=env, capture_output=True,
                          text=True, timeout=180)
    if check and done.returncode != 0:
        raise AssertionError(f"ops_cli {args} exited {done.returncode}: {done.stderr[-2000:]}")
    lines = done.stdout.strip().splitlines()
    return done.returncode, (json.loads(lines[-1]) if lines else {})


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def event(user: str, path: Path, gps: tuple[float, float] | None = None, photo_id: str | None = None) -> dict:
    e = {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": photo_id or uuid.uuid4().hex[:12],
         "uri": path.as_uri(), "uploaded_at": "2026-11-26T10:00:00Z"}
    if gps:
        e["gps"] = {"lat": gps[0], "lon": gps[1]}
    return e


def queued_messages(client, queue: str) -> list[tuple[dict, dict]]:
    """(headers, event) of each message waiting in ``queue``, as kombu's Redis transport stores them."""
    out = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        (event,), _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"], event))
    return out
