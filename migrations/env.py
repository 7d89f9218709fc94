"""Alembic environment: runs migrations with lock and statement timeouts, as Warehouse does."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool, text

from shared.db.models import Base

config = context.config
target_metadata = Base.metadata

# A migration that waits on a lock blocks every worker queued behind it: fail fast and retry instead.
LOCK_TIMEOUT = config.attributes.get("lock_timeout", "4s")
STATEMENT_TIMEOUT = config.attributes.get("statement_timeout", "60s")

if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass it via shared.db.migrate or sqlalchemy.url")
    return url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(), target_metadata=target_metadata, literal_binds=True, dialect_opts={"paramstyle": "named"}
    )
    with context.begin_transaction():
        context.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
        context.execute(f"SET statement_timeout = '{STATEMENT_TIMEOUT}'")
        context.run_migrations()


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True)
    with context.begin_transaction():
        connection.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": LOCK_TIMEOUT})
        connection.execute(text("SELECT set_config('statement_timeout', :v, true)"), {"v": STATEMENT_TIMEOUT})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
