"""fetch_bytes: file:// confined to roots, http(s) with size and time limits, pluggable schemes."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path

import pytest

from shared import fetch
from shared.errors import FetchError
from shared.fetch import fetch_bytes, register_fetcher
from shared.settings import Settings


def make_settings(**overrides) -> Settings:
    values = {"file_roots": "", "fetch_max_bytes": 1000, "fetch_timeout_s": 0.5}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    allowed = tmp_path / "photos"
    allowed.mkdir()
    (allowed / "a b.jpg").write_bytes(b"photo-bytes")
    (allowed / "sub").mkdir()
    (tmp_path / "secret.txt").write_bytes(b"secret")
    return allowed


@pytest.fixture
def settings(root: Path) -> Settings:
    return make_settings(file_roots=str(root))


# ---- file:// ----------------------------------------------------------------------------------


def test_file_under_root_with_percent_encoding(root: Path, settings: Settings) -> None:
    assert fetch_bytes(f"file://{root}/a%20b.jpg", settings) == b"photo-bytes"
    assert fetch_bytes(f"file://localhost{root}/a%20b.jpg", settings) == b"photo-bytes"


def test_second_root_is_honoured(root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.jpg").write_bytes(b"x")
    settings = make_settings(file_roots=f"{root}:{other}")
    assert fetch_bytes(f"file://{other}/x.jpg", settings) == b"x"


def test_file_exactly_at_limit_is_read(root: Path) -> None:
    (root / "max.bin").write_bytes(b"z" * 1000)
    assert len(fetch_bytes(f"file://{root}/max.bin", make_settings(file_roots=str(root)))) == 1000


@pytest.mark.parametrize(
    ("make_uri", "reason"),
    [
        (lambda r: f"file://{r.parent}/secret.txt", "outside the allowed roots"),
        (lambda r: f"file://{r}/../secret.txt", "outside the allowed roots"),
        (lambda r: f"file://{r}/%2E%2E/secret.txt", "outside the allowed roots"),
        (lambda r: f"file://{r}/sub/../../secret.txt", "outside the allowed roots"),
        (lambda r: f"file://{r}/missing.jpg", "not found"),
        (lambda r: f"file://{r}/sub", "not a regular file"),
        (lambda r: f"file://{r}", "not a regular file"),
        (lambda r: f"file://example.com{r}/a%20b.jpg", "remote host"),
        (lambda r: "file:relative/a.jpg", "absolute path"),
    ],
)
def test_file_refusals(root: Path, settings: Settings, make_uri, reason: str) -> None:
    uri = make_uri(root)
    with pytest.raises(FetchError, match=reason) as info:
        fetch_bytes(uri, settings)
    assert "\n" not in info.value.reason


def test_symlink_escaping_root_is_refused(root: Path, tmp_path: Path, settings: Settings) -> None:
    (root / "link.jpg").symlink_to(tmp_path / "secret.txt")
    (root / "linkdir").symlink_to(tmp_path)
    for name in ("link.jpg", "linkdir/secret.txt"):
        with pytest.raises(FetchError, match="outside the allowed roots"):
            fetch_bytes(f"file://{root}/{name}", settings)


def test_symlink_inside_root_is_allowed(root: Path, settings: Settings) -> None:
    (root / "alias.jpg").symlink_to(root / "a b.jpg")
    assert fetch_bytes(f"file://{root}/alias.jpg", settings) == b"photo-bytes"


def test_symlinked_root_itself_works(root: Path, tmp_path: Path) -> None:
    (tmp_path / "rootlink").symlink_to(root)
    settings = make_settings(file_roots=str(tmp_path / "rootlink"))
    assert fetch_bytes(f"file://{tmp_path}/rootlink/a%20b.jpg", settings) == b"photo-bytes"


def test_file_too_big(root: Path, settings: Settings) -> None:
    (root / "big.bin").write_bytes(b"z" * 1001)
    with pytest.raises(FetchError, match="too large.*limit 1000") as info:
        fetch_bytes(f"file://{root}/big.bin", settings)
    assert "big.bin" in info.value.reason


def test_no_roots_refuses_every_file_uri(root: Path) -> None:
    with pytest.raises(FetchError, match="no file roots configured"):
        fetch_bytes(f"file://{root}/a%20b.jpg", make_settings(file_roots=""))


def test_fifo_is_refused_without_hanging(root: Path, settings: Settings) -> None:
    import os

    os.mkfifo(root / "pipe")
    with pytest.raises(FetchError, match="not a regular file"):
        fetch_bytes(f"file://{root}/pipe", settings)


# ---- schemes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["ftp://example.com/a.jpg", "s3://bucket/key.jpg", "/plain/path.jpg"])
def test_unsupported_scheme(uri: str, settings: Settings) -> None:
    with pytest.raises(FetchError, match="unsupported URI scheme"):
        fetch_bytes(uri, settings)


def test_long_uri_is_truncated_in_reason(settings: Settings) -> None:
    with pytest.raises(FetchError) as info:
        fetch_bytes("gopher://" + "x" * 5000, settings)
    assert len(info.value.reason) < 300


def test_register_fetcher_plugs_in_a_scheme(settings: Settings, monkeypatch) -> None:
    monkeypatch.setattr(fetch, "FETCHERS", dict(fetch.FETCHERS))
    register_fetcher("Mem", lambda uri, s: uri.encode())
    assert fetch_bytes("mem://hello", settings) == b"mem://hello"


def test_plugin_os_errors_become_fetch_errors(settings: Settings, monkeypatch) -> None:
    monkeypatch.setattr(fetch, "FETCHERS", dict(fetch.FETCHERS))

    def broken(uri: str, s: Settings) -> bytes:
        raise ConnectionResetError("peer went away")

    register_fetcher("broken", broken)
    with pytest.raises(FetchError, match="peer went away"):
        fetch_bytes("broken://x", settings)


# ---- http:// ----------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/ok":
            self._send(200, b"hello")
        elif self.path == "/big":
            self._send(200, b"y" * 5000)
        elif self.path == "/big-unannounced":
            # No Content-Length: the limit must hold while streaming.
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"y" * 5000)
            self.close_connection = True
        elif self.path == "/slow":
            time.sleep(2.0)
            self._send(200, b"late")
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"d")
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/to-file":
            self.send_response(302)
            self.send_header("Location", "ftp://127.0.0.1/x")
            self.end_headers()
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(404, b"nope")

    def _send(self, code: int, body: bytes) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_http_ok(server: str) -> None:
    assert fetch_bytes(f"{server}/ok", make_settings()) == b"hello"


def test_http_follows_http_redirect(server: str) -> None:
    assert fetch_bytes(f"{server}/redirect", make_settings()) == b"hello"


def test_http_redirect_to_other_scheme_refused(server: str) -> None:
    with pytest.raises(FetchError, match="redirect to a non-HTTP URI refused"):
        fetch_bytes(f"{server}/to-file", make_settings())


def test_http_404(server: str) -> None:
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_bytes(f"{server}/missing", make_settings())


@pytest.mark.parametrize("path", ["/big", "/big-unannounced"])
def test_http_oversize_body(server: str, path: str) -> None:
    with pytest.raises(FetchError, match="too large"):
        fetch_bytes(f"{server}{path}", make_settings())


def test_http_slow_response_times_out(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_bytes(f"{server}/slow", make_settings(fetch_timeout_s=0.5))
    assert time.monotonic() - start < 1.5


def test_http_dripping_body_hits_total_deadline(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_bytes(f"{server}/drip", make_settings(fetch_timeout_s=0.5))
    assert time.monotonic() - start < 1.5


def test_connection_refused_is_fetch_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match="cannot fetch"):
        fetch_bytes(f"http://127.0.0.1:{port}/x", make_settings())
