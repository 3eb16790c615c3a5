"""Run `twistd caa-adaptor ARGS...` (process tests); uses tests.fakes.relayproxy when caa.adaptor.proxy
(the real agent proxy) is not installed yet."""

from __future__ import annotations

import importlib.util
import sys


def main() -> None:
    if importlib.util.find_spec("caa.adaptor.proxy") is None:
        from tests.fakes import relayproxy

        sys.modules["caa.adaptor.proxy"] = relayproxy
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
