"""Stand-ins for the Kubernetes client layer's seams in unit tests.

`FakeWatchSource` stands for `caa.k8s.watch.ResourceWatchSource` (one collection on the API server): the test
answers each `list()` and drives each opened watch by hand (events, a clean end, Gone, a dropped stream),
the way the real one reports them. `InlineThreadPool` stands for a started ThreadPool that runs work at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from caa.k8s.interfaces import IWatchSource, IWatchStream
from caa.k8s.objects import JSONObject


@implementer(IWatchStream)
class FakeWatchStream:
    def __init__(self, resource_version: str, deliver: Callable[[JSONObject], None]) -> None:
        self.resource_version = resource_version
        self.deliver = deliver
        self.done: Deferred[None] = Deferred()
        self.stopped = False

    def event(self, kind: str, obj: JSONObject) -> None:
        self.deliver({"type": kind, "object": obj})

    def end(self) -> None:
        self.done.callback(None)

    def fail(self, error: Exception) -> None:
        self.done.errback(error)

    def stop(self) -> None:
        # The real stream ends cleanly when stopped.
        self.stopped = True
        if not self.done.called:
            self.done.callback(None)


@implementer(IWatchSource)
class FakeWatchSource:
    def __init__(self) -> None:
        self.lists: list[Deferred[JSONObject]] = []
        self.streams: list[FakeWatchStream] = []

    def list(self) -> Deferred[JSONObject]:
        d: Deferred[JSONObject] = Deferred()
        self.lists.append(d)
        return d

    def watch(self, resource_version: str, deliver: Callable[[JSONObject], None]) -> IWatchStream:
        stream = FakeWatchStream(resource_version, deliver)
        self.streams.append(stream)
        return stream


class InlineThreadPool(ThreadPool):
    """Runs each `callInThreadWithCallback` at once on the calling thread (unit tests have no workers)."""

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], object] | None,
                                 func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        try:
            result = func(*args, **kw)
        except BaseException:
            if onResult is not None:
                onResult(False, Failure())
            return
        if onResult is not None:
            onResult(True, result)


class StuckThreadPool(ThreadPool):
    """A pool whose workers never come back (a call hung on a dead connection)."""

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], object] | None,
                                 func: Callable[..., Any], *args: Any, **kw: Any) -> None:
        pass
