"""Our exceptions for Kubernetes API failures, so callers never see `kubernetes`' or urllib3's types.

`KubeError.status` is the HTTP status (0 when no response came back); `reason` is the API's Status reason.
"""

from __future__ import annotations

import json

import urllib3.exceptions
from kubernetes.client.exceptions import ApiException


class KubeError(Exception):
    """An API call failed; `status` is the HTTP status (0: no response), `reason` the Status reason."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


class NotFound(KubeError):
    """404: the object (or its namespace, or the resource type) does not exist."""


class Conflict(KubeError):
    """409: the object exists already (create) or changed meanwhile (stale resourceVersion)."""


class Gone(KubeError):
    """410: the resourceVersion asked for is older than the server keeps (watch must re-list)."""


class Invalid(KubeError):
    """422: the object violates its schema or validation."""


class Forbidden(KubeError):
    """401/403: not authenticated, or RBAC denies the verb."""


class Unavailable(KubeError):
    """No usable answer: connection refused or dropped, 429, 5xx. Worth retrying later."""


class KubeTimeout(Unavailable):
    """The call did not finish within its deadline."""


_BY_STATUS: dict[int, type[KubeError]] = {404: NotFound, 409: Conflict, 410: Gone, 422: Invalid,
                                          401: Forbidden, 403: Forbidden}


def from_status(status: int, message: str, reason: str = "") -> KubeError:
    """The exception for an HTTP status (or a watch ERROR event's Status code)."""
    kind = _BY_STATUS.get(status)
    if kind is None:
        kind = Unavailable if status == 429 or status >= 500 or status == 0 else KubeError
    return kind(message, status, reason)


def from_status_object(status: dict[str, object]) -> KubeError:
    """The exception for a `Status` object (the body of an error response or a watch ERROR event)."""
    code = status.get("code")
    return from_status(code if isinstance(code, int) else 0, str(status.get("message") or "API error"),
                       str(status.get("reason") or ""))


def _is_timeout(e: BaseException) -> bool:
    if isinstance(e, urllib3.exceptions.TimeoutError | TimeoutError):
        return True
    reason = getattr(e, "reason", None)  # MaxRetryError wraps the last attempt's error
    return isinstance(reason, BaseException) and reason is not e and _is_timeout(reason)


def map_exception(e: BaseException, what: str) -> BaseException:
    """Our exception for what the client raised during `what`; anything unknown is returned as is."""
    if isinstance(e, KubeError):
        return e
    if isinstance(e, ApiException):
        status, message, reason = int(e.status or 0), str(e.reason or ""), ""
        try:
            body = json.loads(e.body or b"")
        except (ValueError, TypeError):
            body = None
        if isinstance(body, dict):
            message, reason = str(body.get("message") or message), str(body.get("reason") or "")
        return from_status(status, f"{what}: {message}", reason)
    if _is_timeout(e):
        return KubeTimeout(f"{what}: timed out ({e})")
    if isinstance(e, urllib3.exceptions.HTTPError | ConnectionError):
        return Unavailable(f"{what}: {e}")
    return e


__all__ = ["Conflict", "Forbidden", "Gone", "Invalid", "KubeError", "KubeTimeout", "NotFound", "Unavailable",
           "from_status", "from_status_object", "map_exception"]
