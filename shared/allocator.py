"""The worker's memory allocator settings: glibc keeps the memory a forward pass frees for the next batch.

Only ctypes is imported here, so that a process can apply the settings before anything else it imports starts
a thread (numpy's OpenBLAS, gRPC, torch): glibc hands each thread that allocates an arena of its own, and
one that exists before the settings apply stays in use. `landmarks worker` applies them first thing."""

from __future__ import annotations

import ctypes

# glibc's mallopt(3) parameters, and what they are set to (keep_freed_memory).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
NO_MAPPINGS = 0  # M_MMAP_MAX: no allocation gets a mapping of its own; all come from the heap
NEVER_TRIM = -1  # M_TRIM_THRESHOLD: the heap never hands its free top back to the kernel


def keep_freed_memory() -> bool:
    """Has glibc keep the memory a forward pass frees for the next one, instead of handing it back to the
    kernel and faulting it in again, page by page, at the next batch.

    A CPU forward allocates its activations afresh at every layer (tens of MB at batch 64 for the served
    ResNet at 96 px, over 100 MB for WRN-50-2 at 224 px), and with glibc's defaults each came from a new mmap
    and went back with munmap: about 80 page faults per photo, a sixth of the forward's CPU (BENCHMARKS.md,
    twenty-third session). Every allocation now comes from the heap, whatever its size (glibc's largest
    mmap threshold, 32 MB, left WRN-50-2's activations mapped afresh at every layer: 5,700-7,100 faults and
    10-12 ms of kernel CPU per photo, twenty-eighth session), and the heap's free top is never handed back:
    the process stays at its busiest batch's size, which the pod's memory request covers anyway. No thread
    gets an arena of its own from now on: one is made of 64 MB heaps that glibc unmaps whenever one empties,
    whatever the trim threshold, and a batch thread handed one kept faulting its activations in again.
    Arenas made before the call stay in use and are handed out in turn to new threads, so call it before any
    other thread allocates (malloc_arenas() says whether that held). False where the C library has no
    mallopt (musl ignores it, macOS lacks it)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_MAX, NO_MAPPINGS), (_M_TRIM_THRESHOLD, NEVER_TRIM), (_M_ARENA_MAX, 1))
    return all([bool(mallopt(param, value)) for param, value in settings])


def malloc_arenas() -> int | None:
    """How many arenas glibc's malloc has made in this process (from malloc_info(3)): 1 when every thread
    shares the main heap. None where the C library has no malloc_info."""
    libc = ctypes.CDLL(None)
    try:
        open_memstream, malloc_info = libc.open_memstream, libc.malloc_info
    except AttributeError:
        return None
    open_memstream.restype = ctypes.c_void_p
    open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = libc.free.argtypes = [ctypes.c_void_p]
    buffer, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = open_memstream(ctypes.byref(buffer), ctypes.byref(size))
    if not stream:
        return None
    malloc_info(0, stream)
    libc.fclose(stream)  # writes the buffer's final address and size
    try:
        return ctypes.string_at(buffer.value, size.value).count(b"<heap nr=")
    finally:
        libc.free(buffer)
