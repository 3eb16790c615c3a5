"""Ending a twistd daemon whose start failed after its reactor started, with a failure exit status.

How twistd decides its exit status (twisted/scripts/_twistd_unix.py, twisted/application/app.py): 1 when
`startService` raises (before the reactor runs); otherwise, once `reactor.run()` returns, 0, unless a SIGTERM or
SIGINT stopped the reactor, in which case twistd re-raises that signal. Every exception raised while the reactor
runs (callbacks, system event triggers, even SystemExit) is logged and swallowed, and twistd has no API to set
the status (twisted#11335). So a daemon that must fail late sends itself SIGTERM: the reactor stops through its
own handler, the services stop cleanly, and the process ends killed by SIGTERM, which is not success (exit code
143 to a shell or the kubelet). `python -m caa.forwarder` runs its own reactor and exits 1 instead.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from twisted.internet.interfaces import IReactorCore

__all__ = ["fail_process"]


def fail_process(reactor: IReactorCore, kill: Callable[[int, int], None] = os.kill) -> None:
    """Stop the twistd process with a non-zero status (see the module docstring), now or once the reactor runs."""

    def terminate() -> None:
        kill(os.getpid(), signal.SIGTERM)

    if reactor.running:
        terminate()
    else:  # before the reactor runs, the default SIGTERM action would kill the process without a clean stop
        reactor.callWhenRunning(terminate)
