"""`Once`: a value computed by a coroutine the first time someone needs it, shared by everyone after.

Providers learn a few facts lazily at their first call (the sizes of the allowed instance types, the region
target, the SSH key): concurrent first callers must share one computation, and a failure must not be kept (a
cloud that was briefly unreachable is asked again on the next call).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from twisted.internet.defer import DeferredLock

T = TypeVar("T")

__all__ = ["Once"]


class Once(Generic[T]):
    def __init__(self, compute: Callable[[], Awaitable[T]]) -> None:
        self._compute = compute
        self._lock = DeferredLock()
        self._done = False
        self._value: T | None = None

    @property
    def done(self) -> bool:
        return self._done

    async def get(self) -> T:
        """The value; computed now (once, under a lock) if no earlier call succeeded."""
        if not self._done:
            await self._lock.acquire()
            try:
                if not self._done:
                    self._value = await self._compute()
                    self._done = True
            finally:
                self._lock.release()
        return self._value  # type: ignore[return-value]  # set when _done (T may itself admit None)
