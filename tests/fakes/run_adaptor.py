"""Run `twistd caa-adaptor ARGS...` (process tests); uses tests.fakes.relayproxy when caa.adaptor.proxy
(the real agent proxy) is not installed yet."""

from __future__ import annotations

import importlib.util
import os
import sys


def main() -> None:
    netns = os.environ.get("CAA_TEST_NETNS")
    if netns:  # run inside a test's "worker node" network namespace (same pid, unlike nsenter)
        import ctypes

        fd = os.open(netns, os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        os.close(fd)
    if importlib.util.find_spec("caa.adaptor.proxy") is None:
        from tests.fakes import relayproxy

        sys.modules["caa.adaptor.proxy"] = relayproxy
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
