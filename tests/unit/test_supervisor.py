"""workers/supervisor.py with real child processes (small Python scripts standing in for workers): stop
signals reach every worker and the parent waits for them, a worker that exits is restarted, a crash loop
ends the parent, and a worker dies with its supervisor."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from workers.supervisor import PARENT_ENV, PROCESSES_ENV, Supervisor, resource_shares

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and prctl as on Linux")

# A stand-in worker: records its start and the signal that stopped it (as Celery's warm shutdown would).
WORKER = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1]
    with open(os.path.join(out, f"started-{os.getpid()}"), "w") as f:
        f.write(os.environ.get("LANDMARKS_WORKER_NODE", "") + " " + os.environ.get("LANDMARKS_METRICS_PORT", ""))
    def stop(signum, _frame):
        open(os.path.join(out, f"stopped-{os.getpid()}-{signum}"), "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    if os.environ.get("EXIT_AT_ONCE"):
        sys.exit(int(os.environ["EXIT_AT_ONCE"]))
    while True:
        time.sleep(0.05)
""")


def _files(out: Path, prefix: str) -> list[Path]:
    return sorted(out.glob(prefix + "*"))


def _wait(predicate, what: str, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _supervisor(tmp_path: Path, processes: int = 2, **env: str) -> Supervisor:
    command = [sys.executable, "-c", WORKER, str(tmp_path)]
    return Supervisor(processes, command, {**os.environ, **env}, metrics=True, max_backoff_s=0.05)


def _run_in_thread(supervisor: Supervisor) -> tuple[threading.Thread, list[int]]:
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(supervisor.run()), daemon=True)
    thread.start()
    return thread, status


def test_a_stop_signal_reaches_every_worker_and_the_parent_waits_for_them(tmp_path):
    supervisor = _supervisor(tmp_path)
    thread, status = _run_in_thread(supervisor)
    _wait(lambda: len(_files(tmp_path, "started-")) == 2, "both workers")
    started = [f.read_text().split() for f in _files(tmp_path, "started-")]
    assert sorted(node.split("@")[0] for node, _ in started) == ["worker0", "worker1"]
    assert len({port for _, port in started}) == 2  # a metrics port each

    supervisor.forward(signal.SIGTERM)
    thread.join(20)
    assert status == [0]
    assert len(_files(tmp_path, "stopped-")) == 2
    assert all(f.name.endswith(f"-{int(signal.SIGTERM)}") for f in _files(tmp_path, "stopped-"))
    assert not any(c.running for c in supervisor.children)


def test_a_worker_that_exits_is_restarted_and_the_other_keeps_running(tmp_path):
    supervisor = _supervisor(tmp_path)
    thread, status = _run_in_thread(supervisor)
    _wait(lambda: len(_files(tmp_path, "started-")) == 2, "both workers")
    victim, other = supervisor.children
    first_pid, other_pid = victim.process.pid, other.process.pid
    os.kill(first_pid, signal.SIGKILL)

    _wait(lambda: victim.running and victim.process.pid != first_pid, "the restart")
    assert victim.restarts == 1 and victim.last_exit == -signal.SIGKILL
    assert other.running and other.process.pid == other_pid and other.restarts == 0
    supervisor.forward(signal.SIGTERM)
    thread.join(20)
    assert status == [0]


def test_workers_that_keep_exiting_stop_the_parent_with_a_failure(tmp_path):
    supervisor = _supervisor(tmp_path, EXIT_AT_ONCE="75")
    thread, status = _run_in_thread(supervisor)
    thread.join(60)
    assert status == [1] and supervisor.gave_up
    assert len(_files(tmp_path, "started-")) >= supervisor.max_exits
    assert all(c.last_exit == 75 for c in supervisor.children)


def test_each_worker_gets_a_share_of_the_cores_and_of_the_arena_unless_told(tmp_path, monkeypatch):
    from shared import cpus
    # A pod limited to 8 CPUs on a 192-thread node: the two workers share the 8, not the node's 192.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(192)), raising=False)
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    monkeypatch.setattr(cpus, "CGROUP_ROOT", tmp_path)
    shares = resource_shares(2, {})
    assert shares["LANDMARKS_DECODE_WORKERS"] == "4"
    set_here = resource_shares(2, {"LANDMARKS_DECODE_WORKERS": "3", "LANDMARKS_DECODE_ARENA_MB": "64"})
    assert set_here == {}
    assert resource_shares(1, {}) == {}
    supervisor = Supervisor(2, ["true"], {"LANDMARKS_DECODE_WORKERS": "5"})
    for child in supervisor.children:
        assert child.env[PROCESSES_ENV] == "1"  # a worker never supervises in turn
        assert child.env["LANDMARKS_DECODE_WORKERS"] == "5"
        assert child.env[PARENT_ENV] == str(os.getpid())


def test_a_worker_stops_when_its_supervisor_is_killed(tmp_path):
    """SIGKILL leaves the supervisor no time to forward anything: Linux sends the worker SIGTERM itself."""
    grandchild = textwrap.dedent(f"""
        import os, signal, sys, time
        from workers.supervisor import stop_with_parent
        signal.signal(signal.SIGTERM, lambda *_: (open({str(tmp_path)!r} + "/stopped", "w").close(), sys.exit(0)))
        stop_with_parent(dict(os.environ))
        open({str(tmp_path)!r} + "/ready", "w").close()
        time.sleep(60)
    """)
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = {{**os.environ, {PARENT_ENV!r}: str(os.getpid())}}
        subprocess.Popen([sys.executable, "-c", {grandchild!r}], env=env)
        time.sleep(60)
    """)
    middle = subprocess.Popen([sys.executable, "-c", parent], cwd=Path(__file__).parents[2])
    try:
        _wait(lambda: (tmp_path / "ready").exists(), "the worker")
        middle.kill()
        _wait(lambda: (tmp_path / "stopped").exists(), "the worker to stop")
    finally:
        middle.kill()
        middle.wait()


def test_the_pod_is_live_but_not_ready_while_a_worker_loads_and_not_live_once_it_should_answer(tmp_path):
    from workers import supervisor_http
    supervisor = _supervisor(tmp_path)
    thread, _ = _run_in_thread(supervisor)
    try:
        _wait(lambda: all(c.running for c in supervisor.children), "both workers")
        view = supervisor_http.PodView(supervisor)  # the stand-ins never serve their metrics ports
        ready, live = view.ready(), view.live()
        assert not ready["ok"] and set(ready["processes"]) == {"0", "1"}
        assert all(p["pid"] == c.pid and not p["ok"] for p, c in zip(ready["processes"].values(), supervisor.children))
        assert live["ok"] and all("not answering" in p["detail"] for p in live["processes"].values())
        for child in supervisor.children:
            child.started_at -= supervisor_http.STARTING_GRACE_S
        assert not view.live()["ok"]
    finally:
        supervisor.forward(signal.SIGTERM)
        thread.join(20)


def test_a_pod_port_in_use_is_logged_and_the_workers_run_on(tmp_path, caplog):
    import socket

    from workers import supervisor_http
    from workers.supervisor import _serve_pod_view
    view = supervisor_http.PodView(_supervisor(tmp_path))
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        assert _serve_pod_view(view, taken.getsockname()[1]) is None
    assert "cannot serve the pod's health and metrics" in caplog.text
    assert _serve_pod_view(view, None) is None


def test_ctrl_c_reaches_each_worker_once_through_the_supervisor(tmp_path):
    """A terminal's Ctrl-C is SIGINT to its whole foreground process group. Workers in the supervisor's group
    would get it from the terminal and again from the supervisor: Celery's second SIGINT is a cold shutdown."""
    counting_worker = textwrap.dedent(f"""
        import os, signal, sys, time
        out, got = {str(tmp_path)!r}, []
        signal.signal(signal.SIGINT, lambda *_: got.append(1))
        open(os.path.join(out, f"started-{{os.getpid()}}"), "w").close()
        while not got:
            time.sleep(0.05)
        time.sleep(1.0)  # a batch committing: a second SIGINT would come now
        open(os.path.join(out, f"sigints-{{os.getpid()}}-{{len(got)}}"), "w").close()
    """)
    parent = textwrap.dedent(f"""
        import os, signal, sys
        from workers.supervisor import FORWARDED, Supervisor
        supervisor = Supervisor(2, [sys.executable, "-c", {counting_worker!r}], dict(os.environ), metrics=False)
        for signum in FORWARDED:
            signal.signal(signum, lambda received, _frame: supervisor.forward(received))
        sys.exit(supervisor.run())
    """)
    # A session of its own stands for the terminal's foreground process group.
    supervisor = subprocess.Popen([sys.executable, "-c", parent], cwd=Path(__file__).parents[2],
                                  start_new_session=True)
    try:
        _wait(lambda: len(_files(tmp_path, "started-")) == 2, "both workers")
        workers = [int(f.name.split("-")[1]) for f in _files(tmp_path, "started-")]
        assert all(os.getpgid(pid) == pid for pid in workers)  # each leads a group of its own
        os.killpg(supervisor.pid, signal.SIGINT)
        assert supervisor.wait(20) == 0
    finally:
        supervisor.kill()
        supervisor.wait()
        for started in _files(tmp_path, "started-"):  # a stand-in the signal missed must not outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(started.name.split("-")[1]), signal.SIGKILL)
    assert sorted(f.name.rsplit("-", 1)[1] for f in _files(tmp_path, "sigints-")) == ["1", "1"]
