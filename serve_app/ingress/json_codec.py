"""JSON in and out of the ingress: bodies bounded and parsed off the event loop, answers that always render."""

from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse

from serve_app.ingress.errors import BadRequest

_LONG_NUMBER = re.compile(rb"\d{19}")  # an integer beyond 64 bits has at least 19 digits


def render_json(content: Any) -> bytes:
    """orjson (a /predict answer can hold megabytes of RLE), and where orjson refuses a value (an integer
    beyond 64 bits, a lone surrogate, deep nesting) the standard library with ASCII escapes: rendering the
    answer must never lose the work already done."""
    try:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(content, ensure_ascii=True, default=_plain).encode()


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else str(value)


class SafeJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return render_json(content)


def json_error(status: int, message: str) -> JSONResponse:
    return SafeJSONResponse({"status": "error", "error": message}, status_code=status)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """orjson where it means what the json module means: a parse holds the GIL throughout, so /health waits for
    it, and orjson parsed a 30 MB context a third faster. orjson turns integers beyond 64 bits into floats and
    refuses lone surrogate escapes and nesting beyond 1,024, which the json module keeps as they are, so that
    such a value fails only its own task: those bodies (any 19-digit run, or whatever orjson refuses) go to the
    json module. NaN and Infinity are refused either way."""
    if not _LONG_NUMBER.search(body):
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
    return json.loads(body, parse_constant=_refuse_constant)


async def read_json(request: Request, limit: int,
                    run_blocking: Callable[[Callable[[bytes], Any], bytes], Awaitable[Any]]) -> Any:
    """The body as JSON, bounded in bytes (MAX_REQUEST_BYTES); anything unparsable is a 400 (or 413), never a 500.
    Parsed by `run_blocking`, off the event loop: a large body takes long enough to parse to hold up /health."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is {declared} bytes; the limit is {limit} (MAX_REQUEST_BYTES)",
                         status_code=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body exceeds {limit} bytes (MAX_REQUEST_BYTES)", status_code=413)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise BadRequest("the request body is empty; expected JSON")
    try:
        return await run_blocking(parse_json, body)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, NaN, integers beyond 4,300 digits
        raise BadRequest(f"the request body is not valid JSON: {str(exc)[:200]}") from None
