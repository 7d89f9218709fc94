"""Fetch and decode a batch's photos in a pool sized to the cores: the pipeline's first stage.

By default the pool is made of processes (LANDMARKS_DECODE_POOL=processes). Decoding a JPEG releases the
GIL only inside the codec: in threads, the decoders wait for the GIL behind the Celery consumer and the
other batch's Python, and on 2 cores a tenth of the CPU went idle that way. A process also keeps a codec
that crashes on a hostile file (libjpeg, libheif) from taking the worker down: the photo is recorded as
failed and the pool is started again.

On a GPU worker with a device JPEG decoder (shared/device_decode.py), a request may ask for JPEGs to come
back undecoded (an EncodedJpeg: the bytes plus what the header says), for the GPU to decode in one batch.

The processes come from a forkserver that has imported only this module's dependencies (Pillow, numpy,
pillow-heif; never torch), so they are small and never inherit CUDA or the worker's connections. Their large
results (pixels, JPEG bytes) come back through shared memory rather than the pool's pipe (shared/spill.py):
into an arena of the worker's, made again with the pool (shared/arena.py), or a file per chunk."""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import pickle
import select
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from shared import arena as arenas
from shared import spill
from shared.cpus import usable_cpus
from shared.errors import PhotoError, Stage
from shared.fetch import FETCHERS, fetch_bytes, register_fetcher, short_uri
from shared.imaging import DecodedImage, EncodedJpeg, decode_image, one_thread_per_decode, probe_jpeg
from shared.outcomes import Failure
from shared.settings import Settings

log = logging.getLogger(__name__)

POOL_KINDS = ("processes", "threads")
HEADERS_PER_TASK = 8
MAX_PHOTOS_PER_TASK = 32


@dataclass(frozen=True)
class LoadRequest:
    uri: str
    size: int
    extra_size: int | None = None  # also decode at this size (a shadow model's), from the same fetch
    # A device decoder takes JPEGs (shared/device_decode.py): such a photo comes back undecoded, as an
    # EncodedJpeg; progressive ones too when ``device_progressive``.
    device_jpeg: bool = False
    device_progressive: bool = False
    data: bytes | None = None  # the photo's bytes when already fetched (what a device decoder refused)
    # The event's ids, for the lines logged about this photo here (an on-call searches a photo_id).
    event_id: str | None = None
    photo_id: str | None = None

    def log_ids(self) -> dict[str, str]:
        return {k: v for k, v in (("event_id", self.event_id), ("photo_id", self.photo_id)) if v is not None}


@dataclass
class Loaded:
    image: DecodedImage | Failure | EncodedJpeg
    extra_pixels: np.ndarray | None = None


def load_photo(request: LoadRequest, settings: Settings) -> Loaded:
    """One photo: fetched once, decoded at the requested size(s), or only its header read when a device
    decoder takes it. Errors about the photo come back as a Failure (they are results, and cross a process
    boundary as plain data)."""
    try:
        data = request.data if request.data is not None else fetch_bytes(request.uri, settings)
        if request.device_jpeg:
            jpeg = probe_jpeg(data, max_pixels=settings.max_image_pixels, progressive=request.device_progressive)
            if jpeg is not None:
                return Loaded(jpeg)
        image = decode_image(data, size=request.size, max_pixels=settings.max_image_pixels)
    except PhotoError as exc:
        return Loaded(Failure(exc.stage, exc.reason, transient=getattr(exc, "transient", False)))
    extra = None
    if request.extra_size:
        try:
            extra = decode_image(data, size=request.extra_size, max_pixels=settings.max_image_pixels).pixels
        except PhotoError:
            pass  # the extra size is a shadow's: it skips the photo; the live decode succeeded
    return Loaded(image, extra)


# The settings of a pool process, set once by its initializer (pickled a single time, not per photo), and
# where its large results go (shared/spill.py).
_process_settings: Settings | None = None
_process_spill: tuple[str | None, int, arenas.ArenaWriter | None] = (None, 0, None)


def _init_process(settings: Settings, fetchers: dict, owner_pid: int, spill_dir: str | None = None,
                  arena: tuple[str, int] | None = None) -> None:
    global _process_settings, _process_spill
    _process_settings = settings
    _process_spill = (spill_dir, owner_pid, _open_arena(arena))
    one_thread_per_decode()
    for scheme, fetcher in fetchers.items():  # schemes plugged in by the worker's code (register_fetcher)
        register_fetcher(scheme, fetcher)
    threading.Thread(target=_exit_with, args=(owner_pid,), name="owner-watch", daemon=True).start()


def _open_arena(arena: tuple[str, int] | None) -> arenas.ArenaWriter | None:
    if arena is None:
        return None
    try:
        return arenas.ArenaWriter(*arena)
    except OSError as exc:  # removed under the worker: results go to files of their own
        log.warning("cannot open the decode arena %s (%s): results go to spill files", arena[0], exc)
        return None


def _exit_with(owner_pid: int) -> None:
    """Ends this pool process once the process that owns the pool is gone. A killed worker cannot shut its
    pool down, and the pool's processes would wait on its queues for ever (keeping the forkserver alive)."""
    try:
        pidfd = os.pidfd_open(owner_pid)  # Linux 5.3+: readable when the process exits
    except (AttributeError, OSError):
        pidfd = None
    while True:
        if pidfd is not None:
            select.select([pidfd], [], [])
            os._exit(0)
        time.sleep(1.0)
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


def _load_in_process(load: Callable[[LoadRequest, Settings], Loaded], request: LoadRequest) -> Loaded:
    assert _process_settings is not None, "pool process started without its initializer"
    return load(request, _process_settings)


def _load_chunk(load: Callable[[LoadRequest, Settings], Loaded], settings: Settings,
                requests: list[LoadRequest]) -> list[Loaded]:
    return [load(request, settings) for request in requests]


def _load_chunk_in_process(load: Callable[[LoadRequest, Settings], Loaded],
                           requests: list[LoadRequest]) -> list[Loaded] | spill.Spilled:
    assert _process_settings is not None, "pool process started without its initializer"
    results = _load_chunk(load, _process_settings, requests)
    if _process_spill[0] is not None:
        results = [_jpeg_as_array(loaded) for loaded in results]
    return spill.ship(results, *_process_spill)


def _jpeg_as_array(loaded: Loaded) -> Loaded:
    """A JPEG's bytes as a uint8 array (a view, not a copy), which leaves the pickle with the pixel arrays and
    reaches the worker through shared memory (shared/spill.py); pickle keeps bytes objects inline."""
    image = loaded.image
    if isinstance(image, EncodedJpeg) and isinstance(image.data, bytes):
        return replace(loaded, image=replace(image, data=np.frombuffer(image.data, dtype=np.uint8)))
    return loaded


class PendingLoad:
    """Photos being loaded (PhotoLoader.submit): ``result()`` waits for them, in order; ``finished_at``
    (time.perf_counter) says when the last one was ready, whenever it is read after ``result()``."""

    def __init__(self, loader: PhotoLoader, pool: Executor | None, requests: Sequence[LoadRequest],
                 futures: list[Future] | None) -> None:
        self._loader, self._pool, self._requests, self._futures = loader, pool, requests, futures
        self._done: list[float] = []
        self._read = 0  # chunks whose results were taken (result())
        self.finished_at = time.perf_counter()
        for future in futures or []:
            future.add_done_callback(lambda _: self._done.append(time.perf_counter()))

    def result(self) -> list[Loaded]:
        parts: list[list[Loaded]] = []
        paths: list[str] = []
        try:
            if self._futures is None:
                raise BrokenProcessPool("the pool was broken when the photos were sent")
            for future in self._futures[self._read:]:
                shipped = future.result()
                paths.append(spill.path_of(shipped))
                parts.append(spill.unship(shipped))
                self._read += 1
            out = _in_request_order(parts)
        except (BrokenProcessPool, spill.SpillLost) as exc:
            self.discard()
            if isinstance(exc, BrokenProcessPool):
                self._loader._restart(self._pool)
            else:  # a spill file removed or cut short under us: load the photos again, through the pipe
                log.warning("decode results lost (%s); loading the batch's photos again", exc)
            out = self._loader._load_each_alone(self._requests)
            self._done.append(time.perf_counter())
        if self._done:
            self.finished_at = max(self._done)
        _observe_handovers(paths)
        return out

    def discard(self) -> None:
        """Lets go of the results not taken yet (their batch failed): their spill files or arena blocks are
        freed now, or as each chunk finishes. Those already taken are the caller's."""
        unread = (self._futures or [])[self._read:]
        self._read += len(unread)
        for future in unread:
            future.add_done_callback(_discard_result)


def _observe_handovers(paths: list[str]) -> None:
    """Counted in the worker only: the pool processes never import the metrics (prometheus_client)."""
    if paths:
        from shared.metrics import observe_handovers
        observe_handovers(paths)


def _tasks(requests: Sequence[LoadRequest], per_task: int) -> list[list[LoadRequest]]:
    """The batch dealt out to ``ceil(n / per_task)`` tasks like cards, one photo to each in turn: a run of
    costly photos (one phone's burst of HEICs, 50-70 JPEGs' worth of CPU each) is shared by the processes
    instead of going to one of them while the others wait for the batch's last task."""
    count = math.ceil(len(requests) / per_task)
    return [list(requests[k::count]) for k in range(count)]


def _in_request_order(parts: list[list[Loaded]]) -> list[Loaded]:
    """The results of _tasks' tasks, in the order of the requests they were dealt from."""
    out: list[Loaded] = [None] * sum(len(part) for part in parts)  # type: ignore[list-item]
    for k, part in enumerate(parts):
        out[k::len(parts)] = part
    return out


def photos_per_task(requests: Sequence[LoadRequest], workers: int) -> int:
    """How many photos one task of a process pool takes: a batch's photos shared out one task per process.
    Each task costs the worker's own process a round trip through the pool (its manager thread, a result to
    read, futures to wake: a few tenths of a millisecond under load), which a GPU worker's one Python process
    pays at thousands of photos a second; with two batches in flight, the other batch's tasks keep every
    process busy while one batch's last task finishes. Header reads for a device decoder (a fetch and a parse
    each) go at least HEADERS_PER_TASK to a task; no task takes more than MAX_PHOTOS_PER_TASK, which bounds
    the run of arena blocks one result needs (whole JPEGs, for a device decoder)."""
    share = math.ceil(len(requests) / workers) if requests else 1
    if requests and all(request.device_jpeg for request in requests):
        share = max(share, HEADERS_PER_TASK)
    return max(1, min(MAX_PHOTOS_PER_TASK, share))


def _discard_result(future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        spill.discard(future.result())


class PhotoLoader:
    """Loads a batch's photos in parallel; safe to call from several batch threads at once."""

    def __init__(self, settings: Settings, kind: str | None = None, workers: int | None = None,
                 load: Callable[[LoadRequest, Settings], Loaded] = load_photo) -> None:
        """``load`` must be a module-level function when the pool is made of processes (it is pickled)."""
        self.settings = settings
        self._load = load
        self.kind = kind or settings.decode_pool
        if self.kind not in POOL_KINDS:
            raise ValueError(f"decode pool must be one of {POOL_KINDS}, not {self.kind!r}")
        self._fetchers = dict(FETCHERS)
        if self.kind == "processes" and not _picklable(self._fetchers):
            log.warning("a registered fetcher cannot be sent to a process (a lambda or a closure?): "
                        "decoding in threads instead")
            self.kind = "threads"
        self.workers = workers or settings.decode_workers or usable_cpus()
        self.spill_dir = spill.resolve_dir(settings.decode_spill_dir) if self.kind == "processes" else None
        spill.sweep_stale(self.spill_dir)
        self.arena_bytes = arenas.arena_bytes(settings.decode_arena_mb, self.spill_dir) if self.spill_dir else 0
        self._arena: arenas.Arena | None = None
        self._lock = threading.Lock()
        self._pool: Executor = self._start()

    def _start(self) -> Executor:
        """A new pool, and a new arena for it: one that a killed process may have left blocks taken in is
        never reused."""
        if self.kind == "threads":
            one_thread_per_decode()
            return ThreadPoolExecutor(self.workers, thread_name_prefix="decode")
        if self._arena is not None:
            self._arena.close()
        self._arena = self._new_arena()
        arena = (self._arena.path, self._arena.blocks) if self._arena is not None else None
        return self._process_pool(self.workers, self.spill_dir, arena)

    def _process_pool(self, workers: int, spill_dir: str | None = None,
                      arena: tuple[str, int] | None = None) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(workers, mp_context=_process_context(), initializer=_init_process,
                                   initargs=(self.settings, self._fetchers, os.getpid(), spill_dir, arena))

    def _new_arena(self) -> arenas.Arena | None:
        if self.spill_dir is None or self.arena_bytes < arenas.BLOCK:
            return None
        try:
            return arenas.Arena(self.spill_dir, self.arena_bytes, f"{spill.PREFIX}{os.getpid()}-")
        except OSError as exc:
            log.warning("cannot make a %d MB decode arena in %s (%s): results go to spill files",
                        self.arena_bytes >> 20, self.spill_dir, exc)
            return None

    @property
    def arena(self) -> arenas.Arena | None:
        """The shared memory the current pool's processes write their results into, if any."""
        return self._arena

    def load(self, requests: Sequence[LoadRequest]) -> list[Loaded]:
        return self.submit(requests).result()

    def submit(self, requests: Sequence[LoadRequest]) -> PendingLoad:
        """Starts loading ``requests`` and returns at once; the pool takes work in the order it was sent."""
        if not requests:
            return PendingLoad(self, None, [], [])
        pool = self._pool
        if self.kind == "threads":
            chunk, load = 1, partial(_load_chunk, self._load, self.settings)
        else:
            chunk, load = photos_per_task(requests, self.workers), partial(_load_chunk_in_process, self._load)
        try:
            futures = [pool.submit(load, task) for task in _tasks(requests, chunk)]
        except BrokenProcessPool:  # broken by an earlier batch: the result restarts it
            futures = None
        return PendingLoad(self, pool, requests, futures)

    def _load_each_alone(self, requests: Sequence[LoadRequest]) -> list[Loaded]:
        """After a pool process died: the batch's photos one at a time, in a process only this call uses, so
        that the one that kills it is found. Not in the shared pool: the other batch in flight reloads its
        photos there too, and when its poison killed the pool again, this batch's photo in it then was taken
        for the culprit and failed. Results come back through the pipe (no arena, no spill files)."""
        out: list[Loaded] = []
        pool: ProcessPoolExecutor | None = None
        try:
            for request in requests:
                pool = pool or self._process_pool(1)
                try:
                    out.append(pool.submit(_load_in_process, self._load, request).result())
                except BrokenProcessPool:
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = None
                    log.warning("the decoder process died on %s; recording the photo as failed",
                                short_uri(request.uri), extra=request.log_ids())
                    out.append(Loaded(Failure(Stage.DECODE,
                                              "the decoder process died on this file (a crash in the codec)")))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)  # joined: none left behind, its CPU time accounted to this process
        return out

    def _restart(self, broken: Executor) -> None:
        with self._lock:  # two batch threads may see the same broken pool: one restarts it
            if self._pool is broken:
                broken.shutdown(wait=False, cancel_futures=True)
                self._pool = self._start()

    def close(self) -> None:
        # Joined, so that none is left behind and their CPU time is accounted to this process.
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._arena is not None:
            self._arena.close()
        spill.sweep_own(self.spill_dir, os.getpid())  # results of batches that were never read


def stop_forkserver() -> None:
    """At process exit: the forkserver reaped the pool processes; reaping it in turn hands their CPU time
    up to this process (a benchmark's accounting) instead of leaving it with an orphan. Best effort: this
    uses multiprocessing's own stop method, which is private."""
    from multiprocessing import forkserver
    stop = getattr(getattr(forkserver, "_forkserver", None), "_stop", None)
    if stop is not None:
        try:
            stop()
        except OSError:
            pass


def _picklable(value: object) -> bool:
    try:
        pickle.dumps(value)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def _process_context() -> multiprocessing.context.BaseContext:
    """forkserver where there is one (Linux): a clean, small parent to fork from, never this process with
    its threads, CUDA context and sockets. spawn elsewhere."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["shared.loading"])
        return context
    return multiprocessing.get_context("spawn")
