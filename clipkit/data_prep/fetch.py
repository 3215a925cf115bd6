"""Getting the source bytes of one row: HTTP(S) with the SSRF guard, or a local file.

HTTP uses http.client with one keep-alive connection per (thread, host, address), so a shard of URLs from the same
CDN does not pay a TCP + TLS handshake per image. Each attempt has a total time budget (`timeout`), so a server that
drips one byte every few seconds cannot hold a worker forever (one of the ways img2dataset runs hang at the end).
"""

import http.client
import os
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from typing import Dict, FrozenSet, Tuple
from urllib.parse import urljoin

from clipkit.data_prep.ssrf import Target, URLRefused, check_url

DEFAULT_USER_AGENT = "clipkit-data-prep/0.1 (image-text dataset builder; respects X-Robots-Tag noai)"
DEFAULT_DISALLOWED_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
_REDIRECTS = (301, 302, 303, 307, 308)
_RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)
_MAX_REDIRECTS = 5
_CHUNK = 1 << 16


class FetchError(Exception):
    """The bytes could not be had. `status` is the row status (failed_download, refused, opt_out), `reason` a kind."""

    def __init__(self, status: str, reason: str, message: str, retryable: bool = False):
        super().__init__(f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 32 << 20
    user_agent: str = DEFAULT_USER_AGENT
    disallowed_directives: FrozenSet[str] = DEFAULT_DISALLOWED_DIRECTIVES
    allow_private_network: bool = False


def read_local(path: str, max_bytes: int) -> bytes:
    """Reads a local image file; raises FetchError(failed_read, ...)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block open() forever, /dev/zero never ends
            raise FetchError("failed_read", "not_a_file", f"{path} is not a regular file")
        size = info.st_size
        if size > max_bytes:
            raise FetchError("failed_read", "too_large", f"{size} bytes > {max_bytes}")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # st_size lies for devices and pipes: bound the read itself
    except FileNotFoundError as e:
        raise FetchError("failed_read", "file_not_found", str(e)) from e
    except (IsADirectoryError, PermissionError, OSError) as e:
        raise FetchError("failed_read", "unreadable_file", str(e)) from e
    if len(data) > max_bytes:
        raise FetchError("failed_read", "too_large", f"more than {max_bytes} bytes")
    return data


def robots_disallowed(values, user_agent_token: str, disallowed: FrozenSet[str]) -> str | None:
    """The X-Robots-Tag directive that forbids use, honouring `botname: directive` scoping, or None."""
    for value in values:
        scope, sep, rest = value.partition(":")
        if sep and scope.strip().lower() not in ("unavailable_after", "max-snippet", "max-image-preview"):
            if scope.strip().lower() not in (user_agent_token, "*"):
                continue
            value = rest
        for directive in value.split(","):
            directive = directive.strip().lower()
            if directive in disallowed:
                return directive
    return None


class _PinnedMixin:
    """Connects to the address the SSRF guard checked instead of resolving the host name again."""

    pinned_address: str = ""

    def _pinned_create(self, address, timeout=None, source_address=None):
        return socket.create_connection((self.pinned_address, address[1]), timeout, source_address)


class _PinnedHTTPConnection(_PinnedMixin, http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float):
        super().__init__(target.host, target.port, timeout=timeout)
        self.pinned_address = target.address
        self._create_connection = self._pinned_create


class _PinnedHTTPSConnection(_PinnedMixin, http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout: float, context: ssl.SSLContext):
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self.pinned_address = target.address
        self._create_connection = self._pinned_create


class HttpFetcher:
    """Thread-safe downloader: each thread keeps its own keep-alive connections."""

    def __init__(self, options: FetchOptions):
        self.options = options
        self.ua_token = options.user_agent.split("/", 1)[0].split()[0].lower() if options.user_agent else ""
        self._local = threading.local()
        self._ssl_context: ssl.SSLContext | None = None

    def _connections(self) -> Dict[Tuple[str, str, int, str], http.client.HTTPConnection]:
        if not hasattr(self._local, "connections"):
            self._local.connections = {}
        return self._local.connections

    def close(self) -> None:
        for conn in self._connections().values():
            conn.close()
        self._connections().clear()

    def fetch(self, url: str) -> bytes:
        """The body of `url` after redirects, with retries and backoff; raises FetchError."""
        attempt = 0
        while True:
            try:
                return self._fetch_once(url)
            except FetchError as e:
                if not e.retryable or attempt >= self.options.retries:
                    raise
            time.sleep(min(self.options.backoff * 2**attempt, 8.0))
            attempt += 1

    def _fetch_once(self, url: str) -> bytes:
        deadline = time.monotonic() + self.options.timeout
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                target = check_url(url, self.options.allow_private_network)
            except URLRefused as e:
                status = "failed_download" if e.reason == "dns_error" else "refused"
                raise FetchError(status, e.reason, str(e)) from e
            status, location, body = self._request(target, deadline)
            if status in _REDIRECTS and location:
                url = urljoin(url, location)  # the next hop goes through check_url again
                continue
            return body
        raise FetchError("failed_download", "too_many_redirects", f"more than {_MAX_REDIRECTS} redirects")

    def _request(self, target: Target, deadline: float) -> Tuple[int, str | None, bytes]:
        key = (target.scheme, target.host, target.port, target.address)
        connections = self._connections()
        for fresh in (False, True):
            conn = None if fresh else connections.pop(key, None)
            reused = conn is not None
            if conn is None:
                conn = self._connect(target, deadline)
            try:
                result, keep = self._exchange(conn, target, deadline)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if reused:  # the server dropped an idle keep-alive connection: try once on a new one
                    continue
                raise FetchError("failed_download", "connection_error", str(e), retryable=True) from e
            except FetchError:
                conn.close()
                raise
            except TimeoutError as e:
                conn.close()
                raise FetchError("failed_download", "timeout", f"no answer in {self.options.timeout:g}s", True) from e
            except ssl.SSLError as e:  # bad or mismatched certificate: retrying will not help
                conn.close()
                raise FetchError("failed_download", "tls_error", str(e)) from e
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise FetchError("failed_download", "connection_error", f"{type(e).__name__}: {e}", True) from e
            if keep:
                connections[key] = conn
            else:
                conn.close()
            return result
        raise FetchError("failed_download", "connection_error", "connection closed")

    def _connect(self, target: Target, deadline: float) -> http.client.HTTPConnection:
        remaining = max(0.01, deadline - time.monotonic())
        if target.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            return _PinnedHTTPSConnection(target, remaining, self._ssl_context)
        return _PinnedHTTPConnection(target, remaining)

    def _exchange(self, conn, target: Target, deadline: float):
        """One request/response. Returns ((status, location, body), keep_connection)."""

        def budget() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            if conn.sock is not None:
                conn.sock.settimeout(remaining)
            return remaining

        conn.timeout = budget()
        conn.request(
            "GET",
            target.path,
            headers={"User-Agent": self.options.user_agent, "Accept": "image/*,*/*;q=0.8"},
        )
        budget()
        response = conn.getresponse()
        status = response.status
        if status in _REDIRECTS:
            location = response.getheader("Location")
            self._read_body(response, budget, 1 << 20)
            return (status, location, b""), not response.will_close
        if status != 200:
            retryable = status in _RETRY_STATUS
            self._read_body(response, budget, 1 << 20)
            raise FetchError("failed_download", f"http_{status}", f"HTTP {status} {response.reason}", retryable)
        directive = robots_disallowed(
            response.headers.get_all("X-Robots-Tag") or [], self.ua_token, self.options.disallowed_directives
        )
        if directive:
            raise FetchError("opt_out", f"x_robots_tag_{directive}", f"X-Robots-Tag: {directive}")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > self.options.max_bytes:
            raise FetchError("failed_download", "too_large", f"Content-Length {length} > {self.options.max_bytes}")
        body = self._read_body(response, budget, self.options.max_bytes)
        return (status, None, body), not response.will_close

    def _read_body(self, response, budget, limit: int) -> bytes:
        chunks, size = [], 0
        while True:
            budget()
            chunk = response.read(_CHUNK)
            if not chunk:
                if response.length:  # Content-Length promised more: the connection was cut
                    raise FetchError("failed_download", "truncated_body", f"{response.length} bytes missing", True)
                break
            size += len(chunk)
            if size > limit:
                raise FetchError("failed_download", "too_large", f"body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
