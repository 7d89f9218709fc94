"""The batches' turns at the model (shared/runtime.py ForwardTurns): one forward at a time on a GPU; on a CPU
as many at once as the cores hold at the forward's threads each, so a worker whose model is the heavy stage
(WRN-50-2 at 224 px) uses every core for it."""

from __future__ import annotations

import threading

import pytest
import torch

from shared.runtime import ForwardTurns, concurrent_forwards


@pytest.mark.parametrize(("device", "threads", "cores", "expected"), [
    ("cpu", 1, 2, 2),    # the worker's default on 2 cores: one thread per 4 cores, at least 1
    ("cpu", 2, 2, 1),    # LANDMARKS_TORCH_THREADS=2 on 2 cores: a second forward would oversubscribe them
    ("cpu", 4, 16, 4),
    ("cpu", 3, 2, 1),    # more threads than cores: still one forward, never none
    ("cuda", 1, 16, 1),  # the GPU takes one forward at a time whatever the host
])
def test_a_forward_gets_the_cores_its_threads_need(device, threads, cores, expected):
    assert concurrent_forwards(device, threads, cores) == expected


def _inside_at_once(turns: ForwardTurns, device: torch.device, timeout_s: float) -> bool:
    """Whether two threads can be inside a turn at the same time: each waits there for the other."""
    both_in = threading.Barrier(2, timeout=timeout_s)
    met = []

    def take_turn() -> None:
        with turns.turn(device):
            try:
                both_in.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)

    threads = [threading.Thread(target=take_turn) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * timeout_s)
    assert not any(thread.is_alive() for thread in threads)
    return all(met)


def test_two_batches_on_a_cpu_forward_together_and_on_a_gpu_in_turn(two_cores):
    two_cores(1)
    cpu = ForwardTurns()
    assert _inside_at_once(cpu, torch.device("cpu"), timeout_s=10)
    assert cpu.slots == 2
    gpu = ForwardTurns()  # sized from the device's type: no CUDA needed to tell the rule
    assert not _inside_at_once(gpu, torch.device("cuda"), timeout_s=0.5)
    assert gpu.slots == 1


def test_a_cpu_forward_on_every_core_takes_its_turn_alone(two_cores):
    two_cores(2)
    turns = ForwardTurns()
    assert not _inside_at_once(turns, torch.device("cpu"), timeout_s=0.5)
    assert turns.slots == 1
