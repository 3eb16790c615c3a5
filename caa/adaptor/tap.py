"""`twistd caa-adaptor`: the options and `makeService`, the only place the real reactor is used.

The daemon itself (listeners, recovery, sweeper, stop) is caa.adaptor.daemon.
"""

from __future__ import annotations

from twisted.application.service import IService

from caa.adaptor.options import AdaptorOptions

Options = AdaptorOptions


def makeService(options: AdaptorOptions) -> IService:
    from twisted.internet import reactor as global_reactor

    from caa.adaptor.daemon import build_daemon
    from caa.process import fail_process
    from caa.reactors import as_node_reactor

    reactor = as_node_reactor(global_reactor)
    return build_daemon(reactor, options, on_fatal=lambda: fail_process(reactor))


__all__ = ["Options", "makeService"]
