"""Test reactors that declare `caa.reactors.INodeReactor` (MemoryReactorClock with calls from threads run inline)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from caa.reactors import INodeReactor


@implementer(INodeReactor)
class NodeMemoryReactor(MemoryReactorClock):
    """Stands in for the global reactor in unit tests: records listens/connects, time by `advance()`,
    and runs `callFromThread` / `callInThread` calls at once (unit tests have no worker threads)."""

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callable(*args, **kwargs)

    def callInThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callable(*args, **kwargs)

    def getThreadPool(self) -> ThreadPool:
        raise NotImplementedError("unit tests hand their code its own (synchronous) thread pool")

    def suggestThreadPoolSize(self, size: int) -> None:
        pass

    def spawnProcess(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("unit tests start no processes")
