"""Several recognition worker processes on one GPU, started and watched by one light parent.

One worker process carries its own Python: Celery's consumer, the batch bookkeeping and the writes. That costs
it 0.35–0.41 ms of CPU per photo (BENCHMARKS.md, eleventh session), so one process tops out near 2,500–3,000
photos a second, about the 2 MP target on one H100. `landmarks worker --processes 2`
(LANDMARKS_WORKER_PROCESSES) runs two on the same device, each with its own model and its share of the
decode processes: while one is in Python, the other's batch is on the GPU.

The parent imports neither torch nor Celery (CUDA is initialised in the workers only). It:
- resolves the stack's URLs once (starting the embedded stack if that is what the settings ask for) and
  starts each worker as `python -m shared.cli worker` with LANDMARKS_WORKER_PROCESSES=1, its own Celery node
  name, its own metrics port on 127.0.0.1, and a share of the cores and of the decode arena unless
  LANDMARKS_DECODE_WORKERS and LANDMARKS_DECODE_ARENA_MB say otherwise;
- forwards SIGTERM, SIGINT and SIGQUIT to every worker (SIGTERM is Celery's warm shutdown: running batches
  commit, prefetched events go back to Redis) and exits once all have; each worker runs in its own process
  group, so that a terminal's Ctrl-C reaches it once, through the parent, not twice (a cold shutdown);
- restarts a worker that exits on its own after a back-off (a worker exits 75 on purpose so that Redis
  redelivers its batch), and gives up when workers exit MAX_EXITS times within EXIT_WINDOW_S, stopping the
  others, so that the orchestrator sees a crash loop instead of a pod that never recovers;
- serves /healthz, /readyz and /metrics for the whole pod on LANDMARKS_METRICS_PORT: ready and live when
  every worker is, and every worker's metrics with a `process` label."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from shared.cpus import usable_cpus
from shared.logs import NODE_ENV
from shared.stack import free_port

log = logging.getLogger(__name__)

PROCESSES_ENV = "LANDMARKS_WORKER_PROCESSES"
# Exits of any worker within the window after which the parent stops them all and exits itself.
MAX_EXITS, EXIT_WINDOW_S = 5, 300.0
# A worker that ran this long before exiting is restarted at once; otherwise the wait doubles up to the cap.
HEALTHY_RUN_S, MAX_BACKOFF_S = 60.0, 30.0
POLL_S = 0.2
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def resource_shares(processes: int, environ: dict[str, str]) -> dict[str, str]:
    """What each of ``processes`` workers on one machine gets unless the environment sets it: the cores for
    its decode pool, and its part of the shared-memory arena the decode processes write into."""
    shares: dict[str, str] = {}
    if processes > 1 and not environ.get("LANDMARKS_DECODE_WORKERS"):
        shares["LANDMARKS_DECODE_WORKERS"] = str(max(1, usable_cpus() // processes))
    if processes > 1 and not environ.get("LANDMARKS_DECODE_ARENA_MB"):
        from shared import arena, spill
        directory = spill.resolve_dir(environ.get("LANDMARKS_DECODE_SPILL_DIR", "auto"))
        if directory:
            shares["LANDMARKS_DECODE_ARENA_MB"] = str(arena.arena_bytes(None, directory) // processes // 2**20)
    return shares


@dataclass
class Child:
    """One worker process slot: the process in it now, and when it may be started again."""

    index: int
    env: dict[str, str]
    port: int | None = None
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    start_after: float = 0.0
    backoff_s: float = 0.0
    restarts: int = 0
    last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        """The running worker's pid; None between an exit and the restart. Safe from the HTTP threads."""
        process = self.process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None


PARENT_ENV = "LANDMARKS_SUPERVISOR_PID"


def stop_with_parent(environ: dict[str, str]) -> None:
    """Called by a worker at start: asks Linux for SIGTERM (warm shutdown) when its supervisor dies, however
    it dies, so that no worker outlives it holding the GPU. Elsewhere, or when not supervised, nothing."""
    parent = environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Supervisor:
    """Runs ``processes`` copies of ``command`` (a worker), restarting those that exit until told to stop."""

    processes: int
    command: list[str]
    environ: dict[str, str]
    metrics: bool = True  # give each worker a metrics port of its own (the parent serves the pod's)
    max_exits: int = MAX_EXITS
    exit_window_s: float = EXIT_WINDOW_S
    healthy_run_s: float = HEALTHY_RUN_S
    max_backoff_s: float = MAX_BACKOFF_S
    # What running it changes:
    children: list[Child] = field(init=False, default_factory=list)
    exits: deque = field(init=False, default_factory=deque)  # when workers exited, within the window
    stopping: bool = field(init=False, default=False)
    stop_signal: int = field(init=False, default=signal.SIGTERM)
    gave_up: bool = field(init=False, default=False)
    signalled: set = field(init=False, default_factory=set)  # pids the stop signal was sent to

    def __post_init__(self) -> None:
        shared = {**self.environ, **resource_shares(self.processes, self.environ), PROCESSES_ENV: "1",
                  PARENT_ENV: str(os.getpid())}
        for index in range(self.processes):
            env = {**shared, NODE_ENV: f"worker{index}@{socket.gethostname()}"}
            self.children.append(Child(index, env))

    def start(self, child: Child) -> None:
        if self.metrics:
            child.port = free_port()  # a new one each time: the old may linger in TIME_WAIT
            child.env.update({"LANDMARKS_METRICS_PORT": str(child.port), "LANDMARKS_METRICS_ADDR": "127.0.0.1"})
        else:
            child.env["LANDMARKS_METRICS_PORT"] = "off"
        # A process group of its own: a terminal's Ctrl-C (SIGINT to the foreground group) reaches the worker
        # once, forwarded from here; a second SIGINT would be Celery's cold shutdown, abandoning its batches.
        # SIGTERM from an orchestrator goes to this process and is forwarded too; should this process die
        # without forwarding anything, PR_SET_PDEATHSIG (stop_with_parent) still stops the worker.
        child.process = subprocess.Popen(self.command, env=child.env, process_group=0)
        child.started_at = time.monotonic()
        log.info("started worker process %d (pid %d)", child.index, child.process.pid)

    def forward(self, signum: int) -> None:
        """Pass a stop signal on to every worker (again on a second one: Celery's cold shutdown); the parent
        exits once they all have."""
        self.stopping, self.stop_signal = True, signum
        for child in self.children:
            self._signal(child, signum)

    def _signal(self, child: Child, signum: int) -> None:
        if (pid := child.pid) is not None:
            child.process.send_signal(signum)
            self.signalled.add(pid)

    def step(self) -> int | None:
        """Reap exited workers and start those due; the parent's exit status once it should stop."""
        now = time.monotonic()
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                self._exited(child, now)
        if self.stopping:  # a worker started just as the signal came has not had it yet
            for child in self.children:
                if child.pid is not None and child.pid not in self.signalled:
                    self._signal(child, self.stop_signal)
            return None if any(c.running for c in self.children) else 0
        if self._too_many_exits(now):
            log.critical("worker processes exited %d times in %.0f s; stopping them all", len(self.exits),
                         self.exit_window_s)
            self.gave_up = True
            self.forward(signal.SIGTERM)
            return None
        for child in self.children:
            if child.process is None and now >= child.start_after:
                self.start(child)
        return None

    def _exited(self, child: Child, now: float) -> None:
        child.last_exit, child.process = child.process.returncode, None
        if self.stopping:
            log.info("worker process %d stopped (exit %s)", child.index, child.last_exit)
            return
        self.exits.append(now)
        ran_s = now - child.started_at
        child.backoff_s = (0.0 if ran_s >= self.healthy_run_s
                           else min(max(1.0, 2 * child.backoff_s), self.max_backoff_s))
        child.start_after = now + child.backoff_s
        child.restarts += 1
        log.error("worker process %d exited with %s after %.0f s; restarting it in %.0f s", child.index,
                  child.last_exit, ran_s, child.backoff_s)

    def _too_many_exits(self, now: float) -> bool:
        while self.exits and now - self.exits[0] > self.exit_window_s:
            self.exits.popleft()
        return len(self.exits) >= self.max_exits

    def run(self) -> int:
        while (status := self.step()) is None:
            time.sleep(POLL_S)
        return 1 if self.gave_up else status


def _serve_pod_view(view, port: int | None):
    """The pod's port; one in use is logged, never fatal (as in a lone worker): the workers run on."""
    if port is None:
        return None
    try:
        return view.serve(port)
    except OSError as exc:
        log.error("cannot serve the pod's health and metrics on port %s: %s", port, exc)
        return None


def supervise(processes: int, loglevel: str) -> int:
    """`landmarks worker --processes N`: N workers on this machine's device; returns the exit status."""
    from shared import metrics
    from shared.settings import get_settings
    from shared.stack import resolve
    from workers.supervisor_http import PodView

    logging.getLogger().setLevel(loglevel.upper())  # as the workers' own --loglevel
    urls = resolve(get_settings())  # once here, rather than each worker racing to start the embedded stack
    environ = {**os.environ, "LANDMARKS_DATABASE_URL": urls.database_url, "LANDMARKS_BROKER_URL": urls.broker_url,
               "LANDMARKS_MILVUS_URI": urls.milvus_uri}
    port = metrics.configured_port()
    command = [sys.executable, "-m", "shared.cli", "worker", f"--loglevel={loglevel}"]
    supervisor = Supervisor(processes, command, environ, metrics=port is not None)
    for signum in FORWARDED:
        signal.signal(signum, lambda received, _frame: supervisor.forward(received))
    server = _serve_pod_view(PodView(supervisor), port)
    log.info("supervising %d worker processes%s", processes, f"; pod health and metrics on port {server.port}"
             if server else "")
    try:
        return supervisor.run()
    finally:
        if server is not None:
            server.close()
