"""PhotoLoader: a batch's photos fetched and decoded in a pool of processes (the default) or threads,
with the same results either way, and a decoder process that dies costing one photo, not the worker."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared import fetch
from shared.errors import Stage
from shared.imaging import decode_image
from shared.loading import Loaded, LoadRequest, PhotoLoader, load_photo
from shared.logs import JsonFormatter
from shared.outcomes import Failure
from shared.settings import Settings

POISON = "poison"


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (320, 240)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    return [_jpeg(tmp_path / f"p{i}.jpg", i) for i in range(12)]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(file_roots=str(tmp_path))


def _dies_on_poison(request: LoadRequest, settings: Settings) -> Loaded:
    """Stands for a codec that crashes the process on a hostile file (runs in a pool process)."""
    if POISON in request.uri:
        os._exit(139)
    return load_photo(request, settings)


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_pool_decodes_like_the_decoder_and_reports_bad_photos(kind, photos, settings, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    uris = [p.as_uri() for p in photos] + [corrupt.as_uri(), (tmp_path / "missing.jpg").as_uri()]
    loader = PhotoLoader(settings, kind=kind, workers=2)
    try:
        results = loader.load([LoadRequest(uri, 64) for uri in uris])
    finally:
        loader.close()
    assert len(results) == len(uris)
    for path, result in zip(photos, results):
        expected = decode_image(path.read_bytes(), size=64, max_pixels=settings.max_image_pixels)
        assert np.array_equal(result.image.pixels, expected.pixels)
        assert (result.image.width, result.image.height) == (320, 240)
    assert isinstance(results[-2].image, Failure) and results[-2].image.stage == Stage.DECODE
    assert isinstance(results[-1].image, Failure) and results[-1].image.stage == Stage.FETCH


def test_the_extra_size_comes_from_the_same_fetch(photos, settings):
    loader = PhotoLoader(settings, workers=2)
    try:
        plain, both = loader.load([LoadRequest(photos[0].as_uri(), 64),
                                   LoadRequest(photos[0].as_uri(), 64, extra_size=32)])
    finally:
        loader.close()
    assert plain.extra_pixels is None
    assert both.image.pixels.shape == (64, 64, 3) and both.extra_pixels.shape == (32, 32, 3)


def test_a_dying_decoder_process_fails_its_photo_and_the_pool_recovers(photos, settings, tmp_path):
    poison = _jpeg(tmp_path / f"{POISON}.jpg", 99)
    loader = PhotoLoader(settings, kind="processes", workers=2, load=_dies_on_poison)
    try:
        uris = [p.as_uri() for p in photos[:5]] + [poison.as_uri()] + [p.as_uri() for p in photos[5:]]
        results = loader.load([LoadRequest(uri, 64) for uri in uris])
        failed = [i for i, r in enumerate(results) if isinstance(r.image, Failure)]
        assert failed == [5]
        assert results[5].image.stage == Stage.DECODE and "decoder process died" in results[5].image.reason
        # The next batch runs on a fresh pool.
        again = loader.load([LoadRequest(p.as_uri(), 64) for p in photos])
        assert not any(isinstance(r.image, Failure) for r in again)
    finally:
        loader.close()


@pytest.fixture
def loading_log() -> io.StringIO:
    """shared.loading's lines as the worker's JSON log writes them."""
    out, logger = io.StringIO(), logging.getLogger("shared.loading")
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    yield out
    logger.removeHandler(handler)


def test_the_line_about_a_dying_decoder_shows_no_password_nor_signature(photos, settings, loading_log):
    uri = f"https://svc:Hunter2Password@photos.example.com/u1/{POISON}.jpg?X-Amz-Signature=SIGNATURE123"
    loader = PhotoLoader(settings, kind="processes", workers=1, load=_dies_on_poison)
    try:
        results = loader.load([LoadRequest(photos[0].as_uri(), 64), LoadRequest(uri, 64)])
    finally:
        loader.close()
    assert isinstance(results[1].image, Failure)
    lines = [json.loads(line) for line in loading_log.getvalue().splitlines()]
    died = [line for line in lines if "decoder process died" in line["msg"]]
    assert len(died) == 1 and "photos.example.com/u1/poison.jpg?X-Amz-Signature=***" in died[0]["msg"]
    assert "Hunter2Password" not in loading_log.getvalue() and "SIGNATURE123" not in loading_log.getvalue()


def test_the_line_about_a_dying_decoder_names_the_event_and_photo(photos, settings, tmp_path, loading_log):
    """An on-call searching a complaint's photo_id finds why its photo failed."""
    poison = _jpeg(tmp_path / f"{POISON}.jpg", 99)
    loader = PhotoLoader(settings, kind="processes", workers=1, load=_dies_on_poison)
    try:
        loader.load([LoadRequest(photos[0].as_uri(), 64, event_id="ev-fine", photo_id="photo-fine"),
                     LoadRequest(poison.as_uri(), 64, event_id="ev-poison", photo_id="photo-poison")])
    finally:
        loader.close()
    lines = [json.loads(line) for line in loading_log.getvalue().splitlines()]
    died = [line for line in lines if "decoder process died" in line["msg"]]
    assert [(line["event_id"], line["photo_id"]) for line in died] == [("ev-poison", "photo-poison")]
    assert not any(line.get("photo_id") == "photo-fine" for line in lines)


def _slowly_dies_on_poison(request: LoadRequest, settings: Settings) -> Loaded:
    """_dies_on_poison taking its time over each photo, so that two batches' photos are in the pool together
    when the poison kills its process."""
    time.sleep(0.15 if POISON in request.uri else 0.1)
    return _dies_on_poison(request, settings)


def test_a_crash_in_one_batch_fails_no_photo_of_the_batch_beside_it(photos, settings, tmp_path):
    """Two batches in flight share the pool: after the crash both load their photos again one by one, and
    when the poison kills a process again, the other batch's photo in the pool then is not its culprit."""
    poison = _jpeg(tmp_path / f"{POISON}.jpg", 99)
    loader = PhotoLoader(settings, kind="processes", workers=2, load=_slowly_dies_on_poison)
    with_poison = [LoadRequest(p.as_uri(), 64) for p in photos[:3]] + [LoadRequest(poison.as_uri(), 64)]
    beside = [LoadRequest(p.as_uri(), 64) for p in photos]
    try:
        for _ in range(3):  # a race: each round is another chance to lose it
            pending = loader.submit(with_poison)
            time.sleep(0.05)
            with ThreadPoolExecutor(1) as other_batch:
                beside_results = other_batch.submit(loader.load, beside)
                results = pending.result()
                failed_beside = [i for i, r in enumerate(beside_results.result()) if isinstance(r.image, Failure)]
            assert [i for i, r in enumerate(results) if isinstance(r.image, Failure)] == [3]
            assert "decoder process died" in results[3].image.reason
            assert failed_beside == []
    finally:
        loader.close()


def test_processes_never_import_torch(settings, photos):
    """The pool processes stay small: no torch (0.5 GB each), no CUDA."""
    loader = PhotoLoader(settings, kind="processes", workers=1)
    try:
        [loaded] = loader.load([LoadRequest(photos[0].as_uri(), 64)])
        assert not isinstance(loaded.image, Failure)
        assert loader._pool.submit(_imported, "torch").result() is False
    finally:
        loader.close()


@pytest.mark.parametrize("kind", ["processes", "threads"])
@pytest.mark.parametrize("fmt, params", [("HEIF", {"quality": 50, "tile_size": 512}),  # 3x2 tiles, as a phone
                                         ("AVIF", {"quality": 50, "speed": 8})])
def test_the_pool_decodes_each_photo_on_one_core(kind, fmt, params, settings):
    """One decode per core already: libheif's threads for a HEIC's tiles (4 by default; 1.6-1.7 cores busy on
    this photo) or the AVIF decoder's (one per core) would only take turns on the cores, and the real photos
    cost about an eighth more CPU."""
    buffer = io.BytesIO()
    pixels = np.random.default_rng(5).integers(0, 256, (1024, 1536, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, fmt, **params)
    loader = PhotoLoader(settings, kind=kind, workers=2)
    try:
        cores = loader._pool.submit(_cores_busy_decoding, buffer.getvalue()).result()
    finally:
        loader.close()
    assert cores < 1.3, f"a decode kept {cores:.1f} cores busy"


def _cores_busy_decoding(data: bytes) -> float:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(3):
        decode_image(data, size=64, max_pixels=10**8)
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def test_a_run_of_costly_photos_is_shared_by_the_processes(settings):
    """A phone's burst of HEICs side by side in a batch (each 50-70 JPEGs' worth of CPU): dealt out one photo
    to each task in turn, every process takes its share of them, instead of one process decoding the whole
    burst while the others wait for the batch's last task. The results still come back in request order."""
    loader = PhotoLoader(settings, kind="processes", workers=2, load=_which_process)
    burst = [LoadRequest(f"file:///burst/{k}.heic", 64) for k in range(4)]
    rest = [LoadRequest(f"file:///rest/{k}.jpg", 64) for k in range(4)]
    try:
        loader.load(burst[:2])  # both processes started
        results = loader.load(burst + rest)
    finally:
        loader.close()
    where = [result.image.reason.split() for result in results]
    assert [uri for uri, _ in where] == [request.uri for request in burst + rest]
    assert len({pid for _, pid in where[:4]}) == 2


def _which_process(request: LoadRequest, settings: Settings) -> Loaded:
    time.sleep(0.05)  # each task long enough for the other process to take the next one
    return Loaded(Failure(Stage.DECODE, f"{request.uri} {os.getpid()}"))


def _imported(module: str) -> bool:
    import sys
    return module in sys.modules


def _memory_fetcher(uri: str, settings: Settings) -> bytes:
    return Path(uri.removeprefix("mem://")).read_bytes()


def test_fetchers_plugged_in_by_the_worker_reach_the_processes(settings, photos, monkeypatch):
    monkeypatch.setitem(fetch.FETCHERS, "mem", _memory_fetcher)
    loader = PhotoLoader(settings, kind="processes", workers=1)
    try:
        [loaded] = loader.load([LoadRequest(f"mem://{photos[0]}", 64)])
    finally:
        loader.close()
    assert not isinstance(loaded.image, Failure)


def test_an_unpicklable_fetcher_keeps_decoding_in_threads(settings, photos, monkeypatch):
    monkeypatch.setitem(fetch.FETCHERS, "mem", lambda uri, s: Path(uri.removeprefix("mem://")).read_bytes())
    loader = PhotoLoader(settings, kind="processes", workers=1)
    try:
        assert loader.kind == "threads"
        [loaded] = loader.load([LoadRequest(f"mem://{photos[0]}", 64)])
    finally:
        loader.close()
    assert not isinstance(loaded.image, Failure)


OWNER = """
import sys
from pathlib import Path
from shared.loading import LoadRequest, PhotoLoader
from shared.settings import Settings
photo = Path(sys.argv[1])
loader = PhotoLoader(Settings(file_roots=str(photo.parent)), kind="processes", workers=2)
loader.load([LoadRequest(photo.as_uri(), 64)] * 4)
print(" ".join(str(p) for p in loader._pool._processes), flush=True)
sys.stdin.read()
"""


def test_pool_processes_exit_when_their_owner_is_killed(photos):
    """A SIGKILLed worker cannot shut its pool down: the pool's processes go on their own."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(photos[0])], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        owner.kill()
        owner.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_an_unknown_pool_kind_is_refused(settings):
    with pytest.raises(ValueError, match="decode pool"):
        PhotoLoader(settings, kind="fibers")


def test_a_batch_is_shared_out_one_task_per_process():
    """Each task is a round trip the worker's own process pays for: as few as keep every process busy."""
    from shared.loading import HEADERS_PER_TASK, MAX_PHOTOS_PER_TASK, photos_per_task
    decodes = [LoadRequest(f"file:///p{i}.jpg", 224) for i in range(64)]
    headers = [LoadRequest(f"file:///p{i}.jpg", 224, device_jpeg=True) for i in range(200)]
    assert photos_per_task(decodes, 2) == 32  # 2 tasks, one for each of the 2 processes
    assert photos_per_task(decodes, 16) == 4  # 16 tasks, not 64 of one photo
    assert photos_per_task(decodes[:3], 16) == 1
    assert photos_per_task(decodes * 4, 2) == MAX_PHOTOS_PER_TASK  # 256 on 2 cores: results stay bounded
    assert photos_per_task(headers, 16) == 13  # 16 tasks of header reads, each a fetch and a parse
    assert photos_per_task(headers[:40], 16) == HEADERS_PER_TASK  # a header read is too little work alone
    assert photos_per_task(headers[:40] + decodes[:1], 16) == 3  # mixed: shared out as decodes


# --- how many decode workers: the CPUs the pod may use, not the node's ----------------------------

def _node_with_192_threads(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(192)), raising=False)


def _cgroup(tmp_path: Path, monkeypatch, files: dict[str, str]) -> Path:
    """A fake /sys/fs/cgroup holding ``files`` (relative path: content), used by default from now on."""
    from shared import cpus
    root = tmp_path / "cgroup"
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(content + "\n")
    root.mkdir(exist_ok=True)
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "400000 100000"}, 4),  # cgroup v2, a limit of 4 CPUs
    ({"cpu.max": "150000 100000"}, 2),  # 1.5 CPUs: rounded up
    ({"cpu.max": "50000 100000"}, 1),
    ({"cpu.max": "max 100000"}, 192),  # no limit: the CPUs of its affinity
    ({"cpu/cpu.cfs_quota_us": "600000", "cpu/cpu.cfs_period_us": "100000"}, 6),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 192),
    ({}, 192),  # no cgroup files readable
])
def test_usable_cpus_is_the_affinity_capped_by_the_cgroup_limit(tmp_path, monkeypatch, files, expected):
    from shared.cpus import usable_cpus
    _node_with_192_threads(monkeypatch)
    assert usable_cpus(_cgroup(tmp_path, monkeypatch, files)) == expected


def test_usable_cpus_follows_the_affinity(tmp_path, monkeypatch):
    from shared.cpus import usable_cpus
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7}, raising=False)
    assert usable_cpus(_cgroup(tmp_path, monkeypatch, {"cpu.max": "800000 100000"})) == 3


def test_a_pod_limited_to_4_cpus_on_a_192_thread_node_decodes_in_4_processes(tmp_path, monkeypatch):
    _node_with_192_threads(monkeypatch)
    _cgroup(tmp_path, monkeypatch, {"cpu.max": "400000 100000"})
    for decode_workers, expected in ((0, 4), (7, 7)):  # a setting still wins
        loader = PhotoLoader(Settings(file_roots=str(tmp_path), decode_workers=decode_workers), kind="threads")
        try:
            assert loader.workers == expected
        finally:
            loader.close()
