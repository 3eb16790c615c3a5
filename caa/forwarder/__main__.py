"""`python -m caa.forwarder [options]`: the same service as `twistd caa-forwarder`, without twistd.

Same options (caa.forwarder.tap.Options) and service (build_service); it skips twistd's application and plugin
machinery, which saves start time and memory on a small pod VM (docs/benchmarks.md, Forwarder). Logs go to
stdout (the journal under systemd); a bad option or apf.json prints one line and exits 1, and so does a start
that fails later (--provision-user-data, pod network, listen): the reactor stops, the service stops, then the
process exits 1.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from twisted.python import usage

    from caa.forwarder.tap import Options, build_service, report_fatal

    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"caa-forwarder: {e}\n")
        raise SystemExit(1) from None

    from twisted.internet import reactor as global_reactor
    from twisted.internet.interfaces import IReactorThreads
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from caa.reactors import as_node_reactor

    reactor = as_node_reactor(global_reactor)
    status = 0

    def fatal(message: str) -> None:
        nonlocal status
        report_fatal(message)
        status = 1
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = build_service(reactor, options, IReactorThreads(global_reactor).getThreadPool(), fatal)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    raise SystemExit(status)


if __name__ == "__main__":
    main()
