"""The origin of a URL, (scheme, host, port): what a credential is bound to and what host checks compare."""

from __future__ import annotations

from urllib.parse import urlsplit


def origin(url: str) -> tuple[str, str, int]:
    """`http://ls:443` and `https://ls` are different origins. ValueError for a malformed URL (a port out of
    range, a broken IPv6 literal)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)  # .port raises ValueError when out of range
    return scheme, (parts.hostname or "").lower(), port
