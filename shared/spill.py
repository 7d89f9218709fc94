"""How a decode process hands its large results back to the worker: through a file in shared memory
(/dev/shm) that the worker maps, instead of the pool's pipe.

A process pool returns results by pickling them down a pipe. The worker's side reads the pipe 64 KB at a
time into a growing buffer, unpickles the result out of it into fresh memory, and the kernel fills every
fresh page on first touch: 1.3–2.2 µs of the worker's CPU per KB on the bench's machine, 0.74 ms per 2 MP
JPEG and 7.1 ms per 12 MP one that the pool fetched and header-read for a GPU decoder
(`handover_cpu_ms_per_img`, BENCHMARKS.md). All of it runs in the worker's one process, and a GPU worker
at 3,000 photos a second has a third of a millisecond per photo for all of its Python.

Here the process pickles a chunk's results with their numpy arrays (pixels; a JPEG's bytes, which the
loader hands over as a uint8 array) out of band (pickle protocol 5), and writes those buffers to one file
in the spill directory. Only the small pickle crosses the pipe. The worker maps the file (copy-on-write),
removes its name at once, and unpickles around views of the mapping: no copy, and the pages are already
in memory. The arrays it gets keep the mapping alive; it goes when the last of them does. What is left is
the kernel's work of mapping, unmapping and freeing each photo's pages (BENCHMARKS.md, eighth session),
which is why a chunk goes first to the worker's arena (shared/arena.py), whose pages are made once and
reused, and to a file of its own only when the arena has no room.

When the directory is missing, full (a container's /dev/shm is 64 MB by default) or unwritable, the results
go down the pipe as before: spilling is a fast path, never a requirement. Files left by a worker that was
killed are removed by the next worker on the machine (`sweep_stale`)."""

from __future__ import annotations

import itertools
import logging
import mmap
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import arena as arenas

log = logging.getLogger(__name__)

AUTO_DIR = "/dev/shm"
PREFIX = "landmarks-decode-"
# A chunk whose out-of-band buffers total less than this goes down the pipe: a file costs a few system calls.
MIN_BYTES = 64 * 1024
_counter = itertools.count()
# Files named with this process's pid but made before it started are a dead predecessor's: a container
# restarted in its own pid namespace gives the new worker the old one's pid, while /dev/shm (an emptyDir)
# outlives the restart. Without this their arena would never be swept nor made again (O_EXCL).
_STARTED_NS = time.time_ns()


class SpillLost(Exception):
    """A spill file was removed or cut short before the worker read it (someone cleaned /dev/shm)."""


@dataclass(frozen=True)
class Spilled:
    """A chunk's results, pickled without their large buffers, which wait in ``path`` one after another."""
    head: bytes
    path: str
    sizes: tuple[int, ...]


def resolve_dir(setting: str) -> str | None:
    """The spill directory of LANDMARKS_DECODE_SPILL_DIR: "auto" is /dev/shm where it exists and is
    writable; "off" (or empty) keeps every result on the pipe."""
    if setting in ("", "off"):
        return None
    directory = AUTO_DIR if setting == "auto" else setting
    if os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK):
        return directory
    if setting != "auto":
        log.warning("decode spill directory %s is not a writable directory: results go through the pipe", setting)
    return None


def _pickled(results: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """The pickle of ``results`` without the memory of their numpy arrays, and those buffers in order."""
    buffers: list[pickle.PickleBuffer] = []
    return pickle.dumps(results, protocol=5, buffer_callback=buffers.append), buffers


def ship(results: Any, directory: str | None, owner_pid: int, arena: arenas.ArenaWriter | None = None) -> Any:
    """In a pool process: ``results``, or where their buffers were written: the worker's ``arena`` when it
    has room (InArena), else a file of their own in ``directory`` (Spilled)."""
    if directory is None:
        return results
    head, buffers = _pickled(results)
    views = [buffer.raw() for buffer in buffers]
    size = sum(view.nbytes for view in views)
    if size < MIN_BYTES:
        return results
    in_arena = arena.put(head, views, size) if arena is not None else None
    if in_arena is not None:
        return in_arena
    path = os.path.join(directory, f"{PREFIX}{owner_pid}-{os.getpid()}-{next(_counter)}")
    try:
        with open(path, "xb", opener=_private) as file:  # "x": never another's file of the same name
            for view in views:
                file.write(view)
    except OSError as exc:  # full, removed, read-only: the pipe still works
        _remove(path)
        log.debug("could not spill %d bytes to %s (%s): sending them through the pipe", size, directory, exc)
        return results
    return Spilled(head, path, tuple(view.nbytes for view in views))


def _private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def unship(shipped: Any) -> Any:
    """In the worker: the results ``ship`` returned, mapped back (and the file's name removed) if spilled."""
    if isinstance(shipped, arenas.InArena):
        arena = arenas.opened(shipped.path)
        if arena is None:  # the pool that wrote it was replaced, and its arena closed
            raise SpillLost(f"decode results in a closed arena: {shipped.path}")
        return pickle.loads(shipped.head, buffers=arena.buffers(shipped))
    if not isinstance(shipped, Spilled):
        return shipped
    try:
        with open(shipped.path, "rb") as file:
            mapped = mmap.mmap(file.fileno(), sum(shipped.sizes), flags=mmap.MAP_PRIVATE,
                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as exc:  # ValueError: the file is shorter than what was written
        raise SpillLost(f"spilled decode results unreadable: {shipped.path} ({exc})") from None
    finally:
        _remove(shipped.path)  # the mapping keeps the pages; they are freed when it goes
    view, buffers, offset = memoryview(mapped), [], 0
    for size in shipped.sizes:
        buffers.append(view[offset:offset + size])
        offset += size
    return pickle.loads(shipped.head, buffers=buffers)


def path_of(shipped: Any) -> str:
    """How results came back: "arena", "file" or "pipe" (the landmarks_decode_handovers metric)."""
    if isinstance(shipped, arenas.InArena):
        return "arena"
    return "file" if isinstance(shipped, Spilled) else "pipe"


def discard(shipped: Any) -> None:
    """Frees the file or arena blocks of results that will not be read (their batch failed or the worker is
    stopping)."""
    if isinstance(shipped, Spilled):
        _remove(shipped.path)
    elif isinstance(shipped, arenas.InArena) and (arena := arenas.opened(shipped.path)) is not None:
        arena.give_back(shipped.first, shipped.blocks)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def sweep_stale(directory: str | None) -> int:
    """Removes the spill files of workers that are no longer running (killed between a process's write and
    their read). Returns how many were removed."""
    if directory is None:
        return 0
    removed = 0
    for path in Path(directory).glob(f"{PREFIX}*"):
        owner = path.name[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and _left_behind(path, int(owner)):
            _remove(str(path))
            removed += 1
    if removed:
        log.info("removed %d decode spill files left by stopped workers in %s", removed, directory)
    return removed


def sweep_own(directory: str | None, owner_pid: int) -> None:
    """At pool shutdown: this worker's files whose results were never read."""
    if directory is not None:
        for path in Path(directory).glob(f"{PREFIX}{owner_pid}-*"):
            _remove(str(path))


def _left_behind(path: Path, owner: int) -> bool:
    if owner != os.getpid():
        return not _running(owner)
    try:
        return path.stat().st_mtime_ns < _STARTED_NS
    except OSError:
        return False  # gone already


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
