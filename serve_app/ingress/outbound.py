"""Which hosts the ingress may connect to, and at which address: one policy for image downloads and for the
predictions written to a Label Studio that a /setup named.

Hosts that resolve to loopback, private, link-local or metadata addresses are refused unless they are the
operator's Label Studio (LABEL_STUDIO_URL) or listed in IMAGE_HOST_ALLOWLIST. A name is resolved once, every
address it gives must be public, and the connection goes to the checked address (keeping the Host header and the
TLS server name), so a second lookup cannot swap in an internal one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

from serve_app.ingress.errors import BadRequest, ImageError
from serve_app.ingress.origins import origin as url_origin
from serve_app.redaction import shown_url

Target = tuple[str, dict[str, str], dict[str, str]]  # (URL to request, headers, httpx extensions)

# IPv6 ranges that carry or reach IPv4 addresses (NAT64 maps 64:ff9b::a9fe:a9fe to 169.254.169.254) or are
# deprecated local scopes; Python's is_global does not refuse all of them.
_TRANSLATING_V6 = tuple(ipaddress.ip_network(n) for n in (
    "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "::/96", "::ffff:0:0/96", "2001::/32", "fec0::/10"))


def origin(url: str) -> tuple[str, str, int]:
    """serve_app.ingress.origins.origin, with a malformed URL (bad port, broken IPv6 literal) as an ImageError."""
    try:
        return url_origin(url)
    except ValueError as exc:
        raise ImageError(f"malformed URL {shown_url(url)!r}: {exc}") from None


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        elif any(ip in network for network in _TRANSLATING_V6):
            return False
    return ip.is_global and not ip.is_multicast


def pinned(url: str, address: str) -> Target:
    """(URL with the host replaced by `address`, the Host header, the TLS server name) for one request."""
    parts = urlsplit(url)
    literal = f"[{address}]" if ":" in address else address
    netloc = literal + (f":{parts.port}" if parts.port else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")), host_header, parts.hostname or ""


class OutboundPolicy:
    def __init__(self, trusted_url: str = "", host_allowlist: frozenset[str] = frozenset()):
        # the operator's Label Studio, reached by name even where private; a /setup host is never trusted so:
        # anyone reaching /setup could otherwise point downloads at internal hosts
        self._trusted_origin = origin(trusted_url) if trusted_url else None
        self.host_allowlist = host_allowlist  # host names or host:port allowed even if private

    def allowed_without_ip_check(self, url: str) -> bool:
        address = origin(url)
        _, host, port = address
        return address == self._trusted_origin or host in self.host_allowlist \
            or f"{host}:{port}" in self.host_allowlist

    async def connect_target(self, url: str, *, what: str = "host", error: type[BadRequest] = BadRequest) -> Target:
        """(URL to request, headers, httpx extensions) that reach `url`'s host at its checked address. A refusal is
        an `error` whose message names `what` was refused ("image host", "Label Studio host")."""
        address = await self._checked_address(url, what, error)
        if address is None:
            return url, {}, {}
        target, host_header, server_name = pinned(url, address)
        return target, {"Host": host_header}, {"sni_hostname": server_name}

    async def _checked_address(self, url: str, what: str, error: type[BadRequest]) -> str | None:
        """The address to connect to, resolved once and checked: every address the name resolves to must be
        public. None for trusted hosts (the Label Studio URL, IMAGE_HOST_ALLOWLIST), reached by name."""
        if self.allowed_without_ip_check(url):
            return None
        _, host, port = origin(url)
        if not host:
            raise error(f"{what} URL has no host: {shown_url(url)!r}")
        try:
            infos = await self._resolve(host, port)
        except (socket.gaierror, UnicodeError) as exc:
            raise error(f"cannot resolve {what} {host!r}: {exc}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        blocked = [address for address in addresses if not _is_public(address)]
        if blocked or not addresses:
            raise error(f"{what} {host!r} resolves to a non-public address ({', '.join(blocked)}); "
                        "add it to IMAGE_HOST_ALLOWLIST to allow it", status_code=403)
        return addresses[0]

    @staticmethod
    async def _resolve(host: str, port: int):
        return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
