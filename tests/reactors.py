"""Test reactors that declare `caa.reactors.INodeReactor` (MemoryReactorClock with calls from threads run inline)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from caa.reactors import INodeReactor


@implementer(INodeReactor)
class NodeMemoryReactor(MemoryReactorClock):
    """Stands in for the global reactor in unit tests: records listens/connects, time by `advance()`,
    and runs `callFromThread` calls at once (unit tests have no worker threads)."""

    def callFromThread(self, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callable(*args, **kwargs)
