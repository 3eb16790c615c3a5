"""The bounded thread pool the Kubernetes calls run in, as a service of the daemon's MultiService.

Started with the daemon and stopped after it (add it to the parent before the services that use it: a
MultiService stops children in reverse order, so watchers close their streams before the pool joins its
threads). Each running watch holds one thread; size `maxthreads` for the concurrent calls plus the watches.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.python.threadpool import ThreadPool


class ThreadPoolService(Service):
    """Owns `pool`: starts it in startService, stops (joins) it in stopService."""

    def __init__(self, maxthreads: int = 4, name: str = "caa-k8s") -> None:
        self.setName(name)
        self.pool = ThreadPool(minthreads=0, maxthreads=maxthreads, name=name)

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


__all__ = ["ThreadPoolService"]
