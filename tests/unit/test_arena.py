"""The decode arena (shared/arena.py): results come through memory that is reused, its blocks come back when
the worker is done with them, a full arena sends chunks to files of their own, and a pool that is replaced
gets a new arena."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from shared import arena as arenas
from shared import loading
from shared import spill
from shared.imaging import EncodedJpeg
from shared.loading import Loaded, LoadRequest, PhotoLoader, load_photo
from shared.outcomes import Failure
from shared.settings import Settings

SIZE = 224  # 150 KB of pixels a photo; 16 photos in chunks of 4 (below): 10 blocks each
POISON = "poison"


@pytest.fixture(autouse=True)
def chunks_of_four(monkeypatch):
    """The block counts below are for chunks of 4 photos (the pool's own rule would make 2 chunks of 8)."""
    monkeypatch.setattr(loading, "MAX_PHOTOS_PER_TASK", 4)


def _loader(photos: list[Path], spill_to: str, arena_mb: int | None, load=load_photo) -> PhotoLoader:
    settings = Settings(file_roots=str(photos[0].parent), decode_spill_dir=spill_to, decode_arena_mb=arena_mb)
    return PhotoLoader(settings, kind="processes", workers=2, load=load)


def _requests(photos: list[Path], device_jpeg: bool = False) -> list[LoadRequest]:
    return [LoadRequest(p.as_uri(), SIZE, device_jpeg=device_jpeg) for p in photos]


def _pixels(loaded) -> list[np.ndarray]:
    return [item.image.pixels for item in loaded]


def _same_pixels(expected: list[np.ndarray], got: list[np.ndarray]) -> bool:
    """Photo by photo, and as many photos: zip alone stops at the shorter list, so a batch that came back
    short (or empty) would pass."""
    return len(expected) == len(got) and all(np.array_equal(a, b) for a, b in zip(expected, got))


def _charged_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_results_come_through_the_arena_and_its_memory_is_reused(noisy_photos, spill_dir):
    piped = _loader(noisy_photos, "off", None)
    loader = _loader(noisy_photos, str(spill_dir), 16)
    try:
        expected = _pixels(piped.load(_requests(noisy_photos)))
        assert len(expected) == len(noisy_photos)
        arena = loader.arena
        assert arena is not None and [p.name for p in spill_dir.iterdir()] == [Path(arena.path).name]
        got = _pixels(loader.load(_requests(noisy_photos)))
        assert [p.name for p in spill_dir.iterdir()] == [Path(arena.path).name]  # no file per chunk
        assert _same_pixels(expected, got)
        assert all(b.flags.writeable for b in got)  # the pipeline may write into its batch's pixels
        assert arena.blocks_taken == 40  # 4 chunks of 10 blocks, held while their pixels are in use
        other = _pixels(loader.load(_requests(noisy_photos[::-1])))  # written elsewhere while those are held
        assert _same_pixels(expected, got)
        assert _same_pixels(expected[::-1], other)
        del other
        charged = _charged_bytes(arena.path)
        del got
        gc.collect()
        assert arena.blocks_taken == 0  # given back with the last array
        for _ in range(3):  # later batches write over the same pages
            again = _pixels(loader.load(_requests(noisy_photos)))
            assert _same_pixels(expected, again)
            del again
        assert _charged_bytes(arena.path) == charged
    finally:
        piped.close()
        loader.close()
    assert list(spill_dir.iterdir()) == []


def test_jpegs_for_a_device_decoder_come_back_whole_from_the_arena(noisy_photos, spill_dir):
    loader = _loader(noisy_photos, str(spill_dir), 16)
    try:
        loaded = loader.load(_requests(noisy_photos, device_jpeg=True))
        assert loader.arena.blocks_taken > 0 and len(loaded) == len(noisy_photos)
        for item, path in zip(loaded, noisy_photos):
            assert isinstance(item.image, EncodedJpeg)
            assert item.image.data.tobytes() == path.read_bytes()
    finally:
        loader.close()


def _handovers() -> dict[str, float]:
    """landmarks_decode_handovers_total by path: what the dashboard shows an SRE."""
    return {path: REGISTRY.get_sample_value("landmarks_decode_handovers_total", {"path": path}) or 0.0
            for path in ("arena", "file", "pipe")}


def _added(before: dict[str, float]) -> dict[str, float]:
    return {path: count - before[path] for path, count in _handovers().items()}


def test_a_full_arena_sends_chunks_to_files_of_their_own_and_the_metric_says_so(noisy_photos, spill_dir):
    piped = _loader(noisy_photos, "off", None)
    loader = _loader(noisy_photos, str(spill_dir), 1)  # 16 blocks: one chunk of 10 at a time
    try:
        before = _handovers()
        got = _pixels(loader.load(_requests(noisy_photos)))
        assert _added(before) == {"arena": 1, "file": 3, "pipe": 0}
        before = _handovers()
        expected = _pixels(piped.load(_requests(noisy_photos)))
        assert _added(before) == {"arena": 0, "file": 0, "pipe": 4} and len(expected) == len(noisy_photos)
    finally:
        piped.close()
        loader.close()
    assert _same_pixels(expected, got)
    assert list(spill_dir.iterdir()) == []


def _dies_on_poison(request: LoadRequest, settings: Settings) -> Loaded:
    """Stands for a codec that crashes its process (runs in a pool process)."""
    if POISON in request.uri:
        os._exit(139)
    return load_photo(request, settings)


def test_a_replaced_pool_gets_a_new_arena_and_the_old_one_goes(noisy_photos, spill_dir, make_jpeg):
    photos = noisy_photos
    poison = make_jpeg(photos[0].parent / f"{POISON}.jpg", 99)
    loader = _loader(noisy_photos, str(spill_dir), 16, load=_dies_on_poison)
    try:
        first = loader.arena
        results = loader.load(_requests(photos[:8] + [poison] + photos[8:]))
        assert len(results) == len(photos) + 1
        assert [i for i, r in enumerate(results) if isinstance(r.image, Failure)] == [8]
        assert loader.arena is not first and not os.path.exists(first.path)
        again = loader.load(_requests(noisy_photos))
        assert len(again) == len(noisy_photos) and not any(isinstance(r.image, Failure) for r in again)
        assert loader.arena.blocks_taken > 0
    finally:
        loader.close()
    assert list(spill_dir.iterdir()) == []


def test_results_that_are_never_read_give_their_blocks_back(spill_dir):
    arena = arenas.Arena(str(spill_dir), 16 * arenas.BLOCK, "test-")
    writer = arenas.ArenaWriter(arena.path, arena.blocks)
    try:
        large = {"pixels": np.arange(100_000, dtype=np.int32)}
        shipped = spill.ship(large, str(spill_dir), os.getpid(), writer)
        assert isinstance(shipped, arenas.InArena) and arena.blocks_taken == 7
        spill.discard(shipped)  # its batch failed
        assert arena.blocks_taken == 0
        back = spill.unship(spill.ship(large, str(spill_dir), os.getpid(), writer))
        assert np.array_equal(back["pixels"], large["pixels"])
    finally:
        arena.close()
    with pytest.raises(spill.SpillLost):  # the arena of a pool that was replaced
        spill.unship(shipped)


def test_blocks_are_taken_from_the_lowest_free_run():
    control = np.array([1, 0, 0, 1, 0, 0, 0, 1], dtype=np.uint8)
    assert arenas.first_free_run(control, 2) == 1
    assert arenas.first_free_run(control, 3) == 4
    assert arenas.first_free_run(control, 4) is None
    assert arenas.first_free_run(control, 9) is None


def test_the_arena_size(tmp_path):
    assert arenas.arena_bytes(0, str(tmp_path)) == 0
    assert arenas.arena_bytes(16, str(tmp_path)) == 16 << 20
    auto = arenas.arena_bytes(None, str(tmp_path))
    assert 0 < auto <= arenas.AUTO_MAX_MB << 20
    assert arenas.arena_bytes(None, str(tmp_path / "missing")) == 0


class _Event:
    """Stands for a CUDA event (no GPU here): passed once the test says the device is done."""

    def __init__(self) -> None:
        self.passed = False

    def record(self, stream) -> None:
        pass

    def query(self) -> bool:
        return self.passed


def test_blocks_a_device_may_still_be_reading_are_not_given_back_before_it_is_done(spill_dir):
    from shared.device_decode import HeldUntilRead
    arena = arenas.Arena(str(spill_dir), 16 * arenas.BLOCK, "test-")
    writer = arenas.ArenaWriter(arena.path, arena.blocks)
    events: list[_Event] = []
    held = HeldUntilRead(lambda: events.append(_Event()) or events[-1])
    try:
        for _ in range(2):  # two batches of JPEG bytes handed to the device decoder
            batch = spill.unship(spill.ship([np.ones(100_000, dtype=np.uint8)], str(spill_dir), os.getpid(), writer))
            held.hold(batch, stream=None)
            del batch
        gc.collect()
        assert arena.blocks_taken == 4 and len(held) == 2  # the decoder's call returned; the copies may not have
        events[0].passed = True
        held.hold([], stream=None)  # the next batch's decode lets the first one go
        gc.collect()
        assert arena.blocks_taken == 2 and len(held) == 2
        events[1].passed = events[2].passed = True
        held.let_go()  # the pipeline's forward pass has finished: the rest go before the next decode
        gc.collect()
        assert arena.blocks_taken == 0 and len(held) == 0
    finally:
        arena.close()


def test_a_batch_that_fails_on_the_device_frees_what_the_pool_sends_for_it(noisy_photos, spill_dir, monkeypatch):
    """An unexpected error in the device decoder fails the batch; the pool's decodes for the rest of it
    still arrive, and their blocks come back instead of staying taken until the worker stops."""
    import time

    from shared.device_decode import DecodeSplit, DeviceJpegDecoder, load_split

    def broken(*_args, **_kwargs):
        raise ValueError("a bug in the device path")

    loader = _loader(noisy_photos, str(spill_dir), 16)
    decoder = DeviceJpegDecoder.torchvision("cpu")
    monkeypatch.setattr(decoder, "decode", broken)
    try:
        with pytest.raises(ValueError):
            load_split(loader, decoder, DecodeSplit(0.5), _requests(noisy_photos), list(range(len(noisy_photos))))
        gc.collect()
        deadline = time.monotonic() + 30
        while loader.arena.blocks_taken and time.monotonic() < deadline:
            time.sleep(0.05)  # the pool's chunks finish after the batch gave up on them
        assert loader.arena.blocks_taken == 0
    finally:
        loader.close()
