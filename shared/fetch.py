"""Fetch photo bytes by URI scheme (file://, http(s)://, or registered plug-ins) within size and time limits."""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import os
import re
import socket
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

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
        raise FetchError(f"cannot fetch {short_uri(uri)}: {_describe(exc)}", transient=_transient(exc)) from None


# The authority's user:password@ (up to its last "@", as urlsplit reads it): failure reasons and logs show the
# URI, and a password in a basic-auth URL must not end up in the failures table (nor a presigned URL's
# signature: see _query_names).
_USERINFO = re.compile(r"^([a-z][a-z0-9+.\-]*://)[^/?#]*@", re.IGNORECASE)


_HIDDEN = "***"


def short_uri(uri: str) -> str:
    """The URI as reasons and logs show it: no user or password, no query values, no fragment, one line."""
    address = without_credentials(uri)
    text = repr(address) if any(c in address for c in "\r\n\t") else address  # keep reasons on one line
    return text if len(text) <= _URI_CHARS else text[: _URI_CHARS - 1] + "…"


def without_credentials(uri: str) -> str:
    """The whole URI less what may be a credential: its user and password, its query values, its fragment."""
    uri = _USERINFO.sub(rf"\1{_HIDDEN}@", uri, count=1)
    address, _, query = uri.partition("#")[0].partition("?")
    return f"{address}?{_query_names(query)}" if query else address


def _query_names(query: str) -> str:
    """The parameters' names with their values hidden: a presigned URL's signature or token is a credential,
    and the names still tell support that the URL was a signed one. A bare item may be a token itself."""
    items = []
    for item in query.split("&"):
        name, equals, value = item.partition("=")
        items.append(f"{name}={_HIDDEN if value else ''}" if equals else (_HIDDEN if item else ""))
    return "&".join(items)


# Answers that say "not now" rather than "not this URI".
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def _transient(exc: BaseException) -> bool:
    """The storage may answer later: a refused, reset or timed-out connection, a name server that did not
    answer. Not a name that does not exist, nor a refused address."""
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    return isinstance(exc, (ConnectionError, TimeoutError, http.client.IncompleteRead))


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
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as fh:
            # Sized to the file, not the limit: read(limit + 1) allocates limit + 1 bytes on every call.
            data = _read_up_to(fh, info.st_size + 1)
            if len(data) > info.st_size:  # it grew since fstat: read on, up to the limit
                data += _read_up_to(fh, limit + 1 - len(data))
    except OSError as exc:
        raise FetchError(f"cannot read {short_uri(uri)}: {_describe(exc)}") from None
    if len(data) > limit:
        raise FetchError(f"file too large: exceeds limit {limit} bytes: {short_uri(uri)}")
    return data


def _read_up_to(fh, n: int) -> bytes:  # noqa: ANN001
    """Up to ``n`` bytes, fewer only at the end of the file (one raw read may return less)."""
    chunks, total = [], 0
    while total < n and (chunk := fh.read(n - total)):
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _allowed_path(uri: str, settings: Settings) -> str:
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
        # Strings, not pathlib: this runs once per photo, and Path objects were half its cost.
        real = os.path.realpath(raw)
    except (OSError, RuntimeError) as exc:  # symlink loops
        raise FetchError(f"cannot resolve {short_uri(uri)}: {_describe(exc)}") from None
    if not any(_is_within(real, str(root)) for root in roots):
        raise FetchError(f"file outside the allowed roots: {short_uri(uri)}")
    return real


def _is_within(path: str, root: str) -> bool:
    """`path` is `root` or below it (both absolute and resolved)."""
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


# ---- http:// and https:// -------------------------------------------------------------------

MAX_REDIRECTS = 5
_ALLOW_HINT = "set LANDMARKS_FETCH_ALLOW_PRIVATE=true or list it in LANDMARKS_FETCH_ALLOWED_NETWORKS to allow it"
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def non_public_kind(address: IPAddress) -> str | None:
    """Why an address is not on the public internet (an SSRF target), or None if it is."""
    address = _embedded_ipv4(address) or address
    kinds = (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
             ("link-local", address.is_link_local), ("multicast", address.is_multicast),
             ("reserved", address.is_reserved), ("private", address.is_private),
             # fec0::/10, deprecated (RFC 3879) but still routed inside some networks; is_global says yes.
             ("site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local))
    for kind, matches in kinds:
        if matches:
            return kind
    return None if address.is_global else "non-public"  # e.g. 100.64.0.0/10, carrier-grade NAT


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    # ::ffff:10.0.0.5 and friends reach the IPv4 address they carry, so they are judged as it.
    if isinstance(address, ipaddress.IPv4Address):
        return None
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is None and address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return embedded


def _check_address(host: str, address: IPAddress, settings: Settings) -> None:
    kind = non_public_kind(address)
    if kind is None or settings.fetch_allow_private:
        return
    candidates = {address, _embedded_ipv4(address) or address}
    if any(a in net for a in candidates for net in settings.fetch_allowed_ip_networks):
        return
    a_kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} address"
    what = f"{host} is {a_kind}" if _is_ip_literal(host) else f"host {host!r} resolves to {a_kind} {address}"
    raise FetchError(f"refused: {what} ({_ALLOW_HINT})")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _resolve_checked(host: str, port: int, settings: Settings) -> list[tuple]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # Every answer must pass, not just the first: the connection may fall through to any of them.
    for *_, sockaddr in infos:
        _check_address(host, ipaddress.ip_address(sockaddr[0]), settings)
    return infos


def _connect_checked(address: tuple[str, int], timeout: float | None, source_address: tuple[str, int] | None,
                     settings: Settings) -> socket.socket:
    """socket.create_connection, but only to addresses that passed the check, resolved once: the
    socket goes to the very address checked, so a second DNS answer cannot swap in another (rebinding)."""
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in _resolve_checked(host, port, settings):
        sock = socket.socket(family, kind, proto)
        try:
            if isinstance(timeout, (int, float)):
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError(f"no address for {host!r}")


class _ReadsBeforeDeadline(io.RawIOBase):
    """The response's socket reads, each given only the time left before the fetch's deadline."""

    def __init__(self, raw: io.RawIOBase, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._raw, self._sock, self._deadline = raw, sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int | None:  # noqa: ANN001
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self._sock.settimeout(left)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()  # the socket's own file, whose close lets the connection's socket close
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    # The socket timeout bounds each read, and http.client reads the status line and headers a line at a
    # time: a server dripping them a byte at a time would hold the fetch, and a decode process, for days.
    def __init__(self, sock: socket.socket, *args, deadline: float, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_ReadsBeforeDeadline(self.fp.detach(), sock, deadline))


# http.client connects through self._create_connection: swapping it keeps the Host header, TLS SNI
# and certificate check on the host name while the socket goes to the checked address.
class _Checked:
    """Mixed into http.client's connection classes, before them."""

    def __init__(self, *args, settings: Settings, deadline: float, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(_connect_checked, settings=settings)
        self.response_class = functools.partial(_DeadlineResponse, deadline=deadline)


class _CheckedHTTPConnection(_Checked, http.client.HTTPConnection):
    pass


class _CheckedHTTPSConnection(_Checked, http.client.HTTPSConnection):
    pass


class _CheckedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, settings: Settings, deadline: float) -> None:
        super().__init__()
        self._settings, self._deadline = settings, deadline

    def http_open(self, req):  # noqa: ANN001, ANN201, D102
        return self.do_open(_CheckedHTTPConnection, req, settings=self._settings, deadline=self._deadline)


class _CheckedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, settings: Settings, deadline: float) -> None:
        super().__init__()
        self._settings, self._deadline = settings, deadline

    def https_open(self, req):  # noqa: ANN001, ANN201, D102
        return self.do_open(_CheckedHTTPSConnection, req, context=self._context, settings=self._settings,
                            deadline=self._deadline)


class _SameSchemeRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    # urllib would also follow a redirect to ftp://; only http(s) is fetched here. Each hop opens a
    # new checked connection, so a redirect to an internal address is refused like a direct URI.
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, D102
        if urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise FetchError(f"redirect to a non-HTTP URI refused: {short_uri(newurl)}")
        if sum(getattr(req, "redirect_dict", {}).values()) >= MAX_REDIRECTS:
            raise FetchError(f"too many redirects (more than {MAX_REDIRECTS}), last to {short_uri(newurl)}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_http(uri: str, settings: Settings) -> bytes:
    # No proxy: a proxy resolves the name itself, which would undo the address check.
    deadline = time.monotonic() + settings.fetch_timeout_s  # for the whole fetch, redirects included
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _CheckedHTTPHandler(settings, deadline),
                                         _CheckedHTTPSHandler(settings, deadline), _SameSchemeRedirects)
    request = urllib.request.Request(_ascii_url(uri), headers={"User-Agent": "landmarks-fleet/0.1"})
    try:
        with opener.open(request, timeout=settings.fetch_timeout_s) as response:
            return _read_body(response, uri, settings.fetch_max_bytes)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise FetchError(f"HTTP {exc.code} {exc.reason} for {short_uri(uri)}",
                         transient=exc.code in _TRANSIENT_HTTP) from None
    except urllib.error.URLError as exc:
        raise FetchError(f"cannot fetch {short_uri(uri)}: {_describe_url_error(exc)}",
                         transient=isinstance(exc.reason, BaseException) and _transient(exc.reason)) from None
    except TimeoutError:
        raise FetchError(f"timed out after {settings.fetch_timeout_s:g} s fetching {short_uri(uri)}",
                         transient=True) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # RemoteDisconnected is a ConnectionResetError: a server that went away mid-answer.
        raise FetchError(f"cannot fetch {short_uri(uri)}: {_describe(exc)}", transient=_transient(exc)) from None


# What a URI's path and query keep as they are: their delimiters, and "%" so that escapes stay escapes.
_URL_SAFE = "/%:@!$&'()*+,;=?~"


def _ascii_url(uri: str) -> str:
    """The URI as an HTTP request line carries it: spaces and non-ASCII characters in its path and query
    percent-encoded (UTF-8), its host in IDNA. An upload path such as "/Tour Eiffel é.jpg" is a valid
    address to the storage that gave it, and http.client refuses it as it stands."""
    parts = urlsplit(uri)
    netloc = parts.netloc if parts.netloc.isascii() else _idna_netloc(parts, uri)
    return urlunsplit((parts.scheme, netloc, quote(parts.path, safe=_URL_SAFE),
                       quote(parts.query, safe=_URL_SAFE), ""))


def _idna_netloc(parts: SplitResult, uri: str) -> str:
    userinfo, at, _ = parts.netloc.rpartition("@")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
        host = f"[{host}]" if ":" in host else host  # an IPv6 literal (beside a non-ASCII user name)
        port = f":{parts.port}" if parts.port is not None else ""
    except (UnicodeError, ValueError) as exc:  # an empty or overlong label, a port that is no number
        raise FetchError(f"malformed URI {short_uri(uri)}: {_describe(exc)}") from None
    return f"{userinfo}{at}{host}{port}"


def _describe_url_error(exc: urllib.error.URLError) -> str:
    if isinstance(exc.reason, TimeoutError):
        return "timed out"
    return _describe(exc.reason) if isinstance(exc.reason, BaseException) else str(exc.reason)


def _read_body(response, uri: str, limit: int) -> bytes:  # noqa: ANN001
    status = getattr(response, "status", 200)
    if not 200 <= status < 300:
        raise FetchError(f"HTTP {status} for {short_uri(uri)}", transient=status in _TRANSIENT_HTTP)
    length = response.headers.get("Content-Length", "").strip()
    announced = int(length) if length.isdigit() else None
    if announced is not None and announced > limit:
        raise FetchError(f"response too large: {announced} bytes exceeds limit {limit}: {short_uri(uri)}")
    chunks, total = [], 0
    # read1 returns what has arrived: a body larger than the limit is refused before it is all read.
    read = getattr(response, "read1", response.read)
    while chunk := read(min(_CHUNK, limit + 1 - total) or 1):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise FetchError(f"response too large: exceeds limit {limit} bytes: {short_uri(uri)}")
    if announced is not None and total < announced:  # read1 ends quietly where the server hung up
        raise FetchError(f"cannot fetch {short_uri(uri)}: the connection closed after {total} of {announced} bytes",
                         transient=True)
    return b"".join(chunks)


register_fetcher("file", fetch_file)
register_fetcher("http", fetch_http)
register_fetcher("https", fetch_http)
