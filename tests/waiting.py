"""Waiting for a condition, never for a fixed time: a test states what it waits for and how long it may take."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

POLL_S = 0.05  # how often the condition is looked at; not a duration any test depends on


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str = "the condition",
               every_s: float = POLL_S) -> Any:
    """The condition's first truthy value; fails the test with `what` after `timeout_s`. `every_s` spaces out a
    condition that costs a server some work (a Label Studio API call)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        time.sleep(every_s)
    return value


async def until(condition: Callable[[], Any], timeout_s: float, what: str = "the condition") -> Any:
    """wait_until for a test's own event loop (the condition is looked at between the loop's other work)."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:g} s"
        await asyncio.sleep(POLL_S / 5)
    return value
