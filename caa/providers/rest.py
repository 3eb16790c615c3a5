"""
The HTTP layer of the cloud REST clients (AWS today; Azure and GCP reuse it): treq on an injected
`HTTPClient`, every attempt with its own deadline on the injected clock, retries with full-jitter exponential
back-off for throttling and server errors only, and every failure a `ProviderError`.

A cloud client supplies two things per call:

- `sign(request) -> RestRequest` (sync or async): adds what authenticates the request (SigV4 headers, a bearer
  token). It runs before every attempt, so each retry is signed afresh (SigV4 dates, refreshed tokens).
- `error_of(response) -> ProviderError | None`: None for success, else the error the cloud's body means. It
  must give `ErrorKind.TRANSIENT` to throttling (429, AWS `RequestLimitExceeded`/`Throttling`, ...) and 5xx,
  and another kind to every other 4xx: the layer retries exactly the TRANSIENT errors (and lost connections
  and timed-out attempts), never the others. `http_error` is the status-only default.

A `Retry-After` header (seconds) replaces the computed back-off when larger (Azure sends it); a retry that
would end after the call's overall deadline is not made. Secrets are masked in every error text by the
client's `Redactor`.
"""

from __future__ import annotations

import inspect
import json
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import treq
from attrs import field, frozen
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectError, ConnectingCancelledError, ConnectionLost, DNSLookupError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from caa.providers.interfaces import ErrorKind, InvalidConfig, ProviderError, TransientError
from caa.providers.redact import Redactor
from caa.reactors import INodeReactor


def _headers(values: Mapping[str, str]) -> Mapping[str, str]:
    return dict(values)


@frozen
class RestRequest:
    """One HTTP request; `sign` returns a copy with more headers (`with_headers`)."""

    method: str
    url: str
    headers: Mapping[str, str] = field(factory=dict, converter=_headers)
    body: bytes = b""

    def with_headers(self, extra: Mapping[str, str]) -> RestRequest:
        return RestRequest(self.method, self.url, {**self.headers, **extra}, self.body)


@frozen
class RestResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names, last value wins
    body: bytes

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        """The body as JSON (Azure, GCP); a body that is not JSON is a TRANSIENT error (a proxy's error page)."""
        try:
            return json.loads(self.body or b"null")
        except ValueError:
            raise TransientError(f"HTTP {self.status}: the answer is not JSON") from None


@frozen
class RetryPolicy:
    """`attempts` in all; back-off before retry n (1-based) is uniform in [0, min(cap, base * 2**(n-1))]."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 10.0
    attempt_timeout: float = 30.0  # each attempt's deadline (connect, send, whole body)
    call_timeout: float = 120.0  # the deadline of the call with all its retries

    def backoff(self, retry: int, rand: Callable[[], float]) -> float:
        return float(rand()) * min(self.cap, self.base * 2.0 ** (retry - 1))


T = TypeVar("T")
Signer = Callable[[RestRequest], "RestRequest | Awaitable[RestRequest]"]
ErrorMapper = Callable[[RestResponse], "ProviderError | None"]


def http_error(response: RestResponse) -> ProviderError | None:
    """Status-only mapping: 2xx ok; 429 and 5xx TRANSIENT; 404 NOT_FOUND; other 4xx INVALID_CONFIG."""
    status = response.status
    if 200 <= status < 300:
        return None
    text = response.body[:300].decode("utf-8", "replace").strip()
    message = f"HTTP {status}: {text}" if text else f"HTTP {status}"
    if status == 429 or status >= 500:
        return TransientError(message)
    if status == 404:
        return ProviderError(ErrorKind.NOT_FOUND, message)
    return InvalidConfig(message)


def default_http_client(reactor: INodeReactor) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client on a persistent pool; close the pool (`closeCachedConnections`) at teardown."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 8
    return HTTPClient(Agent(reactor, pool=pool)), pool


class RestClient:
    """Makes calls through `http` with deadlines on `clock` and the retry policy; see the module docstring."""

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        http: HTTPClient,
        policy: RetryPolicy = RetryPolicy(),
        redactor: Redactor | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.clock = clock
        self.http = http
        self.policy = policy
        self.redactor = redactor if redactor is not None else Redactor()
        self._rand = rand

    async def call(
        self,
        request: RestRequest,
        error_of: ErrorMapper = http_error,
        sign: Signer | None = None,
        what: str = "",
    ) -> RestResponse:
        """The response `error_of` accepts, or the `ProviderError` of the last attempt (masked)."""
        what = what or f"{request.method} {request.url.split('?', 1)[0]}"
        policy = self.policy
        end = self.clock.seconds() + policy.call_timeout
        retry = 0
        while True:
            error, response = await self._attempt(request, error_of, sign, what, end)
            if error is None:
                assert response is not None
                return response
            retry += 1
            delay = policy.backoff(retry, self._rand)
            if response is not None:
                delay = max(delay, _retry_after(response))
            if not error.retryable or retry >= policy.attempts or self.clock.seconds() + delay >= end:
                raise self._masked(error)
            self._log.info("{error}; retry {retry} in {delay:.2f}s", error=self._masked(error).message, retry=retry,
                           delay=delay)
            await deferLater(self.clock, delay, lambda: None)

    async def _attempt(
        self, request: RestRequest, error_of: ErrorMapper, sign: Signer | None, what: str, end: float
    ) -> tuple[ProviderError | None, RestResponse | None]:
        signed = request
        if sign is not None:
            try:
                result = sign(request)
                signed = await result if inspect.isawaitable(result) else result
            except ProviderError as e:  # e.g. a token refresh that failed: retried when TRANSIENT
                return e, None
        timeout = max(0.001, min(self.policy.attempt_timeout, end - self.clock.seconds()))
        attempt = Deferred.fromCoroutine(self._send(signed))
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            attempt.cancel()

        # Our own timer, not addTimeout: the Agent turns a cancel into ResponseNeverReceived, and only we know
        # whether it was our deadline (retry) or the caller's cancel (propagate).
        timer = self.clock.callLater(timeout, expire)
        try:
            response = await attempt
        except Exception as e:
            if _cancelled(e):
                if expired:
                    return TransientError(f"{what}: no answer within {timeout:g}s"), None
                raise CancelledError() from None
            # DNSLookupError is no ConnectError: without it an unresolvable host escaped as a raw exception
            if isinstance(e, (ConnectError, DNSLookupError, ConnectionLost, ResponseFailed, ResponseNeverReceived)):
                return TransientError(f"{what}: {_describe(e)}"), None
            raise
        finally:
            if timer.active():
                timer.cancel()
        error = error_of(response)
        if error is not None and not error.message.startswith(what):
            error = ProviderError(error.kind, f"{what}: {error.message}", error.instance_id)
        return error, response

    async def _send(self, request: RestRequest) -> RestResponse:
        headers = Headers({name.encode(): [value.encode()] for name, value in request.headers.items()})
        data = BytesBody(request.body) if request.body else None
        response = await self.http.request(request.method, request.url, headers=headers, data=data)
        body = await treq.content(response)
        flat = {name.decode().lower(): values[-1].decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()}
        return RestResponse(response.code, flat, body)

    def _masked(self, error: ProviderError) -> ProviderError:
        message = self.redactor.redact(error.message)
        if message == error.message:
            return error
        return ProviderError(error.kind, message, error.instance_id)


@implementer(IBodyProducer)
class BytesBody:
    """A request body written at once: unlike treq's default for bytes, no cooperator (global reactor) runs it."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


async def poll(
    clock: IReactorTime, probe: Callable[[], Awaitable[T | None]], interval: float, timeout: float, what: str
) -> T:
    """Call `probe` every `interval` seconds until it returns something other than None, and return that; a
    `TransientError` naming `what` when `timeout` passes first. For cloud waiters: an instance running, an Azure
    long-running operation, a GCP zone operation. A `ProviderError` from `probe` ends the wait."""
    end = clock.seconds() + timeout
    while True:
        result = await probe()
        if result is not None:
            return result
        if clock.seconds() + interval > end:
            raise TransientError(f"{what} after {timeout:g}s")
        await deferLater(clock, interval, lambda: None)


def _retry_after(response: RestResponse) -> float:
    value = response.header("retry-after")
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: keep our own back-off


def _cancelled(error: BaseException) -> bool:
    """A cancel as the Agent reports it: directly, while connecting, or as the reason of a failed response."""
    if isinstance(error, (CancelledError, ConnectingCancelledError)):
        return True
    if isinstance(error, (ResponseFailed, ResponseNeverReceived)):
        return any(reason.check(CancelledError, ConnectingCancelledError) for reason in error.reasons)
    return False


def _describe(error: BaseException) -> str:
    if isinstance(error, (ResponseFailed, ResponseNeverReceived)):
        reasons = [r.getErrorMessage() for r in error.reasons]
        return "connection lost: " + "; ".join(reasons)
    return str(error) or type(error).__name__
