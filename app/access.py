"""Who may call: the client key (when required), the per-caller rate limit and the throttle on failed
authentication, as a FastAPI dependency for the /v1 routes (the admin routes use the same `Throttle`).

Rate limits are counted by the `limits` library on the storage `VEIL_RATE_LIMIT_STORAGE` names: "memory://" (one
process) by default, or a shared store (e.g. "redis://host:6379") so that replicas of the server count together.
The client address is the TCP peer's unless it is one of `VEIL_TRUSTED_PROXIES` (see `uvicorn_options` in app.api).
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Header, Request
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter
from starlette.exceptions import HTTPException

from app.keys import KeyStore, key_file
from app.settings import ServerSettings


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class Throttle:
    """Requests a minute per caller, and failed authentications a minute per client address (moving windows)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.limiter = MovingWindowRateLimiter(storage_from_string(settings.rate_limit_storage))
        self.requests = RateLimitItemPerMinute(settings.rate_limit_per_minute)
        self.failures = RateLimitItemPerMinute(settings.auth_failures_per_minute)

    def _count(self, item: RateLimitItem, namespace: str, caller: str, what: str) -> None:
        """Count one `namespace` event by `caller`; past the limit of `item`, 429 with Retry-After: the seconds
        until the caller's oldest event in the window leaves it."""
        if not self.limiter.hit(item, namespace, caller):
            reset = self.limiter.get_window_stats(item, namespace, caller).reset_time
            raise HTTPException(429, f"rate limit of {item.amount} {what} a minute",
                                headers={"Retry-After": str(max(1, round(reset - time.time())))})

    def admit(self, caller: str) -> None:
        """Count one request by `caller` (a key id or an address); 429 with Retry-After past the limit."""
        self._count(self.requests, "requests", caller, "requests")

    def failed(self, address: str) -> None:
        """Count a failed authentication by `address`; past the limit, 429 instead (neither counted nor audited).
        Only failures are throttled: a valid key from the same address still gets in (see SECURITY.md)."""
        self._count(self.failures, "auth-failures", address, "failed authentications")


def bearer_key(authorization: str | None) -> str | None:
    scheme, _, key = (authorization or "").partition(" ")
    return key if scheme.lower() == "bearer" and key else None


class ClientAccess:
    """The dependency of every /v1 route: checks the client key when required, then the caller's rate limit
    (per key, or per client address when keys are off). Sets `request.state.tenant`: the key's tenant, or None."""

    def __init__(self, settings: ServerSettings, throttle: Throttle) -> None:
        self.settings, self.throttle = settings, throttle
        self.keys = KeyStore(key_file(settings))

    def __call__(self, request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        caller = address = client_address(request)
        request.state.tenant = None
        if self.settings.require_api_key:
            key = bearer_key(authorization)
            record = self.keys.verify(key) if key else None
            if record is None:
                self.throttle.failed(address)
                if key is None:
                    raise HTTPException(401, "API key required: Authorization: Bearer <key>")
                raise HTTPException(403, "unknown or revoked API key")
            caller, request.state.tenant = f"key:{record.id}", record.tenant
        self.throttle.admit(caller)
