"""Run the Alembic migrations in migrations/ programmatically (CLI, stack start-up, tests)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, pool
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.db.session import driver_url
from shared.errors import InfrastructureError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_LOCATION = ROOT / "migrations"


def config(url: str, **attributes) -> Config:
    cfg = Config(str(ROOT / "alembic.ini")) if (ROOT / "alembic.ini").exists() else Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    # Through attributes, not the ini: a URL with '%' in its password would break interpolation.
    cfg.attributes["url"] = driver_url(url)
    cfg.attributes["configure_logging"] = False
    cfg.attributes.update(attributes)
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    _run(command.upgrade, url, revision)


def downgrade(url: str, revision: str = "base") -> None:
    _run(command.downgrade, url, revision)


def current(url: str) -> str | None:
    engine = create_engine(driver_url(url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except (OperationalError, InterfaceError) as exc:
        raise InfrastructureError(f"database unavailable for migrations: {exc.orig or exc}") from exc
    finally:
        engine.dispose()


def _run(action, url: str, revision: str) -> None:
    try:
        action(config(url), revision)
    except (OperationalError, InterfaceError) as exc:
        raise InfrastructureError(f"database unavailable for migrations: {exc.orig or exc}") from exc
