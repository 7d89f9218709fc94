"""Engines and transactions; a database that cannot be reached becomes InfrastructureError (retry the batch)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.errors import InfrastructureError

# Connection loss, timeouts, deadlocks and serialization failures: the batch is fine, the database is not.
TRANSIENT_ERRORS = (OperationalError, InterfaceError)


def driver_url(url: str) -> str:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; we ship psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def make_engine(url: str, **kwargs) -> Engine:
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(driver_url(url), **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One unit of work: commits when the block ends, rolls back if it raises."""
    session = Session(bind=engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except TRANSIENT_ERRORS as exc:
        session.rollback()
        raise InfrastructureError(f"database unavailable ({_where(engine)}): {exc.orig or exc}") from exc
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def _where(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


@contextmanager
def session_lock(engine: Engine, key: tuple, what: str, *,
                 on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """A session-level advisory lock on ``key`` (SQL expressions), on a connection of its own, held for the
    block: unlike a transaction's lock it outlives the commits made inside, and the server frees it if the
    process dies (its connection closes). Yields whether it was taken: without ``on_wait`` a lock held
    elsewhere is not waited for (False); with it, ``on_wait`` is called, then the lock is waited for."""
    try:
        conn = engine.connect()
    except TRANSIENT_ERRORS as exc:
        raise InfrastructureError(f"database unavailable while taking {what}: {exc}") from exc
    try:
        held = bool(conn.scalar(select(func.pg_try_advisory_lock(*key))))
        if not held and on_wait is not None:
            on_wait()
            conn.scalar(select(func.pg_advisory_lock(*key)))
            held = True
        conn.commit()  # the lock outlives the transaction; an idle connection holds no snapshot
    except TRANSIENT_ERRORS as exc:
        conn.invalidate()  # a lost connection has released the lock; never pool one that may still hold it
        conn.close()
        raise InfrastructureError(f"database unavailable while taking {what}: {exc}") from exc
    if not held:
        conn.close()
        yield False
        return
    try:
        yield True
    finally:
        _unlock(conn, key)


def _unlock(conn, key: tuple) -> None:
    try:
        conn.scalar(select(func.pg_advisory_unlock(*key)))
        conn.commit()
    except TRANSIENT_ERRORS:
        conn.invalidate()  # a lost connection has released the lock; never pool one that may still hold it
    finally:
        conn.close()
