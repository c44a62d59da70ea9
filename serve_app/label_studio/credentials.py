"""Credentials for downloading task images from Label Studio.

Label Studio 1.23 accepts two kinds of API key:
- a legacy token, sent as `Authorization: Token <key>`;
- a personal access token (PAT): a JWT *refresh* token. It is never sent as is: it is exchanged at
  `/api/token/refresh/` for an access token (5-minute lifetime) sent as `Bearer <access>`, and
  exchanged again shortly before that expires. One exchange serves all concurrent downloads.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Mapping

import httpx

from serve_app import get_logger
from serve_app.ingress.origins import origin
from serve_app.settings import environment_key

logger = get_logger(__name__)

ACCESS_LIFETIME_S = 300.0  # Label Studio's access-token lifetime when the token does not say
REFRESH_MARGIN_S = 60.0  # exchange again this long before expiry


class LabelStudioAuthError(RuntimeError):
    pass


def choose_credential(*, label_studio_url: str, setup_hostname: str, setup_token: str,
                      env: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(base URL, key, where it came from) for one Label Studio instance, or None.

    A key from the environment is only ever sent to LABEL_STUDIO_URL (the service refuses to start with the key and no
    URL), and only for that instance's requests: those whose /setup named its origin, or that came with no /setup
    host. A token that came with /setup is only ever sent to the host of that same /setup."""
    key, variable = environment_key(env)
    operators = bool(label_studio_url) and (not setup_hostname or origin(setup_hostname) == origin(label_studio_url))
    if key and operators:
        return label_studio_url, key, variable
    if setup_token and setup_hostname:
        return setup_hostname, setup_token, "the access_token Label Studio sent to /setup"
    return None


def jwt_claims(token: str) -> dict | None:
    """The payload of a JWT (unverified: only used to tell token kinds apart and to schedule refreshes)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioCredentials:
    def __init__(self, base_url: str, api_key: str, client: httpx.AsyncClient, source: str):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.client = client
        self.source = source  # which setting the key came from, for error messages
        self.is_personal_access_token = jwt_claims(api_key) is not None
        self._access: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def kind(self) -> str:
        return "personal access token" if self.is_personal_access_token else "legacy token"

    def describe(self) -> str:
        return f"{self.kind} from {self.source}"

    async def headers(self, force_refresh: bool = False) -> dict[str, str]:
        if not self.is_personal_access_token:
            return {"Authorization": f"Token {self.api_key}"}
        return {"Authorization": f"Bearer {await self._access_token(force_refresh)}"}

    async def _access_token(self, force_refresh: bool) -> str:
        stale_token = self._access
        async with self._lock:
            # Another caller may have refreshed while this one waited for the lock.
            if self._access and time.monotonic() < self._expires_at and (not force_refresh or
                                                                          self._access != stale_token):
                return self._access
            try:
                response = await self.client.post(f"{self.base_url}/api/token/refresh/",
                                                   json={"refresh": self.api_key}, timeout=10)
            except httpx.HTTPError as exc:
                raise LabelStudioAuthError(f"cannot reach {self.base_url}/api/token/refresh/ to exchange the "
                                           f"{self.describe()}: {exc}") from None
            if response.status_code != 200:
                raise LabelStudioAuthError(
                    f"Label Studio refused the {self.describe()} at /api/token/refresh/ "
                    f"(HTTP {response.status_code}); create a new personal access token")
            access = response.json().get("access", "")
            claims = jwt_claims(access) or {}
            lifetime = float(claims["exp"]) - time.time() if "exp" in claims else ACCESS_LIFETIME_S
            self._access = access
            self._expires_at = time.monotonic() + max(0.0, lifetime - REFRESH_MARGIN_S)
            logger.info("exchanged the %s for an access token valid %.0f s", self.describe(), lifetime)
            return access
