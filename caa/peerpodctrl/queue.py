"""A per-key work queue with exponential back-off, on an injected clock (controller-runtime's semantics).

- `add(key)` runs `work(key)` now, unless that key is already in flight: then it runs once more after the
  current run ends (events that arrive meanwhile collapse into that one rerun). One run per key at a time.
- A run that fails is retried after `backoff(n)` seconds, n the key's consecutive failures (default 5 ms
  doubling to 1000 s, as controller-runtime's per-item limiter). A new `add` meanwhile runs at once; the
  failure count survives until a run succeeds.
- `stop()` drops pending retries and waits for the runs in flight.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger


def exponential_backoff(base: float = 0.005, cap: float = 1000.0) -> Callable[[int], float]:
    """Delay before retry n (1-based): base * 2**(n-1), at most cap."""
    def delay(failures: int) -> float:
        return float(min(cap, base * 2 ** min(max(failures - 1, 0), 64)))
    return delay


class WorkQueue:
    _log = Logger()

    def __init__(self, clock: IReactorTime, work: Callable[[str], Awaitable[object]],
                 backoff: Callable[[int], float] | None = None,
                 on_result: Callable[[str, bool], object] | None = None) -> None:
        self.clock = clock
        self.work = work
        self.backoff = backoff or exponential_backoff()
        self.on_result = on_result
        self.failures: dict[str, int] = {}
        self.running = True
        self._busy: set[str] = set()
        self._in_flight: dict[str, Deferred[None]] = {}
        self._again: set[str] = set()
        self._retries: dict[str, IDelayedCall] = {}

    def __len__(self) -> int:
        """Keys waiting: in flight, due again, or waiting for a retry."""
        return len(self._busy | self._again | set(self._retries))

    def add(self, key: str) -> None:
        if not self.running:
            return
        retry = self._retries.pop(key, None)
        if retry is not None:
            retry.cancel()
        if key in self._busy:
            self._again.add(key)
            return
        self._busy.add(key)
        d = Deferred.fromCoroutine(self._run(key))
        if key in self._busy:  # not finished synchronously
            self._in_flight[key] = d

    def pending_retry(self, key: str) -> float | None:
        """When the retry of key is due (clock seconds), or None."""
        call = self._retries.get(key)
        return call.getTime() if call is not None else None

    async def _run(self, key: str) -> None:
        ok = False
        try:
            await self.work(key)
            ok = True
        except Exception as e:
            failures = self.failures.get(key, 0) + 1
            self.failures[key] = failures
            delay = self.backoff(failures)
            self._log.warn("{key}: {error}; retry {attempt} in {delay:.3f}s", key=key, error=e,
                           attempt=failures, delay=delay)
            if self.running and key not in self._again:
                self._retries[key] = self.clock.callLater(delay, self._retry, key)
        finally:
            self._busy.discard(key)
            self._in_flight.pop(key, None)
        if ok:
            self.failures.pop(key, None)
        if self.on_result is not None:
            self.on_result(key, ok)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def _retry(self, key: str) -> None:
        self._retries.pop(key, None)
        self.add(key)

    def stop(self) -> Deferred[object]:
        self.running = False
        for call in self._retries.values():
            call.cancel()
        self._retries.clear()
        self._again.clear()
        return DeferredList(list(self._in_flight.values())).addCallback(lambda _: None)


__all__ = ["WorkQueue", "exponential_backoff"]
