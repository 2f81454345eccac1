"""Who may call the client routes: the API key (when required) and the rate limit, as a FastAPI dependency."""

from typing import Annotated

from fastapi import Header, Request
from starlette.exceptions import HTTPException

from app.keys import KeyStore, RateLimiter, key_file
from app.settings import ServerSettings


class ClientAccess:
    """The dependency of every /v1 route: checks the client key when required, then the caller's rate limit
    (per key, or per client address when keys are off)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.keys, self.limiter = KeyStore(key_file(settings)), RateLimiter(settings.rate_limit_per_minute)

    def __call__(self, request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        caller = request.client.host if request.client else "unknown"
        if self.settings.require_api_key:
            scheme, _, key = (authorization or "").partition(" ")
            if scheme.lower() != "bearer" or not key:
                raise HTTPException(401, "API key required: Authorization: Bearer <key>")
            record = self.keys.verify(key)
            if record is None:
                raise HTTPException(403, "unknown or revoked API key")
            caller = f"key:{record.id}"
        wait = self.limiter.acquire(caller)
        if wait > 0:
            raise HTTPException(429, f"rate limit of {self.settings.rate_limit_per_minute} requests a minute",
                                headers={"Retry-After": str(max(1, round(wait)))})
