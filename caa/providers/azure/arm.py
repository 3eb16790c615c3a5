"""
Azure Resource Manager REST on `caa.providers.rest`: JSON requests with the `api-version` query parameter and a
bearer token, ARM error bodies (`{"error": {"code", "message"}}`) mapped to `ProviderError` kinds, and
long-running operations followed to their end.

Long-running operations (ARM's async pattern): a PUT or DELETE answers 201/202 with an `Azure-AsyncOperation`
URL (GET it until its `status` is Succeeded, Failed or Canceled) or only a `Location` URL (GET it until it stops
answering 202); `Retry-After` is the poll interval. A DELETE of a missing resource answers 204 (or 404):
either is "gone".
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from caa.providers.interfaces import ErrorKind, InvalidConfig, ProviderError, QuotaExceeded, TransientError
from caa.providers.rest import RestClient, RestRequest, RestResponse, poll
from caa.providers.token import TokenCache
from caa.reactors import INodeReactor

COMPUTE_API = "2024-03-01"  # Microsoft.Compute virtualMachines, vmSizes
DISK_API = "2023-10-02"  # Microsoft.Compute disks
NETWORK_API = "2023-09-01"  # Microsoft.Network networkInterfaces, publicIPAddresses, subnets

QUOTA_CODES = frozenset({
    "QuotaExceeded", "OperationNotAllowed", "SkuNotAvailable", "AllocationFailed", "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest", "OverconstrainedZonalAllocationRequest", "PublicIPCountLimitReached",
})
NOT_FOUND_CODES = frozenset({"ResourceNotFound", "NotFound", "NotFoundError"})
TERMINAL = frozenset({"succeeded", "failed", "canceled"})


def error_of_body(body: Any) -> tuple[str, str]:
    """(code, message) of an ARM error body, ("", "") when it is none."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code", "")), str(error.get("message", ""))
    return "", ""


class ArmClient:
    """ARM calls for one subscription; `tokens` signs every attempt. An `ExpiredAuthenticationToken` answer drops
    the cached token and is retried once with a new one."""

    def __init__(
        self, reactor: INodeReactor, rest: RestClient, endpoint: str, tokens: TokenCache, poll_interval: float
    ) -> None:
        self._reactor = reactor
        self.rest = rest
        self.endpoint = endpoint.rstrip("/")
        self.tokens = tokens
        self.poll_interval = poll_interval

    def arm_error(self, response: RestResponse) -> ProviderError | None:
        status = response.status
        if 200 <= status < 300:
            return None
        try:
            code, message = error_of_body(response.json())
        except ProviderError:
            code, message = "", ""
        if not code:
            message = message or response.body[:300].decode("utf-8", "replace").strip()
        text = f"{code}: {message}" if code else f"HTTP {status}: {message}".rstrip(": ")
        if status == 401 and code == "ExpiredAuthenticationToken":
            self.tokens.forget()  # the next attempt signs with a new token
            return TransientError(text)
        if status == 429 or status >= 500:
            return TransientError(text)
        if code in QUOTA_CODES and (code != "OperationNotAllowed" or "quota" in message.lower()):
            return QuotaExceeded(text)
        if status == 404 and (code in NOT_FOUND_CODES or not code):
            return ProviderError(ErrorKind.NOT_FOUND, text)
        return InvalidConfig(text)

    async def sign(self, request: RestRequest) -> RestRequest:
        return request.with_headers({"Authorization": f"Bearer {await self.tokens.token()}"})

    def url(self, path: str, api_version: str) -> str:
        """`path` (an ARM id or any path under the endpoint) with its api-version; absolute URLs (ARM's own
        operation URLs) are kept as they are."""
        if path.startswith(("http://", "https://")):
            return path
        separator = "&" if "?" in path else "?"
        return f"{self.endpoint}{quote(path)}{separator}api-version={api_version}"

    async def call(
        self, method: str, path: str, api_version: str, body: Any = None, what: str = ""
    ) -> RestResponse:
        headers = {"Accept": "application/json"}
        data = b""
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body).encode()
        request = RestRequest(method, self.url(path, api_version), headers, data)
        return await self.rest.call(request, error_of=self.arm_error, sign=self.sign,
                                    what=what or f"{method} {path.rsplit('/', 1)[-1]}")

    async def get(self, path: str, api_version: str, what: str = "") -> Any:
        """The resource's JSON; `ProviderError(NOT_FOUND)` when ARM answers 404."""
        return (await self.call("GET", path, api_version, what=what)).json()

    async def put(self, path: str, api_version: str, body: Any, timeout: float, what: str) -> Any:
        """Create or update `path`, wait for its long-running operation, and return the resource's JSON."""
        response = await self.call("PUT", path, api_version, body, what)
        if response.status in (201, 202) or _pending(response):  # an update may answer 200 with an operation
            await self.wait(response, timeout, what)
            return await self.get(path, api_version, what)
        return response.json()

    async def delete(self, path: str, api_version: str, timeout: float, what: str) -> bool:
        """Delete `path` and wait until it is gone; False when there was nothing to delete (204 / 404)."""
        try:
            response = await self.call("DELETE", path, api_version, what=what)
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                return False
            raise
        if response.status == 204:
            return False
        if response.status == 202 or _pending(response):
            await self.wait(response, timeout, what)
        return True

    async def wait(self, started: RestResponse, timeout: float, what: str) -> None:
        """Follow the long-running operation `started` announced until it ends; its failure as ProviderError."""
        operation = started.header("azure-asyncoperation")
        location = started.header("location")
        interval = _interval(started, self.poll_interval)
        if not operation and not location:
            return  # ARM finished at once (an update without change)

        async def probe() -> bool | None:
            if operation:
                response = await self.call("GET", operation, COMPUTE_API, what=f"{what} (operation)")
                body = response.json()
                status = str(body.get("status", "")) if isinstance(body, dict) else ""
                if status.lower() not in TERMINAL:
                    return None
                if status.lower() == "succeeded":
                    return True
                code, message = error_of_body(body)
                kind = ErrorKind.QUOTA if code in QUOTA_CODES else (
                    ErrorKind.TRANSIENT if status.lower() == "canceled" or code.startswith("Internal")
                    else ErrorKind.INVALID_CONFIG)
                raise ProviderError(kind, f"{what}: {status}: {code}: {message}".rstrip(": "))
            response = await self.call("GET", location, COMPUTE_API, what=f"{what} (operation)")
            return None if response.status == 202 else True

        # poll() takes one interval; ARM's Retry-After of the first answer is the usual one for the operation.
        await poll(self._reactor, probe, interval, timeout, f"{what}: operation not finished")


def _pending(response: RestResponse) -> bool:
    """The answer announces a long-running operation."""
    return bool(response.header("azure-asyncoperation") or response.header("location"))


def _interval(response: RestResponse, default: float) -> float:
    value = response.header("retry-after")
    try:
        return max(0.05, float(value)) if value else default
    except ValueError:
        return default
