"""
Compute Engine v1 (and Resource Manager v3) REST on `caa.providers.rest`: JSON requests with a bearer token,
Google's error bodies (`{"error": {"code", "message", "errors": [{"reason", ...}]}}`) mapped to `ProviderError`
kinds, and zone operations polled to DONE.

Kinds: 429, 5xx and the rate-limit reasons TRANSIENT; `quotaExceeded` and the zone's exhausted resource pool
QUOTA; 404 NOT_FOUND; a 401 drops the cached token and is retried once with a new one (a token the token
endpoint refuses is INVALID_CONFIG there; a fresh token Compute refuses too is INVALID_CONFIG, not retried
again); every other 4xx INVALID_CONFIG.
"""

from __future__ import annotations

import json
from typing import Any

from caa.providers.interfaces import ErrorKind, InvalidConfig, ProviderError, QuotaExceeded, TransientError
from caa.providers.rest import RestClient, RestRequest, RestResponse, poll
from caa.providers.token import TokenCache
from caa.reactors import INodeReactor

RATE_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded", "backendError", "internalError"})
QUOTA_REASONS = frozenset({"quotaExceeded", "limitExceeded"})
QUOTA_CODES = frozenset({  # operation error codes
    "ZONE_RESOURCE_POOL_EXHAUSTED", "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "QUOTA_EXCEEDED",
    "RESOURCE_POOL_EXHAUSTED",
})


def error_of_body(body: Any) -> tuple[str, str]:
    """(first reason, message) of a Google API error body, ("", "") when it is none."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", ""
    errors = error.get("errors") if isinstance(error.get("errors"), list) else []
    reason = str(errors[0].get("reason", "")) if errors and isinstance(errors[0], dict) else ""
    return reason, str(error.get("message", ""))


def resource_path(link: str) -> str:
    """`projects/...` of a Compute URL or path (https://www.googleapis.com/compute/v1/projects/..., /projects/...);
    other text as it is."""
    index = link.find("projects/")
    return link[index:] if index >= 0 else link


class ComputeClient:
    """Calls on the Compute (and Resource Manager) endpoints; `tokens` signs every attempt."""

    def __init__(
        self, reactor: INodeReactor, rest: RestClient, endpoint: str, tokens: TokenCache, poll_interval: float
    ) -> None:
        self._reactor = reactor
        self.rest = rest
        self.endpoint = endpoint.rstrip("/")
        self.tokens = tokens
        self.poll_interval = poll_interval

    def google_error(self, response: RestResponse, refused: list[bool] | None = None) -> ProviderError | None:
        """The error of one answer; `refused` (one per call) remembers a 401 already retried with a new token."""
        status = response.status
        if 200 <= status < 300:
            return None
        try:
            reason, message = error_of_body(response.json())
        except ProviderError:
            reason, message = "", ""
        message = message or response.body[:300].decode("utf-8", "replace").strip()
        text = f"HTTP {status} {reason}: {message}" if reason else f"HTTP {status}: {message}"
        if status == 401:
            if refused is None or refused:
                return InvalidConfig(text)
            refused.append(True)
            self.tokens.forget()  # the next attempt signs with a new token
            return TransientError(text)
        if status == 429 or status >= 500 or reason in RATE_REASONS:
            return TransientError(text)
        if reason in QUOTA_REASONS:
            return QuotaExceeded(text)
        if status == 404:
            return ProviderError(ErrorKind.NOT_FOUND, text)
        return InvalidConfig(text)

    async def sign(self, request: RestRequest) -> RestRequest:
        return request.with_headers({"Authorization": f"Bearer {await self.tokens.token()}"})

    def url(self, path: str) -> str:
        if path.startswith(("http://", "https://")):
            return path
        return f"{self.endpoint}/{path.lstrip('/')}"

    async def call(self, method: str, path: str, body: Any = None, what: str = "") -> Any:
        """The answer's JSON; `ProviderError(NOT_FOUND)` for a 404."""
        headers = {"Accept": "application/json"}
        data = b""
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        request = RestRequest(method, self.url(path), headers, data)
        refused: list[bool] = []
        response = await self.rest.call(request, error_of=lambda r: self.google_error(r, refused), sign=self.sign,
                                        what=what or f"{method} {path.rsplit('/', 1)[-1]}")
        return response.json()

    async def wait(self, operation: Any, timeout: float, what: str) -> None:
        """Poll a zone operation until DONE; its error as ProviderError. The operation is read on our endpoint:
        its selfLink names www.googleapis.com whatever endpoint the insert went to."""
        link = resource_path(str(operation.get("selfLink") or "")) if isinstance(operation, dict) else ""
        if not link.startswith("projects/"):
            raise TransientError(f"{what}: the answer is not an operation")
        current = operation

        async def probe() -> bool | None:
            nonlocal current
            if current.get("status") != "DONE":
                current = await self.call("GET", link, what=f"{what} (operation)")
            if current.get("status") != "DONE":
                return None
            errors = (current.get("error") or {}).get("errors") or []
            if not errors:
                return True
            code = str(errors[0].get("code", ""))
            message = "; ".join(str(e.get("message", "")) for e in errors)
            http_status = int(current.get("httpErrorStatusCode") or 400)
            text = f"{what}: {code}: {message}"
            if code in QUOTA_CODES:
                raise QuotaExceeded(text)
            if http_status == 429 or http_status >= 500:
                raise TransientError(text)
            if http_status == 404 or code == "RESOURCE_NOT_FOUND":
                raise ProviderError(ErrorKind.NOT_FOUND, text)
            raise InvalidConfig(text)

        await poll(self._reactor, probe, self.poll_interval, timeout, f"{what}: operation not done")
