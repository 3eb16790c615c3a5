"""One way to wait: a `Notifier` hands out Deferreds and fires them all at once.

It replaces hand-kept lists of waiting Deferreds. Each waiter may be cancelled on its own (a caller's
timeout) without touching the others, and a cancelled waiter is forgotten at once.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class Notifier(Generic[T]):
    """Waiters get a fresh Deferred from `wait()`; `notify(value)` or `fail(reason)` fires every current one."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[T]] = []

    def __len__(self) -> int:
        return len(self._waiting)

    def wait(self) -> Deferred[T]:
        """A Deferred that fires at the next `notify` or `fail`; cancelling it removes only this waiter."""
        d: Deferred[T] = Deferred(self._forget)
        self._waiting.append(d)
        return d

    def _forget(self, d: Deferred[T]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)

    def _take(self) -> list[Deferred[T]]:
        waiting, self._waiting = self._waiting, []
        return waiting

    def notify(self, value: T) -> None:
        """Fire every current waiter with value (waiters added meanwhile wait for the next one)."""
        for d in self._take():
            d.callback(value)

    def fail(self, reason: BaseException | Failure) -> None:
        """Errback every current waiter with reason."""
        failure = reason if isinstance(reason, Failure) else Failure(reason)
        for d in self._take():
            d.errback(failure)


__all__ = ["Notifier"]
