"""A region of shared memory that the decode processes write their large results into, over and over: the
first place shared/spill.py tries.

A spill file per chunk spares the worker the pipe's copy, but each file's pages are made fresh, mapped into
the worker on first touch, unmapped and freed again: 1.3 ms of the worker's CPU per 12 MP JPEG on the
bench's machine, against the third of a millisecond per photo that a GPU worker's one Python process has
for everything at 3,000 photos a second. The arena is one file in the spill directory that the worker and
each decode process map once. A process takes a run of free blocks, copies a chunk's buffers there and
sends only where they are through the pipe; the worker makes arrays over its own mapping of those blocks
and gives the blocks back when the last array over them is gone. The pages are made once and stay mapped
(`handover_cpu_ms_per_img` in BENCHMARKS.md).

Layout: one control byte per block (0 free, 1 taken), then the blocks. Decode processes take blocks under a
POSIX record lock on the file, which the kernel drops if a process dies holding it. Only the worker gives
blocks back, one byte store per block, after their arrays are gone. A chunk finding no free run long enough
goes to its own spill file, as before. A memory-backed file is charged only for pages written, so an arena
costs what its busiest moment needed, and keeps it until the worker stops."""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import weakref
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

BLOCK = 64 * 1024
# "auto": this share of the spill directory's filesystem (a container's /dev/shm is what its spec gives),
# at most AUTO_MAX_MB: room for a few batches of 2 MP JPEGs, or one of 12 MP ones at batch 256.
AUTO_SHARE = 0.5
AUTO_MAX_MB = 2048
_counter = itertools.count()
# The worker's open arenas by path, so that a result names its arena with a string across the pipe.
_open: dict[str, Arena] = {}


@dataclass(frozen=True)
class InArena:
    """A chunk's results, pickled without their large buffers, which wait one after another in ``blocks``
    blocks of the arena at ``path`` from block ``first``."""
    head: bytes
    path: str
    first: int
    blocks: int
    sizes: tuple[int, ...]


def arena_bytes(setting_mb: int | None, directory: str) -> int:
    """The arena's size: LANDMARKS_DECODE_ARENA_MB, or "auto" (unset) as above; 0 turns it off."""
    if setting_mb is not None:
        return setting_mb * 1024 * 1024
    try:
        stats = os.statvfs(directory)
    except OSError:
        return 0
    return int(min(stats.f_frsize * stats.f_blocks * AUTO_SHARE, AUTO_MAX_MB * 1024 * 1024))


def _control_bytes(blocks: int) -> int:
    return -(-blocks // BLOCK) * BLOCK  # whole blocks, so that every data block starts page-aligned


def _mapped(fd: int, blocks: int) -> tuple[mmap.mmap, np.ndarray, int]:
    """The arena file mapped whole and shared, its control bytes, and where its data blocks start."""
    data_start = _control_bytes(blocks)
    mapped = mmap.mmap(fd, data_start + blocks * BLOCK, flags=mmap.MAP_SHARED)
    return mapped, np.frombuffer(mapped, dtype=np.uint8, count=blocks), data_start


class Arena:
    """The worker's side: creates the file, reads results out of it, gives their blocks back."""

    def __init__(self, directory: str, size: int, name_prefix: str) -> None:
        self.blocks = size // BLOCK
        self.path = os.path.join(directory, f"{name_prefix}arena-{next(_counter)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _control_bytes(self.blocks) + self.blocks * BLOCK)  # sparse: no page is made yet
            self._map, self._control, self._data_start = _mapped(fd, self.blocks)
        except OSError:
            _remove(self.path)
            raise
        finally:
            os.close(fd)
        _open[self.path] = self

    def buffers(self, shipped: InArena) -> list[np.ndarray]:
        """Views of a result's buffers; its blocks go back when the last array made over them is gone."""
        region = np.frombuffer(self._map, dtype=np.uint8, count=shipped.blocks * BLOCK,
                               offset=self._data_start + shipped.first * BLOCK)
        # Every array unpickled over a slice of ``region`` has ``region`` as its base: numpy follows a view's
        # chain of bases only while the next one is an array too, and region's own base is the mapping. So
        # this runs once all of them are gone.
        weakref.finalize(region, self.give_back, shipped.first, shipped.blocks).atexit = False
        out, offset = [], 0
        for size in shipped.sizes:
            out.append(region[offset:offset + size])
            offset += size
        return out

    @property
    def blocks_taken(self) -> int:
        """Blocks holding results the worker has not let go of yet (or that a decode process is writing)."""
        return int(np.count_nonzero(self._control))

    def give_back(self, first: int, blocks: int) -> None:
        self._control[first:first + blocks] = 0

    def close(self) -> None:
        """Removes the name; the memory goes when the last mapping does (arrays still in use keep it)."""
        _open.pop(self.path, None)
        _remove(self.path)


def opened(path: str) -> Arena | None:
    return _open.get(path)


class ArenaWriter:
    """A decode process's side: takes blocks and copies a chunk's buffers into them."""

    def __init__(self, path: str, blocks: int) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR)  # kept open: the lock that serialises taking blocks is on it
        self._map, self._control, self._data_start = _mapped(self._fd, blocks)
        self._view = memoryview(self._map)

    def put(self, head: bytes, views: list[memoryview], size: int) -> InArena | None:
        """``views`` copied into free blocks, or None when no free run is long enough."""
        blocks = -(-size // BLOCK)
        first = self._take(blocks)
        if first is None:
            return None
        offset = self._data_start + first * BLOCK
        for view in views:
            self._view[offset:offset + view.nbytes] = view
            offset += view.nbytes
        return InArena(head, self.path, first, blocks, tuple(view.nbytes for view in views))

    def _take(self, blocks: int) -> int | None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)  # the other decode processes take blocks too
        try:
            first = first_free_run(self._control, blocks)
            if first is not None:
                self._control[first:first + blocks] = 1
            return first
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)


def first_free_run(control: np.ndarray, blocks: int) -> int | None:
    """The lowest block that starts ``blocks`` free ones in a row (lowest first keeps the pages in use, and
    so the memory charged, to what the busiest moment needed)."""
    if blocks > len(control):
        return None
    free = np.concatenate(([0], np.cumsum(control == 0, dtype=np.int64)))
    starts = np.flatnonzero(free[blocks:] - free[:-blocks] == blocks)
    return int(starts[0]) if len(starts) else None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
