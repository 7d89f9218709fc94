"""The services a run uses without touching a fleet's: a scratch PostgreSQL database, a private milvus-lite
server, its own Redis queues."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def service_urls(settings) -> tuple[str, str]:
    """PostgreSQL server and Redis broker: LANDMARKS_* when set, else the embedded stack's."""
    database = settings.database_url.get_secret_value() if settings.database_url else None
    broker = settings.broker_url.get_secret_value() if settings.broker_url else None
    if database is None or broker is None:
        from shared.stack import resolve
        urls = resolve(settings)
        database, broker = database or urls.database_url, broker or urls.broker_url
    return database, broker


@contextmanager
def scratch_database(server_url: str) -> Iterator[str]:
    """A fresh database on the server of `server_url`, migrated to head, dropped at the end."""
    import sqlalchemy as sa
    from shared.db import migrate
    from shared.db.session import make_engine
    name = f"lm_bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = admin.url.set(database=name).render_as_string(hide_password=False)
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def private_milvus(folder: Path) -> Iterator[str]:
    """A milvus-lite gRPC server of the bench's own (a separate process, as in the embedded stack): the
    bench publishes and activates its model there, never moving a real fleet's `lm_active` alias."""
    from shared.stack import start_milvus, stop_milvus
    state: dict = {}
    try:
        yield start_milvus(folder / "milvus", state)
    finally:
        stop_milvus(state)


@contextmanager
def bench_queues(broker_url: str) -> Iterator[tuple[str, str]]:
    """A queue of the bench's own and a staging queue next to it; both deleted at the end."""
    import redis
    from shared.stack import redis_client_url
    name = f"lm_bench_{uuid.uuid4().hex[:8]}"
    try:
        yield name, f"{name}_staging"
    finally:
        client = redis.Redis.from_url(redis_client_url(broker_url), socket_timeout=5)
        for key in client.scan_iter(f"{name}*"):
            client.delete(key)
        # kombu's binding tables are named after the exchange (Celery names it after the queue):
        # `_kombu.binding.<q>` and, since kombu 5.7, `_kombu.binding_permanent.<q>`.
        for key in client.scan_iter(f"_kombu.binding*.{name}*"):
            client.delete(key)
        for key in client.scan_iter("_kombu.binding.*"):
            if client.type(key) == b"set":
                members = [m for m in client.smembers(key) if name.encode() in m]
                if members:
                    client.srem(key, *members)
        client.close()
