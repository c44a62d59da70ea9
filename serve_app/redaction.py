"""URLs as they may be shown: in task errors, GET /jobs and the log.

A task's image URL can carry a secret: a presigned S3 or Azure URL (`X-Amz-Signature=`, `sig=`), a `?token=`, or
`user:password@`. What the service writes about a URL keeps its scheme, host, port and path, and drops the
userinfo, the query and the fragment (marked `?…` so a reader knows something was there).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

SHOWN_CHARS = 200
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]{0,15}://[^\s'\"<>]+")


def shown_url(url: str, limit: int = SHOWN_CHARS) -> str:
    """`url` without userinfo, query and fragment, cut to `limit` characters."""
    if url.startswith("data:"):
        return url[:min(limit, 40)] + ("…" if len(url) > min(limit, 40) else "")
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        host, port = "", ""
        parts = None
    if parts is None or not parts.scheme:
        cut = re.split(r"[?#]", url, maxsplit=1)
        text = cut[0] + ("?…" if len(cut) > 1 else "")
    else:
        netloc = f"[{host}]" if ":" in host else host
        text = f"{parts.scheme}://{netloc}{port}{parts.path}" + ("?…" if parts.query or parts.fragment else "")
    return text if len(text) <= limit else text[:limit] + "…"


def redact_urls(text: str) -> str:
    """`text` with every URL in it shown as `shown_url` shows it (for messages built from other libraries' text)."""
    return _URL.sub(lambda match: shown_url(match.group(0)), text)
