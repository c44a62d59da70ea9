"""URLs as they may be shown: in task errors, GET /jobs and the log.

A task's image URL can carry a secret: a presigned S3 or Azure URL (`X-Amz-Signature=`, `sig=`), a `?token=`, or
`user:password@`. What the service writes about a URL keeps its scheme, host, port and path, and drops the
userinfo, the query and the fragment (marked `?…` so a reader knows something was there).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

SHOWN_CHARS = 200
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]{0,15}://[^\s'\"<>]+")


def without_secrets(url: str) -> str:
    """scheme://host:port/path of `url`: no user:password, query or fragment. ValueError for a malformed URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def shown_url(url: str, limit: int = SHOWN_CHARS) -> str:
    """`url` without userinfo, query and fragment (marked `?…` when there was one), cut to `limit` characters."""
    if url.startswith("data:"):
        return url[:min(limit, 40)] + ("…" if len(url) > min(limit, 40) else "")
    cut = re.split(r"[?#]", url, maxsplit=1)
    marker = "?…" if len(cut) > 1 else ""
    try:
        text = (without_secrets(url) if urlsplit(url).scheme else cut[0]) + marker
    except ValueError:
        text = cut[0] + marker
    return text if len(text) <= limit else text[:limit] + "…"


def redact_urls(text: str) -> str:
    """`text` with every URL in it shown as `shown_url` shows it (for messages built from other libraries' text)."""
    return _URL.sub(lambda match: shown_url(match.group(0)), text)
