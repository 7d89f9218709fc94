"""Decode results through shared memory (shared/spill.py): the worker gets what the pipe would have given it,
no file outlives its batch, and a missing, full or cleaned directory falls back to loading through the pipe."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
from concurrent.futures import wait
from pathlib import Path

import numpy as np
from PIL import Image

from shared import spill
from shared.imaging import EncodedJpeg
from shared.loading import LoadRequest, PhotoLoader
from shared.settings import Settings

SIZE = 224  # 150 KB of pixels a photo: every chunk is large enough to spill


def _loader(photos: list[Path], spill_to: str, arena_mb: int | None = 0) -> PhotoLoader:
    """Files per chunk unless ``arena_mb`` (tests/unit/test_arena.py covers the arena)."""
    settings = Settings(file_roots=str(photos[0].parent), decode_spill_dir=spill_to, decode_arena_mb=arena_mb)
    return PhotoLoader(settings, kind="processes", workers=2)


def _requests(photos: list[Path], device_jpeg: bool = False) -> list[LoadRequest]:
    return [LoadRequest(p.as_uri(), SIZE, device_jpeg=device_jpeg) for p in photos]


def _pixels(loaded) -> list[np.ndarray]:
    return [item.image.pixels for item in loaded]


def test_spilled_pixels_equal_the_piped_ones_and_leave_no_file(noisy_photos, spill_dir):
    piped = _loader(noisy_photos, "off")
    spilled = _loader(noisy_photos, str(spill_dir))
    try:
        assert piped.spill_dir is None and spilled.spill_dir == str(spill_dir)
        expected, got = _pixels(piped.load(_requests(noisy_photos))), _pixels(spilled.load(_requests(noisy_photos)))
    finally:
        piped.close()
        spilled.close()
    assert len(got) == len(noisy_photos)
    for a, b in zip(expected, got):
        assert a.shape == (SIZE, SIZE, 3) and np.array_equal(a, b)
    assert all(b.flags.writeable for b in got)  # the pipeline may write into its batch's pixels
    assert list(spill_dir.iterdir()) == []


def test_jpegs_for_a_device_decoder_come_back_whole_as_arrays(noisy_photos, spill_dir):
    loader = _loader(noisy_photos, str(spill_dir))
    try:
        loaded = loader.load(_requests(noisy_photos, device_jpeg=True))
    finally:
        loader.close()
    assert len(loaded) == len(noisy_photos)
    for item, path in zip(loaded, noisy_photos):
        assert isinstance(item.image, EncodedJpeg)
        assert isinstance(item.image.data, np.ndarray) and item.image.data.dtype == np.uint8
        assert item.image.data.tobytes() == path.read_bytes()
        assert (item.image.width, item.image.height) == (400, 300)
        assert Image.open(io.BytesIO(item.image.data)).size == (400, 300)  # what a CPU retry reads
    assert list(spill_dir.iterdir()) == []


def test_a_directory_that_disappears_falls_back_to_the_pipe(noisy_photos, spill_dir):
    loader = _loader(noisy_photos, str(spill_dir))
    try:
        shutil.rmtree(spill_dir)  # the pool processes cannot write their files any more
        got = _pixels(loader.load(_requests(noisy_photos)))
    finally:
        loader.close()
    assert len(got) == len(noisy_photos) and all(p.shape == (SIZE, SIZE, 3) for p in got)


def test_files_removed_before_the_worker_reads_them_are_loaded_again(noisy_photos, spill_dir):
    loader = _loader(noisy_photos, str(spill_dir))
    try:
        expected = _pixels(loader.load(_requests(noisy_photos)))
        pending = loader.submit(_requests(noisy_photos))
        wait(pending._futures)
        files = list(spill_dir.iterdir())
        assert files  # every chunk spilled
        for path in files:  # a clean-up of /dev/shm under a running worker
            path.unlink()
        got = _pixels(pending.result())
    finally:
        loader.close()
    assert len(expected) == len(got) == len(noisy_photos)  # zip below would pass a batch that came back short
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    assert list(spill_dir.iterdir()) == []


def test_files_of_stopped_workers_are_swept_and_a_running_one_keeps_its_own(spill_dir):
    dead = _a_finished_pid()
    stale = spill_dir / f"{spill.PREFIX}{dead}-123-0"
    stale_arena = spill_dir / f"{spill.PREFIX}{dead}-arena-0"
    live = spill_dir / f"{spill.PREFIX}{os.getpid()}-123-0"
    other = spill_dir / "someone-else"
    for path in (stale, stale_arena, live, other):
        path.write_bytes(b"x")
    assert spill.sweep_stale(str(spill_dir)) == 2
    assert not stale.exists() and not stale_arena.exists() and live.exists() and other.exists()
    spill.sweep_own(str(spill_dir), os.getpid())
    assert not live.exists() and other.exists()


def test_files_of_a_predecessor_with_this_workers_pid_are_swept(spill_dir):
    # A container restarted in a fresh pid namespace: the new worker has the old one's pid, and /dev/shm
    # (an emptyDir) kept the old one's arena and spill files.
    old_arena = spill_dir / f"{spill.PREFIX}{os.getpid()}-arena-0"
    old_spill = spill_dir / f"{spill.PREFIX}{os.getpid()}-123-0"
    for path in (old_arena, old_spill):
        path.write_bytes(b"x")
        os.utime(path, ns=(spill._STARTED_NS - 10**9, spill._STARTED_NS - 10**9))
    mine = spill_dir / f"{spill.PREFIX}{os.getpid()}-124-0"  # made since this process started: kept
    mine.write_bytes(b"x")
    assert spill.sweep_stale(str(spill_dir)) == 2
    assert not old_arena.exists() and not old_spill.exists() and mine.exists()


def test_ship_keeps_small_results_on_the_pipe_and_round_trips_large_ones(spill_dir):
    small = [np.arange(10, dtype=np.uint8)]
    assert spill.ship(small, str(spill_dir), os.getpid()) is small
    large = {"pixels": np.arange(200_000, dtype=np.int32).reshape(400, 500), "name": "x"}
    shipped = spill.ship(large, str(spill_dir), os.getpid())
    assert isinstance(shipped, spill.Spilled) and len(list(spill_dir.iterdir())) == 1
    back = spill.unship(shipped)
    assert back["name"] == "x" and np.array_equal(back["pixels"], large["pixels"])
    assert list(spill_dir.iterdir()) == []
    assert spill.ship(large, None, os.getpid()) is large  # spilling off


def test_the_auto_directory_is_shared_memory_or_nothing(tmp_path):
    assert spill.resolve_dir("off") is None and spill.resolve_dir("") is None
    assert spill.resolve_dir(str(tmp_path)) == str(tmp_path)
    assert spill.resolve_dir(str(tmp_path / "missing")) is None
    assert spill.resolve_dir("auto") == (spill.AUTO_DIR if os.access(spill.AUTO_DIR, os.W_OK) else None)


def _a_finished_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
