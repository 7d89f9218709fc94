"""Real services for tests: PostgreSQL and Redis on 127.0.0.1 when reachable (CI runs them), else the
embedded servers from wheels; milvus-lite as a gRPC server. Each session gets its own database."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# Every test gives the processes it starts their URLs. A process without them falls back to the embedded
# stack in LANDMARKS_HOME (by default .landmarks in the working directory) and leaves three servers running
# after the session. Set before any test module is imported, so that cached settings see it too.
FALLBACK_HOME = Path(tempfile.mkdtemp(prefix="landmarks-tests-home-"))
os.environ["LANDMARKS_HOME"] = str(FALLBACK_HOME)
# The tests' models tag a photo only at similarity 0.999 to its own gallery entry, built one photo at a time.
# bf16's rounding depends on the CPU (AVX512-BF16, AMX, or emulated) and on the batch, so LANDMARKS_PRECISION
# =auto would make a test's outcome depend on the machine: every test runs the forward in fp32 unless it asks
# for bf16 itself (tests/unit/test_embedder_precision.py and the tests that name a precision).
os.environ["LANDMARKS_PRECISION"] = "fp32"


@pytest.fixture(scope="session", autouse=True)
def no_test_falls_back_to_the_embedded_stack():
    yield
    from shared import stack
    started = (FALLBACK_HOME / stack.STATE_FILE).exists()
    if started:
        stack.down(FALLBACK_HOME)
    shutil.rmtree(FALLBACK_HOME, ignore_errors=True)
    assert not started, "a test started the embedded stack (a process without LANDMARKS_* URLs); it was stopped"


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def realdata() -> Path:
    path = Path(os.environ.get("LANDMARKS_REALDATA", REPO.parent / "shared" / "realdata")).resolve()
    if not (path / "MANIFEST.tsv").exists():
        pytest.skip(f"no real photos at {path}")
    return path


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory) -> str:
    """A URL of the maintenance database of a real PostgreSQL server."""
    if _reachable(5432):
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    from shared.stack import start_postgres
    return start_postgres(tmp_path_factory.mktemp("pg") / "data")


@contextlib.contextmanager
def _new_database(pg_server_url: str, prefix: str):
    """The URL of a database created for the caller, dropped afterwards."""
    import sqlalchemy as sa

    from shared.db.session import make_engine

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = make_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url(pg_server_url: str):
    """A fresh database migrated to head, dropped at the end."""
    from shared.db import migrate

    with _new_database(pg_server_url, "lm_test") as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def empty_database(pg_server_url: str):
    """A database no migration has run on, as a first `landmarks db upgrade` or `make demo` finds it."""
    with _new_database(pg_server_url, "lm_empty") as url:
        yield url


@pytest.fixture(scope="session")
def engine(database_url: str):
    from shared.db.session import make_engine
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory) -> str:
    if _reachable(6379):
        return "redis://127.0.0.1:6379/0"
    from shared.stack import start_redis
    return start_redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory) -> str:
    from milvus_lite.adapter.grpc.server import start_server_in_thread
    server, db, port = start_server_in_thread(data_dir=str(tmp_path_factory.mktemp("milvus")),
                                              host="127.0.0.1", port=0)
    yield f"http://127.0.0.1:{port}"
    server.stop(0)
    db.close()


@pytest.fixture
def two_cores(monkeypatch):
    """A 2-core worker (shared/runtime.py sees 2 usable CPUs); call it with the torch intra-op threads to run
    at (a worker's default on 2 cores: 1). The test process's thread count is put back afterwards."""
    import torch
    monkeypatch.setattr("shared.runtime.usable_cpus", lambda: 2)
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter) -> None:
    """The fault suite's rows (fault, events sent, tagged, failures, lost, duplicated) after the run."""
    import sys
    rows = getattr(sys.modules.get("test_faults"), "ROWS", None)
    if rows:
        terminalreporter.section("fault suite: where every event ended up")
        for row in rows:
            terminalreporter.write_line(row)
