"""The batches' turns at the model (shared/runtime.py ForwardTurns, forward_threads): one forward at a time on
a GPU; on a CPU the forwards at once hold at most the cores, each as many as its torch threads, and the
threads a model's forward runs on follow what it costs on this CPU: every core for a heavy model (WRN-50-2 at
224 px), one per 4 cores for a light one (the default resnet_small at 96 px), LANDMARKS_TORCH_THREADS over
both."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from shared.embedder import Embedder
from shared.modelinit import init_model
from shared.runtime import HEAVY_FORWARD_CPU_MS, ForwardTurns, forward_threads, threads_for_cost


@pytest.mark.parametrize(("cpu_ms", "cores", "expected"), [
    (0.6, 2, 1),     # resnet_small at 96 px: one thread per 4 cores, at least 1; the decode pool has the rest
    (0.6, 16, 4),
    (110.0, 2, 2),   # WRN-50-2 at 224 px, bf16: every core
    (110.0, 16, 16),
    (HEAVY_FORWARD_CPU_MS, 2, 2),
])
def test_a_forward_gets_every_core_when_it_is_the_heavy_stage(cpu_ms, cores, expected):
    assert threads_for_cost(cpu_ms, cores) == expected


def _model(tmp_path, backbone: str, size: int) -> Embedder:
    init_model(tmp_path / f"{backbone}.pt", backbone=backbone, dim=64, size=size, version=None, calibrate=None)
    return Embedder(tmp_path / f"{backbone}.pt", "cpu")


def test_the_article_network_runs_on_every_core_and_the_default_model_on_one(tmp_path, two_cores):
    two_cores(1)
    heavy, light = _model(tmp_path, "wide_resnet50_2", 224), _model(tmp_path, "resnet_small", 96)
    assert forward_threads(heavy) == 2
    assert forward_threads(light) == 1
    assert heavy.forward_cpu_ms() > HEAVY_FORWARD_CPU_MS > light.forward_cpu_ms() > 0
    assert forward_threads(light, configured=3) == 3  # LANDMARKS_TORCH_THREADS says


def test_a_set_thread_count_or_a_gpu_measures_nothing(tmp_path, two_cores, monkeypatch):
    two_cores(1)
    embedder = _model(tmp_path, "resnet_small", 96)
    embedder.load()
    monkeypatch.setattr(embedder, "forward_cpu_ms", lambda: pytest.fail("measured"))
    assert forward_threads(embedder, configured=2) == 2
    embedder.device = torch.device("cuda")  # no CUDA needed: the rule reads the device's type
    assert forward_threads(embedder) == 1


def _inside_at_once(turns: ForwardTurns, device: torch.device, threads: tuple[int, int],
                    timeout_s: float) -> tuple[bool, list[int]]:
    """Whether two threads, their forwards on ``threads`` torch threads, can be inside a turn at the same
    time (each waits there for the other), and the torch threads each ran on inside."""
    both_in = threading.Barrier(2, timeout=timeout_s)
    met, ran_on = [], []

    def take_turn(n: int) -> None:
        with turns.turn(device, n):
            ran_on.append(torch.get_num_threads())
            try:
                both_in.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)

    workers = [threading.Thread(target=take_turn, args=(n,)) for n in threads]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=4 * timeout_s)
    assert not any(worker.is_alive() for worker in workers)
    return all(met), sorted(ran_on)


def test_two_one_thread_forwards_on_two_cores_run_together(two_cores):
    two_cores(1)
    assert _inside_at_once(ForwardTurns(), torch.device("cpu"), (1, 1), timeout_s=10) == (True, [1, 1])


@pytest.mark.parametrize("threads", [(2, 2), (2, 1), (1, 2), (3, 1)])
def test_a_forward_on_every_core_takes_its_turn_alone(two_cores, threads):
    """Whichever comes first; a forward asking for more threads than there are cores still gets its turn."""
    two_cores(1)
    together, ran_on = _inside_at_once(ForwardTurns(), torch.device("cpu"), threads, timeout_s=0.5)
    assert not together
    assert ran_on == sorted(threads)  # each ran on the threads of its own model


def test_a_gpu_takes_one_forward_at_a_time(two_cores):
    two_cores(1)
    assert not _inside_at_once(ForwardTurns(), torch.device("cuda"), (1, 1), timeout_s=0.5)[0]


def test_a_forward_waiting_for_every_core_is_not_overtaken(two_cores):
    """First come, first served: one-thread forwards that keep coming while a two-thread one waits for both
    cores would otherwise hold one of them for ever."""
    two_cores(1)
    turns, cpu, order = ForwardTurns(), torch.device("cpu"), []
    first_in, release_first = threading.Event(), threading.Event()

    def forward(name: str, threads: int, hold: threading.Event | None = None) -> None:
        with turns.turn(cpu, threads):
            order.append(name)
            if hold is not None:
                first_in.set()
                hold.wait(timeout=10)

    first = threading.Thread(target=forward, args=("first", 1, release_first))
    first.start()
    assert first_in.wait(timeout=10)
    heavy = threading.Thread(target=forward, args=("heavy", 2))
    heavy.start()
    time.sleep(0.2)  # the heavy forward is in line, waiting for the first's core
    later = threading.Thread(target=forward, args=("later", 1))
    later.start()
    time.sleep(0.2)  # one core is free: without the line, the later forward would take it now
    release_first.set()
    for worker in (first, heavy, later):
        worker.join(timeout=10)
    assert order == ["first", "heavy", "later"]
