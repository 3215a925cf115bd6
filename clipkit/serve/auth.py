"""Optional API key: `Authorization: Bearer KEY` on every API route (not /health, not the page's static files)."""

import hmac
from typing import Callable

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from clipkit.serve.errors import APIError

_bearer = HTTPBearer(auto_error=False, description="the service's --api-key")


def api_key_dependency(api_key: str | None) -> Callable:
    """A FastAPI dependency that refuses a missing or wrong key with 401; a no-op when `api_key` is None."""

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
        if api_key is None:
            return
        if credentials is None:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="missing_api_key")
        if not hmac.compare_digest(credentials.credentials.encode(), api_key.encode()):
            raise APIError(401, "wrong API key", code="invalid_api_key")

    return check
