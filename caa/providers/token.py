"""
Short-lived credentials of the REST clouds: `TokenCache` holds the current one (an OAuth2 bearer token of Azure,
GCP or IBM IAM; Alibaba's temporary RRSA keys), fetches a new one (through the cloud's `fetch` coroutine, on
`caa.providers.rest`) when there is none or it is due for refresh, and lets concurrent callers share one fetch.
Due means: `margin` seconds before it expires (Azure, GCP), or once `refresh_fraction` of its lifetime has passed
since the fetch began (IBM's and Alibaba's SDKs refresh at 80 %). A token that is a string is added to the
client's `Redactor`, so an access token never reaches a log line or an error text (a fetch that returns a
structure redacts its secrets itself).

`token_response(response, what)` reads the standard OAuth2 token answer (RFC 6749 §5.1: `access_token`,
`expires_in`; Azure's IMDS sends `expires_in` as a string) and maps the standard error answer (§5.2: `error`,
`error_description`) to `InvalidConfig`: a refused client secret or assertion never works on retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from attrs import frozen
from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime

from caa.providers.interfaces import InvalidConfig, ProviderError, TransientError
from caa.providers.redact import Redactor
from caa.providers.rest import RestResponse

T = TypeVar("T")


@frozen
class BearerToken(Generic[T]):
    value: T
    refresh_at: float  # on the cache's clock


class TokenCache(Generic[T]):
    """The current token of one identity; `token()` refreshes it when it is due (see the module docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        fetch: Callable[[], Awaitable[tuple[T, float]]],
        redactor: Redactor,
        margin: float = 300.0,
        refresh_fraction: float | None = None,
    ) -> None:
        self._clock = clock
        self._fetch = fetch  # -> (token, lifetime in seconds)
        self._redactor = redactor
        self._margin = margin
        self._fraction = refresh_fraction
        self._token: BearerToken[T] | None = None
        self._lock = DeferredLock()
        self.fetches = 0

    def _refresh_at(self, started: float, lifetime: float) -> float:
        if self._fraction is not None:
            return started + self._fraction * lifetime
        # A lifetime shorter than twice the margin is used for half of it, not refetched at every call.
        return self._clock.seconds() + lifetime - min(self._margin, lifetime / 2)

    def _fresh(self) -> BearerToken[T] | None:
        token = self._token
        if token is not None and self._clock.seconds() < token.refresh_at:
            return token
        return None

    async def token(self) -> T:
        token = self._fresh()
        if token is None:
            await self._lock.acquire()
            try:
                token = self._fresh()
                if token is None:
                    started = self._clock.seconds()
                    value, lifetime = await self._fetch()
                    self.fetches += 1
                    if isinstance(value, str):
                        self._redactor.add(value)
                    token = BearerToken(value, self._refresh_at(started, lifetime))
                    self._token = token
            finally:
                self._lock.release()
        return token.value

    def forget(self) -> None:
        """Drop the token (the cloud refused it as expired): the next call fetches a new one."""
        self._token = None


def token_error(response: RestResponse) -> ProviderError | None:
    """`error_of` for token endpoints: 2xx ok; 429/5xx TRANSIENT; any other answer INVALID_CONFIG with the
    OAuth2 `error` and `error_description`."""
    if 200 <= response.status < 300:
        return None
    if response.status == 429 or response.status >= 500:
        return TransientError(f"HTTP {response.status} from the token endpoint")
    try:
        body = response.json()
    except ProviderError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        description = str(body.get("error_description", "")).splitlines()[0] if body.get("error_description") \
            else ""
        return InvalidConfig(f"token request refused: {body['error']}" + (f": {description}" if description else ""))
    return InvalidConfig(f"token request refused: HTTP {response.status}")


def token_response(response: RestResponse, what: str) -> tuple[str, float]:
    """(access token, lifetime seconds) of an OAuth2 token answer; TRANSIENT when it holds none."""
    body = response.json()
    if not isinstance(body, dict) or not body.get("access_token"):
        raise TransientError(f"{what}: the token answer holds no access_token")
    try:
        lifetime = float(body.get("expires_in", 3600))
    except (TypeError, ValueError):
        lifetime = 3600.0
    return str(body["access_token"]), max(1.0, lifetime)
