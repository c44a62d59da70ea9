"""Retrying calls that failed for a reason that passes (a restart, a full queue, a dropped connection)."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

from serve_app import get_logger

logger = get_logger(__name__)

T = TypeVar("T")

# HTTP statuses worth another try: the other side is restarting, overloaded or timed out.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class TransientError(RuntimeError):
    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is not used by Serve or Label Studio). Callers cap it:
    the other side may ask for any number of seconds, 400 digits of them included."""
    value = (value or "").strip()
    if not value.isascii() or not value.isdigit():
        return None
    return float(value) if len(value) < 16 else float("inf")


async def with_retries(call: Callable[[], Awaitable[T]], retries: int, what: str, max_delay_s: float = 30.0) -> T:
    """Retry TransientError with exponential backoff (1, 2, 4 ... max_delay_s), honouring Retry-After up to
    max_delay_s: a server that asks for a day must not hold a write slot for a day."""
    for attempt in range(retries + 1):
        try:
            return await call()
        except TransientError as exc:
            if attempt == retries:
                raise
            asked = exc.retry_after_s
            delay = min(max_delay_s, asked if asked is not None else 2.0 ** attempt)
            logger.warning("%s: %s; retry %d/%d in %.0f s%s", what, exc, attempt + 1, retries, delay,
                           f" (Retry-After {asked:g} s, capped)" if asked is not None and asked > delay else "")
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
