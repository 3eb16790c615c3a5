"""`twistd caa-adaptor`: the options and `makeService`, the only place the real reactor is used.

The daemon itself (listeners, recovery, sweeper, stop) is caa.adaptor.daemon.
"""

from __future__ import annotations

from twisted.application.service import IService

from caa.adaptor.options import AdaptorOptions

Options = AdaptorOptions


def makeService(options: AdaptorOptions) -> IService:
    from twisted.internet import reactor as global_reactor
    from twisted.logger import globalLogPublisher

    from caa.adaptor.daemon import build_daemon
    from caa.process import fail_process
    from caa.providers.redact import Redactor, ScrubbingObserver
    from caa.reactors import as_node_reactor

    # twistd calls makeService before it starts logging, so this observer runs before its file observer and
    # every event reaches the log with the provider's secrets (and the adaptor's own) masked.
    globalLogPublisher.addObserver(ScrubbingObserver(Redactor.from_options(options, options.provider_options)))
    reactor = as_node_reactor(global_reactor)
    return build_daemon(reactor, options, on_fatal=lambda: fail_process(reactor))


__all__ = ["Options", "makeService"]
