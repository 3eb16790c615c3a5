"""Command lines of the Kubernetes-side daemons (caa-webhook, caa-peerpod-ctrl) as upstream's Go binaries take them.

Upstream's controller-runtime daemons are driven by Deployment args such as `--health-probe-bind-address=:8081`,
`-leader-elect`, `--leader-elect=false` and zap's `--zap-log-level=...`. `GoFlagOptions` accepts those
spellings on top of `usage.Options` (public hooks only: `parseOptions` rewrites argv first), and reads each
option's environment variable (`envVars`): default < environment variable (set, non-empty) < flag.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import ClassVar

from twisted.python import usage

_GO_ADDRESS = re.compile(r"(\[[^\]]*\]|[^:\[\]]*):([0-9]+)\Z")
_ENDPOINT_TYPES = ("tcp", "tcp6", "unix", "ssl", "systemd", "fd")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def endpoint_description(value: str) -> str | None:
    """A Go listen address (`:8081`, `0.0.0.0:8081`, `[::]:9443`) or a Twisted server endpoint string ->
    an endpoint string; `0` (controller-runtime's "off") or empty -> None."""
    text = value.strip()
    if text in ("", "0"):
        return None
    if text.split(":", 1)[0] in _ENDPOINT_TYPES:
        return text
    match = _GO_ADDRESS.match(text)
    if match is None:
        raise usage.UsageError(f"{value!r} is neither host:port nor an endpoint description")
    host, port = match.group(1).strip("[]"), int(match.group(2))
    if port > 65535:
        raise usage.UsageError(f"{value!r}: port out of range")
    if not host:
        return f"tcp:{port}"
    kind = "tcp6" if ":" in host else "tcp"
    return f"{kind}:{port}:interface={host.replace(':', chr(92) + ':')}"


class GoFlagOptions(usage.Options):
    """`usage.Options` that also take Go's flag spellings and read environment variables.

    - `-flag` is `--flag`; zap's `--zap-*` flags (and their values) are accepted and dropped;
    - an `optFlags` flag may be written `--flag=true|false|1|0`;
    - a parameter named in `bareTrue` may be written without a value (`--leader-elect` = `--leader-elect=true`).
    """

    #: option long name -> environment variable
    envVars: ClassVar[Mapping[str, str]] = {}
    #: parameters (boolean-valued) that Go lets one give bare
    bareTrue: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = os.environ if environ is None else environ
        for name, var in self.envVars.items():
            if self.environ.get(var, ""):
                self[name] = self.environ[var]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = sys.argv[1:] if options is None else list(options)
        super().parseOptions(self.go_argv(argv))

    def go_argv(self, argv: list[str]) -> list[str]:
        """argv with Go's spellings rewritten into Twisted's."""
        flags = {str(f[0]) for f in getattr(self, "optFlags", [])}
        out: list[str] = []
        skip = False
        for arg in argv:
            if skip:
                skip = False
                continue
            if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
                arg = "-" + arg
            name, eq, value = arg[2:].partition("=") if arg.startswith("--") else (arg, "", "")
            if arg.startswith("--zap-"):
                skip = not eq and name != "zap-devel"
                continue
            if name in flags and eq:
                if value.lower() not in _BOOLEANS:
                    raise usage.UsageError(f"--{name}: {value!r} is not a boolean")
                if _BOOLEANS[value.lower()]:
                    out.append(f"--{name}")
                continue
            if name in self.bareTrue and not eq:
                arg += "=true"
            out.append(arg)
        return out


__all__ = ["GoFlagOptions", "endpoint_description"]
