"""fetch_bytes: file:// confined to roots, http(s) with size and time limits, pluggable schemes."""

from __future__ import annotations

import http.server
import ipaddress
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
from pydantic import ValidationError

from shared import fetch
from shared.errors import FetchError
from shared.fetch import fetch_bytes, register_fetcher
from shared.settings import Settings


def make_settings(**overrides) -> Settings:
    values = {"file_roots": "", "fetch_max_bytes": 1000, "fetch_timeout_s": 0.5,
              "fetch_allow_private": False, "fetch_allowed_networks": ""}
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


def test_a_symlink_loop_is_a_clear_refusal(root: Path, settings: Settings) -> None:
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    with pytest.raises(FetchError, match=r"cannot open file://.*loop-a: .*(symbolic links|Too many levels)"):
        fetch_bytes(f"file://{root}/loop-a", settings)


def test_a_sibling_folder_sharing_the_root_prefix_is_outside(root: Path, settings: Settings) -> None:
    sibling = root.parent / (root.name + "-other")  # /x/root-other is not under /x/root
    sibling.mkdir()
    (sibling / "p.jpg").write_bytes(b"not yours")
    with pytest.raises(FetchError, match="outside the allowed roots"):
        fetch_bytes(f"file://{sibling}/p.jpg", settings)


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


@pytest.mark.parametrize(("uri", "shown"), [
    ("https://alice:s3cret@store.internal/p.jpg", "https://***@store.internal/p.jpg"),
    ("HTTPS://alice:s3@cr3t@store.internal/p.jpg?v=@1", "HTTPS://***@store.internal/p.jpg?v=***"),  # up to the last @
    ("https://token@store.internal/p.jpg", "https://***@store.internal/p.jpg"),
    ("https://cdn.internal/p@2x.jpg", "https://cdn.internal/p@2x.jpg"),  # an @ in the path is no user
    ("file:///photos/p@2x.jpg", "file:///photos/p@2x.jpg"),
])
def test_the_uri_in_reasons_and_logs_carries_no_user_or_password(uri: str, shown: str) -> None:
    assert fetch.short_uri(uri) == shown


@pytest.mark.parametrize(("uri", "shown"), [
    ("https://acct.blob.core.windows.net/c/p.jpg?sv=2022-11-02&se=2026-12-07T00%3A00Z&sr=b&sp=r&sig=SASsig%3D",
     "https://acct.blob.core.windows.net/c/p.jpg?sv=***&se=***&sr=***&sp=***&sig=***"),
    ("https://b.s3.amazonaws.com/p.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F20261206"
     "&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE&X-Amz-Signature=5d672d79c15b13162d9279b0855cfba6789a8edb",
     "https://b.s3.amazonaws.com/p.jpg?X-Amz-Algorithm=***&X-Amz-Credential=***&X-Amz-Security-Token=***"
     "&X-Amz-Signature=***"),
    ("https://storage.googleapis.com/b/p.jpg?X-Goog-Expires=900&X-Goog-Signature=a1b2c3",
     "https://storage.googleapis.com/b/p.jpg?X-Goog-Expires=***&X-Goog-Signature=***"),
    ("https://cdn.internal/p.jpg?eyJhbGciOiJIUzI1NiJ9.secret", "https://cdn.internal/p.jpg?***"),  # a bare token
    ("https://cdn.internal/p.jpg?a=&&b=1", "https://cdn.internal/p.jpg?a=&&b=***"),  # nothing there to hide
    ("https://cdn.internal/p.jpg#access_token=abc", "https://cdn.internal/p.jpg"),
    ("https://u:pw@cdn.internal/p.jpg?token=abc#frag", "https://***@cdn.internal/p.jpg?token=***"),
])
def test_the_uri_in_reasons_and_logs_names_its_query_parameters_but_not_their_values(uri: str, shown: str) -> None:
    assert fetch.short_uri(uri) == shown


def test_a_long_signed_uri_is_cut_after_its_values_are_hidden() -> None:
    shown = fetch.short_uri("https://cdn.internal/" + "p" * 150 + ".jpg?sig=" + "s" * 400 + "&X-Amz-Signature=x")
    assert len(shown) <= 200 and "sss" not in shown and shown.endswith("…")


def test_a_signed_urls_signature_stays_out_of_the_failure_reason(server: str) -> None:
    """The reason is what `landmarks photo` shows and what the pipeline logs ("photo failed at fetch: ...")."""
    query = "sv=2022-11-02&se=2026-12-07T00%3A00Z&sr=b&sp=r&sig=SECRETSASSIGNATURE%3D"
    with pytest.raises(FetchError) as info:
        fetch_bytes(f"{server}/status/403?{query}", local_settings())
    assert info.value.reason == (f"HTTP 403 Forbidden for {server}/status/403?sv=***&se=***&sr=***&sp=***&sig=***")
    assert "SECRETSASSIGNATURE" not in str(info.value)


def test_a_password_in_the_uri_stays_out_of_the_failure_reason(settings: Settings) -> None:
    with pytest.raises(FetchError) as info:
        fetch_bytes("gopher://alice:s3cret@store.internal/p.jpg", settings)
    assert info.value.reason == "unsupported URI scheme 'gopher' in gopher://***@store.internal/p.jpg"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match=rf"cannot fetch http://\*\*\*@127\.0\.0\.1:{port}/x") as info:
        fetch_bytes(f"http://alice:s3cret@127.0.0.1:{port}/x", local_settings())
    assert "s3cret" not in info.value.reason and "alice" not in info.value.reason


def test_register_fetcher_plugs_in_a_scheme(settings: Settings, monkeypatch) -> None:
    monkeypatch.setattr(fetch, "FETCHERS", dict(fetch.FETCHERS))
    register_fetcher("Mem", lambda uri, s: uri.encode())
    assert fetch_bytes("mem://hello", settings) == b"mem://hello"


def test_plugin_os_errors_become_fetch_errors(settings: Settings, monkeypatch) -> None:
    monkeypatch.setattr(fetch, "FETCHERS", dict(fetch.FETCHERS))

    def broken(uri: str, s: Settings) -> bytes:
        raise ConnectionResetError("peer went away")

    register_fetcher("broken", broken)
    with pytest.raises(FetchError, match="peer went away") as info:
        fetch_bytes("broken://x", settings)
    assert info.value.transient  # a reset connection: the store may answer later


@pytest.mark.parametrize(("error", "transient"), [
    (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
    (TimeoutError("timed out"), True),
    (ConnectionRefusedError(111, "Connection refused"), True),
    (PermissionError(13, "Permission denied"), False),
    (ValueError("bad bucket name"), False),
])
def test_a_plugins_errors_are_transient_only_when_the_store_may_answer_later(settings: Settings, monkeypatch,
                                                                               error, transient) -> None:
    monkeypatch.setattr(fetch, "FETCHERS", dict(fetch.FETCHERS))

    def failing(uri: str, s: Settings) -> bytes:
        raise error

    register_fetcher("store", failing)
    with pytest.raises(FetchError) as info:
        fetch_bytes("store://bucket/photo.jpg", settings)
    assert info.value.transient is transient


# ---- http:// ----------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    seen: list[tuple[str, str]] = []  # (path, Host header) of every request the server answered

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append((self.path, self.headers.get("Host", "")))
        if self.path.startswith("/ok"):
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
        elif self.path == "/drip-headers":
            self._drip_headers()
        elif self.path == "/to-file":
            self._redirect("ftp://127.0.0.1/x")
        elif self.path == "/redirect":
            self._redirect("/ok")
        elif self.path.startswith("/to?u="):
            self._redirect(unquote(self.path[len("/to?u="):]))
        elif self.path.startswith("/status/"):
            self._send(int(self.path.split("?")[0].rsplit("/", 1)[1]), b"answer")
        elif self.path == "/cut":  # promises 100 bytes, sends 10 and hangs up
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"c" * 10)
            self.close_connection = True
        elif self.path == "/self":
            self._redirect("/self")
        elif self.path.startswith("/loop/"):
            self._redirect(f"/loop/{int(self.path.rsplit('/', 1)[1]) + 1}")
        else:
            self._send(404, b"nope")

    def _drip_headers(self) -> None:
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(40):
                self.wfile.write(f"X-Drip-{i}: d\r\n".encode())
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(b"Content-Length: 0\r\n\r\n")
        except OSError:  # the client gave up, as it should
            self.close_connection = True

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

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


def _serve(tls: ssl.SSLContext | None = None):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    if tls is not None:
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture(scope="module")
def server():
    httpd = _serve()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def local_settings(**overrides) -> Settings:
    """The test servers listen on 127.0.0.1, which fetching refuses unless told otherwise."""
    return make_settings(fetch_allow_private=True, **overrides)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def test_http_ok(server: str) -> None:
    assert fetch_bytes(f"{server}/ok", local_settings()) == b"hello"


def test_http_follows_http_redirect(server: str) -> None:
    assert fetch_bytes(f"{server}/redirect", local_settings()) == b"hello"


def test_http_redirect_to_other_scheme_refused(server: str) -> None:
    with pytest.raises(FetchError, match="redirect to a non-HTTP URI refused"):
        fetch_bytes(f"{server}/to-file", local_settings())


def test_http_redirects_are_capped(server: str) -> None:
    with pytest.raises(FetchError, match=f"too many redirects \\(more than {fetch.MAX_REDIRECTS}\\)") as info:
        fetch_bytes(f"{server}/loop/0", local_settings())
    assert "\n" not in info.value.reason


def test_a_redirect_to_itself_is_a_one_line_reason(server: str) -> None:
    # urllib's own message spans three lines; a failure reason is one (logs, the failures table).
    with pytest.raises(FetchError, match="infinite loop") as info:
        fetch_bytes(f"{server}/self", local_settings())
    assert "\n" not in info.value.reason and "\n" not in str(info.value)


@pytest.mark.parametrize(("path", "sent"), [
    ("/ok/Tour Eiffel.jpg", "/ok/Tour%20Eiffel.jpg"),
    ("/ok/café/Sacré-Cœur.jpg", "/ok/caf%C3%A9/Sacr%C3%A9-C%C5%93ur.jpg"),
    ("/ok/東京タワー.jpg", "/ok/%E6%9D%B1%E4%BA%AC%E3%82%BF%E3%83%AF%E3%83%BC.jpg"),
    ("/ok/a%20b c.jpg?name=Notre Dame&w=2", "/ok/a%20b%20c.jpg?name=Notre%20Dame&w=2"),  # escapes stay as they are
    ("/ok/x.jpg?sig=a+b/c%3D&v=é", "/ok/x.jpg?sig=a+b/c%3D&v=%C3%A9"),
])
def test_an_http_path_with_spaces_or_non_ascii_characters_is_fetched(server: str, path: str, sent: str) -> None:
    _Handler.seen.clear()
    assert fetch_bytes(f"{server}{path}", local_settings()) == b"hello"
    assert [p for p, _ in _Handler.seen] == [sent]


def test_a_non_ascii_host_name_is_asked_for_in_idna(server: str, monkeypatch) -> None:
    asked = _resolve_as(monkeypatch, {"xn--phtos-kua.test": ["127.0.0.1"]})
    _Handler.seen.clear()
    settings = make_settings(fetch_allowed_networks="127.0.0.1/32")
    assert fetch_bytes(f"http://phötos.test:{_port(server)}/ok/é.jpg", settings) == b"hello"
    assert asked == ["xn--phtos-kua.test"]
    assert _Handler.seen == [("/ok/%C3%A9.jpg", f"xn--phtos-kua.test:{_port(server)}")]


def test_a_host_name_that_is_no_domain_name_is_a_clear_permanent_failure() -> None:
    with pytest.raises(FetchError, match=r"malformed URI http://phötos\.\.test/a\.jpg") as info:
        fetch_bytes("http://phötos..test/a.jpg", local_settings())
    assert not info.value.transient


def test_http_404(server: str) -> None:
    with pytest.raises(FetchError, match="HTTP 404") as info:
        fetch_bytes(f"{server}/missing", local_settings())
    assert not info.value.transient


@pytest.mark.parametrize(("status", "transient"), [(503, True), (500, True), (429, True), (504, True),
                                                   (403, False), (410, False), (400, False)])
def test_http_errors_are_transient_when_the_store_says_not_now(server: str, status: int, transient: bool) -> None:
    with pytest.raises(FetchError, match=f"HTTP {status}") as info:
        fetch_bytes(f"{server}/status/{status}", local_settings())
    assert info.value.transient is transient


def test_a_server_hanging_up_mid_body_is_transient(server: str) -> None:
    with pytest.raises(FetchError, match="cannot fetch") as info:
        fetch_bytes(f"{server}/cut", local_settings())
    assert info.value.transient


@pytest.mark.parametrize("path", ["/big", "/big-unannounced"])
def test_http_oversize_body(server: str, path: str) -> None:
    with pytest.raises(FetchError, match="too large"):
        fetch_bytes(f"{server}{path}", local_settings())


def test_http_slow_response_times_out(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out") as info:
        fetch_bytes(f"{server}/slow", local_settings(fetch_timeout_s=0.5))
    assert time.monotonic() - start < 1.5
    assert info.value.transient


def test_http_dripping_body_hits_total_deadline(server: str) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_bytes(f"{server}/drip", local_settings(fetch_timeout_s=0.5))
    assert time.monotonic() - start < 1.5


def test_http_dripping_headers_hit_total_deadline(server: str) -> None:
    """Each header line comes well within the socket timeout; all of them would take 4 s."""
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_bytes(f"{server}/drip-headers", local_settings(fetch_timeout_s=0.5))
    assert time.monotonic() - start < 1.5


def test_connection_refused_is_fetch_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError, match="cannot fetch") as info:
        fetch_bytes(f"http://127.0.0.1:{port}/x", local_settings())
    assert info.value.transient  # the store may be restarting


# ---- http(s): server-side request forgery -----------------------------------------------------


def test_loopback_is_refused_by_default_without_connecting(server: str) -> None:
    refusal = r"refused: 127\.0\.0\.1 is a loopback address .*LANDMARKS_FETCH_ALLOW_PRIVATE"
    with pytest.raises(FetchError, match=refusal) as info:
        fetch_bytes(f"{server}/ok-never-asked", make_settings())
    assert not info.value.transient  # a refusal stands however often it is asked
    assert not [path for path, _ in _Handler.seen if path == "/ok-never-asked"]


@pytest.mark.parametrize(("host", "kind"), [
    ("169.254.169.254", "link-local"),  # cloud metadata
    ("10.0.0.5", "private"),
    ("172.16.3.4", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "non-public"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("[::1]", "loopback"),
    ("[::]", "unspecified"),
    ("[fe80::1]", "link-local"),
    ("[fd00::1]", "private"),
    ("[ff02::1]", "multicast"),
    ("[::ffff:127.0.0.1]", "loopback"),
    ("[::ffff:169.254.169.254]", "link-local"),
    ("[::ffff:10.0.0.5]", "private"),
    ("[64:ff9b::a00:5]", "private"),  # NAT64 of 10.0.0.5
    ("[fec0::1]", "site-local"),  # deprecated, yet routed inside some networks
    ("[feff::5]", "site-local"),
])
def test_internal_addresses_are_refused_before_any_connection(host: str, kind: str) -> None:
    start = time.monotonic()
    with pytest.raises(FetchError, match=f"refused: .* {kind} address") as info:
        fetch_bytes(f"http://{host}/latest/meta-data/", make_settings(fetch_timeout_s=5))
    assert time.monotonic() - start < 1  # no connection was even tried
    assert "LANDMARKS_FETCH_ALLOW_PRIVATE" in info.value.reason and "\n" not in info.value.reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "2a00:1450::1"])
def test_public_addresses_pass(address: str) -> None:
    assert fetch.non_public_kind(ipaddress.ip_address(address)) is None


def _resolve_as(monkeypatch, answers: dict[str, list[str]]) -> list[str]:
    """Host names answer with these addresses, in turn; returns the names asked, one per lookup."""
    real, asked = socket.getaddrinfo, []

    def fake(host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        address = answers[host][min(len(asked), len(answers[host])) - 1]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]

    monkeypatch.setattr(fetch.socket, "getaddrinfo", fake)
    return asked


def test_a_name_resolving_to_loopback_is_refused(server: str, monkeypatch) -> None:
    _resolve_as(monkeypatch, {"photos.example.com": ["127.0.0.1"]})
    with pytest.raises(FetchError, match="refused: host 'photos.example.com' resolves to a loopback address 127.0.0.1"):
        fetch_bytes(f"http://photos.example.com:{_port(server)}/ok", make_settings())


def test_every_answer_of_a_name_is_checked(monkeypatch) -> None:
    real = socket.getaddrinfo

    def public_then_private(host, port, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        if host != "mixed.example.com":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("93.184.216.34", "10.0.0.5")]

    monkeypatch.setattr(fetch.socket, "getaddrinfo", public_then_private)
    with pytest.raises(FetchError, match="resolves to a private address 10.0.0.5"):
        fetch_bytes("http://mixed.example.com/a.jpg", make_settings())


def test_real_localhost_is_refused_by_default_and_allowed_when_configured(server: str) -> None:
    uri = f"http://localhost:{_port(server)}/ok"
    with pytest.raises(FetchError, match="refused: host 'localhost' resolves to a loopback address"):
        fetch_bytes(uri, make_settings())
    # localhost may answer ::1 first, where nothing listens: the next checked address is tried.
    assert fetch_bytes(uri, local_settings()) == b"hello"


@pytest.mark.parametrize("target", [
    "http://127.0.0.2:{port}/ok",
    "http://[::ffff:127.0.0.2]:{port}/ok",
    "http://10.0.0.5/ok",
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
])
def test_a_redirect_to_an_internal_address_is_refused(server: str, target: str) -> None:
    only_the_server = make_settings(fetch_allowed_networks="127.0.0.1/32", fetch_timeout_s=5)
    assert fetch_bytes(f"{server}/ok", only_the_server) == b"hello"
    location = target.format(port=_port(server))
    with pytest.raises(FetchError, match="refused: .* address"):
        fetch_bytes(f"{server}/to?u={quote(location, safe='')}", only_the_server)


def test_the_checked_address_is_the_one_connected_to(server: str, monkeypatch) -> None:
    # A rebinding DNS server answers an allowed address to the check, then an internal one.
    asked = _resolve_as(monkeypatch, {"photos.test": ["127.0.0.1", "10.0.0.5"]})
    _Handler.seen.clear()
    uri = f"http://photos.test:{_port(server)}/ok-pinned"
    assert fetch_bytes(uri, make_settings(fetch_allowed_networks="127.0.0.1/32")) == b"hello"
    assert asked == ["photos.test"]  # resolved once: the socket went to the address checked
    assert _Handler.seen == [("/ok-pinned", f"photos.test:{_port(server)}")]  # Host stays the name


@pytest.mark.parametrize(("networks", "allowed"), [
    ("127.0.0.0/8", True),
    ("10.0.0.0/8, 127.0.0.1/32", True),
    ("::1/128", False),
    ("10.0.0.0/8", False),
    ("", False),
])
def test_allowed_networks(server: str, networks: str, allowed: bool) -> None:
    settings = make_settings(fetch_allowed_networks=networks)
    if allowed:
        assert fetch_bytes(f"{server}/ok", settings) == b"hello"
    else:
        with pytest.raises(FetchError, match="refused"):
            fetch_bytes(f"{server}/ok", settings)


def test_a_bad_allowed_network_fails_at_start_up() -> None:
    with pytest.raises(ValidationError, match="fetch_allowed_networks"):
        make_settings(fetch_allowed_networks="10.0.0.0/33")


def test_proxy_variables_are_not_used(server: str, monkeypatch) -> None:
    # A proxy would resolve the name itself, out of reach of the address check.
    monkeypatch.setenv("http_proxy", "http://10.0.0.5:3128")
    assert fetch_bytes(f"{server}/ok", local_settings()) == b"hello"


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """An https server on 127.0.0.1 whose certificate names only photos.test."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=photos.test", "-addext", "subjectAltName=DNS:photos.test",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd = _serve(context)
    yield httpd.server_address[1], cert
    httpd.shutdown()
    httpd.server_close()


def test_https_to_a_checked_address_verifies_the_host_name(tls_server, monkeypatch) -> None:
    port, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate
    _resolve_as(monkeypatch, {"photos.test": ["127.0.0.1"]})
    settings = make_settings(fetch_allowed_networks="127.0.0.1/32", fetch_timeout_s=5)
    assert fetch_bytes(f"https://photos.test:{port}/ok", settings) == b"hello"  # SNI and check on the name
    with pytest.raises(FetchError, match="(?i)certificate|hostname|IP address mismatch"):
        fetch_bytes(f"https://127.0.0.1:{port}/ok", settings)  # the certificate does not name the address


def test_https_dripping_headers_hit_total_deadline(tls_server, monkeypatch) -> None:
    port, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    _resolve_as(monkeypatch, {"photos.test": ["127.0.0.1"]})
    start = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        fetch_bytes(f"https://photos.test:{port}/drip-headers",
                    make_settings(fetch_allowed_networks="127.0.0.1/32", fetch_timeout_s=0.5))
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("size, outcome", [(900, "read whole"), (1500, "too large")])
def test_a_file_that_grew_after_fstat_is_read_whole_or_refused(root: Path, settings: Settings, monkeypatch,
                                                               size: int, outcome: str) -> None:
    path = root / "growing.jpg"
    path.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    real_fstat = fetch.os.fstat

    class Shrunk:  # what fstat said before the file grew
        def __init__(self, info) -> None:
            self.st_mode, self.st_size = info.st_mode, 10

    monkeypatch.setattr(fetch.os, "fstat", lambda fd: Shrunk(real_fstat(fd)))
    if outcome == "read whole":
        assert fetch_bytes(path.as_uri(), settings) == path.read_bytes()
    else:
        with pytest.raises(FetchError, match="file too large"):
            fetch_bytes(path.as_uri(), settings)
