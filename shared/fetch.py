"""Fetch photo bytes by URI scheme (file://, http(s)://, or registered plug-ins) within size and time limits."""

from __future__ import annotations

import http.client
import os
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.errors import FetchError
from shared.settings import Settings

Fetcher = Callable[[str, Settings], bytes]
FETCHERS: dict[str, Fetcher] = {}

_CHUNK = 64 * 1024
_URI_CHARS = 200


def register_fetcher(scheme: str, fn: Fetcher) -> None:
    FETCHERS[scheme.lower()] = fn


def fetch_bytes(uri: str, settings: Settings) -> bytes:
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError as exc:  # e.g. a malformed IPv6 host
        raise FetchError(f"malformed URI {short_uri(uri)}: {exc}") from None
    fetcher = FETCHERS.get(scheme)
    if fetcher is None:
        raise FetchError(f"unsupported URI scheme {scheme!r} in {short_uri(uri)}")
    try:
        return fetcher(uri, settings)
    except FetchError:
        raise
    except (OSError, ValueError) as exc:  # a plug-in that forgot to wrap its errors
        raise FetchError(f"cannot fetch {short_uri(uri)}: {_describe(exc)}") from None


def short_uri(uri: str) -> str:
    text = repr(uri) if any(c in uri for c in "\r\n\t") else uri  # keep reasons on one line
    return text if len(text) <= _URI_CHARS else text[: _URI_CHARS - 1] + "…"


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


# ---- file:// ----------------------------------------------------------------------------------


def fetch_file(uri: str, settings: Settings) -> bytes:
    path = _allowed_path(uri, settings)
    # O_NOFOLLOW/O_NONBLOCK: a symlink swapped in after the check fails; a FIFO cannot hang us.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FetchError(f"file not found: {short_uri(uri)}") from None
    except OSError as exc:
        raise FetchError(f"cannot open {short_uri(uri)}: {_describe(exc)}") from None
    try:
        return _read_regular(fd, uri, settings.fetch_max_bytes)
    finally:
        os.close(fd)


def _read_regular(fd: int, uri: str, limit: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise FetchError(f"not a regular file: {short_uri(uri)}")
    if info.st_size > limit:
        raise FetchError(f"file too large: {info.st_size} bytes exceeds limit {limit}: {short_uri(uri)}")
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)  # the file may have grown since fstat
    except OSError as exc:
        raise FetchError(f"cannot read {short_uri(uri)}: {_describe(exc)}") from None
    if len(data) > limit:
        raise FetchError(f"file too large: exceeds limit {limit} bytes: {short_uri(uri)}")
    return data


def _allowed_path(uri: str, settings: Settings) -> Path:
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"file URI names a remote host {parts.netloc!r}: {short_uri(uri)}")
    roots = settings.file_root_paths
    if not roots:
        raise FetchError(f"file:// URIs are disabled (no file roots configured): {short_uri(uri)}")
    raw = unquote(parts.path)
    if not raw.startswith("/") or "\x00" in raw:
        raise FetchError(f"file URI needs an absolute path: {short_uri(uri)}")
    try:
        # Resolving collapses `..` and follows symlinks, so the check is on where the bytes really are.
        real = Path(raw).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise FetchError(f"cannot resolve {short_uri(uri)}: {_describe(exc)}") from None
    if not any(real.is_relative_to(root) for root in roots):
        raise FetchError(f"file outside the allowed roots: {short_uri(uri)}")
    return real


# ---- http:// and https:// -------------------------------------------------------------------


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    # urllib would also follow a redirect to ftp://; only http(s) is fetched here.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, D102
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise FetchError(f"redirect to a non-HTTP URI refused: {short_uri(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_http(uri: str, settings: Settings) -> bytes:
    # Built per call so proxy environment variables are read when used, not at import.
    opener = urllib.request.build_opener(_SameSchemeRedirects)
    request = urllib.request.Request(uri, headers={"User-Agent": "landmarks-fleet/0.1"})
    deadline = time.monotonic() + settings.fetch_timeout_s
    try:
        with opener.open(request, timeout=settings.fetch_timeout_s) as response:
            return _read_body(response, uri, settings.fetch_max_bytes, deadline)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(f"HTTP {exc.code} {exc.reason} for {short_uri(uri)}") from None
    except urllib.error.URLError as exc:
        raise FetchError(f"cannot fetch {short_uri(uri)}: {_describe_url_error(exc)}") from None
    except TimeoutError:
        raise FetchError(
            f"timed out after {settings.fetch_timeout_s:g} s fetching {short_uri(uri)}"
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise FetchError(f"cannot fetch {short_uri(uri)}: {_describe(exc)}") from None


def _describe_url_error(exc: urllib.error.URLError) -> str:
    if isinstance(exc.reason, TimeoutError):
        return "timed out"
    return _describe(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)


def _read_body(response, uri: str, limit: int, deadline: float) -> bytes:  # noqa: ANN001
    status = getattr(response, "status", 200)
    if not 200 <= status < 300:
        raise FetchError(f"HTTP {status} for {short_uri(uri)}")
    length = response.headers.get("Content-Length", "")
    if length.strip().isdigit() and int(length) > limit:
        raise FetchError(f"response too large: {int(length)} bytes exceeds limit {limit}: {short_uri(uri)}")
    chunks, total = [], 0
    # read1 returns what has arrived, so the deadline is checked between packets.
    read = getattr(response, "read1", response.read)
    while chunk := read(min(_CHUNK, limit + 1 - total) or 1):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise FetchError(f"response too large: exceeds limit {limit} bytes: {short_uri(uri)}")
        # The socket timeout is per read; a server dripping bytes must not hold us forever.
        if time.monotonic() > deadline:
            raise TimeoutError
    return b"".join(chunks)


register_fetcher("file", fetch_file)
register_fetcher("http", fetch_http)
register_fetcher("https", fetch_http)
