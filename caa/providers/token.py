"""
OAuth2 bearer tokens for the REST clouds (Azure, GCP): `TokenCache` holds the current token, fetches a new one
(through the cloud's `fetch` coroutine, on `caa.providers.rest`) when there is none or it expires within
`margin` seconds, and lets concurrent callers share one fetch. Every token fetched is added to the client's
`Redactor`, so an access token never reaches a log line or an error text.

`token_response(response, what)` reads the standard OAuth2 token answer (RFC 6749 §5.1: `access_token`,
`expires_in`; Azure's IMDS sends `expires_in` as a string) and maps the standard error answer (§5.2: `error`,
`error_description`) to `InvalidConfig`: a refused client secret or assertion never works on retry.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from attrs import frozen
from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime

from caa.providers.interfaces import InvalidConfig, ProviderError, TransientError
from caa.providers.redact import Redactor
from caa.providers.rest import RestResponse


@frozen
class BearerToken:
    value: str
    refresh_at: float  # on the cache's clock: `margin` before it expires


class TokenCache:
    """The current token of one identity; `token()` refreshes `margin` seconds before expiry."""

    def __init__(
        self,
        clock: IReactorTime,
        fetch: Callable[[], Awaitable[tuple[str, float]]],
        redactor: Redactor,
        margin: float = 300.0,
    ) -> None:
        self._clock = clock
        self._fetch = fetch  # -> (access token, lifetime in seconds)
        self._redactor = redactor
        self._margin = margin
        self._token: BearerToken | None = None
        self._lock = DeferredLock()
        self.fetches = 0

    def _fresh(self) -> BearerToken | None:
        token = self._token
        if token is not None and self._clock.seconds() < token.refresh_at:
            return token
        return None

    async def token(self) -> str:
        token = self._fresh()
        if token is None:
            await self._lock.acquire()
            try:
                token = self._fresh()
                if token is None:
                    value, lifetime = await self._fetch()
                    self.fetches += 1
                    self._redactor.add(value)
                    # A lifetime shorter than twice the margin is used for half of it, not refetched at every call.
                    token = BearerToken(value, self._clock.seconds() + lifetime - min(self._margin, lifetime / 2))
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
