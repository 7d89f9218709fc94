"""A worker process keeps the memory its forward pass frees (shared.allocator.keep_freed_memory): with glibc's
defaults every batch's activations were mapped afresh and faulted in page by page, a sixth of a CPU forward."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

import pytest

# Batches forwarded on two long-lived threads taking their turns at the model as the worker's batch threads
# do (shared/runtime.py ForwardTurns: on 2 cores with one torch thread, two forwards at once); the page faults
# of each batch after the warm-up ones are printed. The settings apply first thing, as `landmarks worker`
# applies them. With them, the heap still grows the first few times the two forwards overlap in a new way
# (both batches of such a pair count 2,304-9,216 faults, seen in up to four of eight batches after four
# warm-ups, so a median over those failed one run in twelve); after eight warm-ups, the median of sixteen
# reads the steady state.
SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from concurrent.futures import ThreadPoolExecutor
    from shared.allocator import keep_freed_memory, malloc_arenas
    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    import torch
    from shared.model import LandmarkNet
    from shared.runtime import ForwardTurns
    torch.set_num_threads(1)
    net = LandmarkNet("resnet_small", 128, 0).eval()
    side = int(sys.argv[2])
    batch, turns, faults = torch.rand(64, 3, side, side), ForwardTurns(), []

    def forward(counted):
        with turns.turn(torch.device("cpu")):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            net.embed(batch)
            if counted:
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    with ThreadPoolExecutor(2) as threads:
        list(threads.map(forward, [False] * 8 + [True] * 16))
    print(json.dumps({"kept": kept, "arenas": malloc_arenas(), "faults": faults}))
""")


def _faults(mode: str, side: int = 96) -> dict:
    run = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(side)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_forward_pass_reuses_the_memory_the_last_one_freed():
    default, kept = _faults("default"), _faults("keep")
    assert kept["kept"] is True
    # Both batch threads use the main heap: a thread's own arena unmaps its heaps whenever they empty.
    assert kept["arenas"] == 1, kept
    # With glibc's defaults, thousands of pages per batch (about 80 a photo at batch 64).
    assert statistics.median(default["faults"]) > 1000, default
    assert statistics.median(kept["faults"]) < statistics.median(default["faults"]) / 20, (default, kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_activations_larger_than_any_mmap_threshold_are_reused_too():
    """At 224 px a batch of 64 has activations of over 100 MB, past the largest mmap threshold glibc takes
    (32 MB): they were mapped afresh and faulted in at every layer, as WRN-50-2's were on a CPU worker."""
    kept = _faults("keep", side=224)
    assert kept["kept"] is True
    # One 64 x 32 x 112 x 112 float activation alone is about 25,000 pages.
    assert statistics.median(kept["faults"]) < 2000, kept
