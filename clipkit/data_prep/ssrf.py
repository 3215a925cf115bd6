"""SSRF guard for URL dumps.

A scraped dump is untrusted input: a row with `http://169.254.169.254/latest/meta-data/` (cloud metadata) or
`http://10.0.0.5:8080/admin` makes a naive downloader (img2dataset's `urllib.request.urlopen`) fetch from inside the
network it runs in. Only http and https are accepted; the host is resolved here, every address it resolves to must be
public, and the connection is then made to that checked address (no second lookup, so DNS rebinding cannot swap it).
Redirects are re-checked hop by hop by the caller (`fetch.HttpFetcher`).
"""

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import List, Union
from urllib.parse import quote, urlsplit

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

# Legacy IPv4 spellings that inet_aton (and so curl, browsers, getaddrinfo) accept: 2130706433, 0x7f000001,
# 0177.0.0.1, 127.1. They are decoded here so that a resolver stub in tests cannot hide them.
_LEGACY_IPV4 = re.compile(r"[0-9a-fA-Fx.]+")
_PATH_SAFE = "/%:@!$&'()*+,;=?~-._"


class URLRefused(Exception):
    """The URL may not be fetched. `reason` is a short kind for counters (unsupported_scheme, private_address...)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """A checked URL: connect to `address`, send `Host: host[:port]`, verify TLS against `host`."""

    scheme: str
    host: str
    port: int
    path: str
    address: str


def resolve_host(host: str, port: int) -> List[str]:
    """All addresses `host` resolves to (tests replace this function to fake DNS)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address if `host` is an IP literal in any spelling (IPv6, dotted, integer, hex, octal, short)."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(host) and any(c.isdigit() for c in host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def address_refusal(ip: IPAddress) -> str | None:
    """Why `ip` may not be contacted (loopback, private, link_local...), or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return address_refusal(embedded)
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return f"{kind}_address"
    if not ip.is_global:  # 100.64/10 carrier NAT, 192.0.0/24, NAT64 well-known prefix...
        return "non_global_address"
    return None


def check_url(url: str, allow_private_network: bool = False) -> Target:
    """Parses and checks one URL; raises URLRefused. Resolves the host once and pins the address."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise URLRefused("bad_url", f"{url!r}: {e}") from e
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise URLRefused("unsupported_scheme", f"{scheme or 'no'} scheme in {url[:200]!r}: only http and https")
    host = parts.hostname
    if not host:
        raise URLRefused("bad_url", f"no host in {url[:200]!r}")
    port = port or (443 if scheme == "https" else 80)
    # Scraped URLs hold spaces and non-ASCII: percent-encode them (as browsers do), keep existing %XX escapes.
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE)
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = resolve_host(host, port)
        except (OSError, UnicodeError) as e:
            raise URLRefused("dns_error", f"{host}: {e}") from e
        if not addresses:
            raise URLRefused("dns_error", f"{host}: no address")
    if not allow_private_network:
        for address in addresses:
            reason = address_refusal(ipaddress.ip_address(address.split("%", 1)[0]))
            if reason is not None:
                raise URLRefused(reason, f"{host} resolves to {address}; pass --allow-private-network to allow it")
    return Target(scheme=scheme, host=host, port=port, path=path, address=addresses[0])
