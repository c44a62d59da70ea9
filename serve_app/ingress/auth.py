"""HTTP Basic auth for every route but the health checks, as Label Studio's "Basic auth" option sends it.

BASIC_AUTH_USER and BASIC_AUTH_PASS come from the replica's environment (never from Serve config
args). Both unset: no auth. One set without the other is a start-up error.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os

from fastapi.responses import JSONResponse

OPEN_PATHS = frozenset({"/", "/health"})  # Label Studio checks health without credentials
CHALLENGE = {"WWW-Authenticate": 'Basic realm="grounded-serve", charset="UTF-8"'}


class BasicAuth:
    def __init__(self, user: str, password: str):
        self._user = user.encode()
        self._password = password.encode()

    @classmethod
    def from_environment(cls) -> "BasicAuth | None":
        user, password = os.environ.get("BASIC_AUTH_USER", ""), os.environ.get("BASIC_AUTH_PASS", "")
        if not user and not password:
            return None
        if not user or not password:
            raise ValueError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        return cls(user, password)

    def allows(self, authorization: str | None) -> bool:
        scheme, _, encoded = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return False
        # compare both parts fully, whatever the first result, so timing says nothing about either
        user_ok = hmac.compare_digest(user, self._user)
        password_ok = hmac.compare_digest(password, self._password)
        return bool(sep) and user_ok and password_ok

    @staticmethod
    def refusal() -> JSONResponse:
        return JSONResponse({"status": "error", "error": "authentication required (HTTP Basic)"},
                            status_code=401, headers=CHALLENGE)
