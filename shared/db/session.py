"""Engines and transactions; a database that cannot be reached becomes InfrastructureError (retry the batch)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
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
