"""`landmarks serve`: the album API and the Attractions page under uvicorn."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

TOKEN_KEY_ENV = "LANDMARKS_API_TOKEN_KEY"
USER_HEADER_ENV = "LANDMARKS_API_USER_HEADER"


def auth_from_env() -> tuple[bytes | None, str | None]:
    """(token key, trusted user header) from LANDMARKS_API_TOKEN_KEY / LANDMARKS_API_USER_HEADER."""
    key = os.environ.get(TOKEN_KEY_ENV) or None
    header = os.environ.get(USER_HEADER_ENV) or None
    return (key.encode("utf-8") if key else None), (header.strip() if header else None)


def page_url(host: str, port: int, token: str | None = None) -> str:
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + (f"#token={token}" if token else "")


def build_app(token_key: bytes | None = None, trusted_user_header: str | None = None):  # noqa: ANN201
    """create_app on this process's settings and database (the embedded stack when no URL is set)."""
    from shared.api.app import create_app
    from shared.db.session import make_engine
    from shared.settings import get_settings

    settings = get_settings()
    if settings.database_url:
        url = settings.database_url.get_secret_value()
    else:
        from shared.stack import resolve
        url = resolve(settings).database_url
    engine = make_engine(url, pool_size=8, max_overflow=8)
    return create_app(settings, engine, token_key=token_key, trusted_user_header=trusted_user_header)


def register(cli: typer.Typer) -> None:
    """Adds `serve` to the `landmarks` command."""

    @cli.command()
    def serve(
        host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port")] = 8080,
        token_for: Annotated[Optional[str], typer.Option(
            "--token-for", help="print the page's URL with a token for this user")] = None,
    ) -> None:
        """The album API (/v1, OpenAPI at /docs) and the Attractions page (/) for one user per request.

        Set LANDMARKS_API_TOKEN_KEY (bearer tokens signed with it) or LANDMARKS_API_USER_HEADER (a
        trusted gateway sets this header to the user id and strips it from client requests)."""
        import uvicorn

        from shared.api.auth import make_token

        key, header = auth_from_env()
        if key is None and header is None:
            typer.echo(f"set {TOKEN_KEY_ENV} (a secret of at least 16 bytes) or {USER_HEADER_ENV}", err=True)
            raise typer.Exit(2)
        try:
            app = build_app(key, header)
        except ValueError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        if token_for:
            if key is None:
                typer.echo(f"--token-for needs {TOKEN_KEY_ENV}", err=True)
                raise typer.Exit(2)
            try:
                token = make_token(key, token_for)
            except ValueError as exc:  # an id no album URL can carry
                typer.echo(f"--token-for: {exc}", err=True)
                raise typer.Exit(2) from None
            typer.echo(page_url(host, port, token))
        else:
            typer.echo(page_url(host, port))
        uvicorn.run(app, host=host, port=port, log_level="info", proxy_headers=False)
