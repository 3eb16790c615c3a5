"""
Provider options: `usage.Options` whose every flag may also come from an environment variable, with
upstream's precedence: hard default < env var (when set and non-empty) < command-line flag.

A provider declares its flags once, as `optParameters` (long name, short, default, help, coerce) plus
`envVars` (long name -> env var) and `secretOptions` (names never logged). Boolean settings are
parameters coerced by `parse_bool` (`--disable-cvm=false`), because upstream's booleans take values.
Unlike upstream, a malformed env value is not silently ignored: `postOptions` raises `UsageError`
naming the variable.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.python import reflect, usage


def parse_bool(value: str) -> bool:
    """'1'/'true' -> True, '0'/'false'/'' -> False (case-insensitive); anything else is an error."""
    lowered = value.strip().lower()
    if lowered in ("1", "true"):
        return True
    if lowered in ("0", "false", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean (true/false/1/0)")


parse_bool.coerceDoc = "true or false."  # type: ignore[attr-defined]


def parse_uint(value: str) -> int:
    """A non-negative base-10 integer."""
    number = int(value.strip(), 10)
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    return number


parse_uint.coerceDoc = "A non-negative integer."  # type: ignore[attr-defined]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str) -> float:
    """A Go duration (`150s`, `5m`, `1h30m`, `0`) in seconds."""
    text = value.strip()
    if text == "0":
        return 0.0
    position = 0
    total = 0.0
    while position < len(text):
        match = _DURATION_PART.match(text, position)
        if match is None:
            raise ValueError(f"{value!r} is not a duration such as 300s, 5m or 1h30m")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not text:
        raise ValueError("empty duration")
    return total


parse_duration.coerceDoc = "A duration such as 300s, 5m or 1h30m."  # type: ignore[attr-defined]


class ProviderOptions(usage.Options):
    """
    Base class of every provider's options. Build it with `environ` (defaults to `os.environ`); values
    from the environment replace defaults at construction; `parseOptions(argv)` then applies flags.
    `sources[name]` says where each value came from: "default", "env" or "flag".
    """

    #: option long name -> environment variable
    envVars: ClassVar[Mapping[str, str]] = {}
    #: option long names whose values are secrets (never logged)
    secretOptions: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._envErrors: dict[str, str] = {}
        self.sources: dict[str, str] = {name: "default" for name in self.defaults}
        for name, dispatcher in list(self._dispatch.items()):
            if isinstance(dispatcher, usage.CoerceParameter):
                self._dispatch[name] = _RecordingParameter(self, dispatcher.coerce)
        env = os.environ if environ is None else environ
        for name, var in self.envVars.items():
            raw = env.get(var, "")
            if raw == "":
                continue
            coerce = getattr(self._dispatch[name], "coerce", str)
            try:
                self.opts[name] = coerce(raw)
            except ValueError as e:
                self._envErrors[name] = f"environment variable {var}={raw!r}: {e}"
                continue
            self.sources[name] = "env"

    #: A provider's config class with `from_options(options)` and `check()` (raising InvalidConfig); when set,
    #: a bad combination of values fails option parsing with its one-line message.
    config_type: ClassVar[Any] = None

    def postOptions(self) -> None:
        errors = [error for name, error in self._envErrors.items() if self.sources.get(name) != "flag"]
        if errors:
            raise usage.UsageError("; ".join(errors))
        if self.config_type is not None:
            from caa.providers.interfaces import InvalidConfig

            try:
                self.config_type.from_options(self).check()
            except InvalidConfig as e:
                raise usage.UsageError(str(e)) from None

    def redacted(self) -> dict[str, Any]:
        """The option values with secrets replaced by '**********', for logging."""
        return {
            name: ("**********" if name in self.secretOptions and self.opts.get(name) else self.opts.get(name))
            for name in sorted(self.defaults)
        }

    @classmethod
    def optionTable(cls) -> list[dict[str, Any]]:
        """One row per option (flag, env, default, help, secret), for docs and Helm values."""
        rows = []
        parameters: list[Any] = []
        reflect.accumulateClassList(cls, "optParameters", parameters)
        for parameter in parameters:
            long, _short, default, doc = (list(parameter) + [None] * 4)[:4]
            rows.append(
                {
                    "flag": f"--{long}",
                    "env": cls.envVars.get(long),
                    "default": default,
                    "help": doc,
                    "secret": long in cls.secretOptions,
                }
            )
        return rows


class _RecordingParameter(usage.CoerceParameter):
    """A coerced parameter that also records that its value came from a flag."""

    options: ProviderOptions

    def dispatch(self, parameterName: str, value: str) -> None:
        super().dispatch(parameterName, value)
        self.options.sources[parameterName] = "flag"
