"""`python -m caa.forwarder [options]`: the same service as `twistd caa-forwarder`, without twistd.

Same options (caa.forwarder.tap.Options) and service (makeService); it skips twistd's application and plugin
machinery, which saves start time and memory on a small pod VM (docs/benchmarks.md, Forwarder). Logs go to
stdout (the journal under systemd); a bad option or apf.json prints one line and exits 1.
"""

from __future__ import annotations

import sys
from typing import Any


def main(argv: list[str] | None = None) -> None:
    from twisted.python import usage

    from caa.forwarder.tap import Options, makeService

    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"caa-forwarder: {e}\n")
        raise SystemExit(1) from None

    from twisted.internet import reactor as _reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    reactor: Any = _reactor
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    service = makeService(options)
    reactor.callWhenRunning(service.startService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
