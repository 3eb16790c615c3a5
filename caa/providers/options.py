"""
Provider options: `usage.Options` whose every flag may also come from an environment variable, with
upstream's precedence: hard default < env var (when set and non-empty) < command-line flag.

A provider declares its flags once, as `optParameters` (long name, short, default, help, coerce) plus
`envVars` (long name -> env var) and `secretOptions` (names never logged). Boolean settings are
parameters coerced by `parse_bool` (`--disable-cvm=false`), because upstream's booleans take values.
Unlike upstream, a malformed env value is not silently ignored: `postOptions` raises `UsageError`
naming the variable.

Everything here goes through `usage.Options`' public surface: the option tables, `opts`, `defaults`,
`docs`, `longOpt`/`shortOpt`/`synonyms`, `parseOptions` and `postOptions`. `parseOptions` makes a first
pass over the command line with `getopt` (the tokenizer `usage.Options` itself uses) to learn which
options came from flags and to check their values with an error naming the flag, then lets
`usage.Options` parse it for real.
"""

from __future__ import annotations

import getopt
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from twisted.python import reflect, usage

from caa.podvm_api import godur


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

def parse_duration(value: str) -> float:
    """A Go duration (`150s`, `5m`, `1h30m`, `0`) in seconds, by Go's rules (caa.podvm_api.godur)."""
    return godur.parse_duration(value)


parse_duration.coerceDoc = "A duration such as 300s, 5m or 1h30m."  # type: ignore[attr-defined]


def split_list(text: str) -> tuple[str, ...]:
    """`a,b, c` -> ("a", "b", "c"); empty items dropped (upstream's comma-separated list flags)."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def parse_tags(text: str) -> tuple[tuple[str, str], ...]:
    """`k=v,k2=v2` -> pairs (upstream's -tags of every cloud); an item without `=` is an error."""
    pairs = []
    for item in split_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not key=value")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def tags_option(text: str) -> str:
    """Coercer of a --tags option: checks the text (`parse_tags`) and keeps it."""
    parse_tags(text)
    return text


tags_option.coerceDoc = "Comma-separated key=value pairs."  # type: ignore[attr-defined]


class ProviderOptions(usage.Options):
    """
    Base class of every provider's options (and of the adaptor's own). Build it with `environ` (defaults
    to `os.environ`); values from the environment replace defaults at construction; `parseOptions(argv)`
    then applies flags. `sources[name]` says where each value came from: "default", "env" or "flag".
    Flags (`optFlags`) listed in `envVars` read their variable with `parse_bool`.
    """

    #: option long name -> environment variable
    envVars: ClassVar[Mapping[str, str]] = {}
    #: option long names whose values are secrets (never logged)
    secretOptions: ClassVar[frozenset[str]] = frozenset()
    #: A provider's config class with `from_options(options)` and `check()` (raising InvalidConfig); when set,
    #: a bad combination of values fails option parsing with its one-line message.
    config_type: ClassVar[Any] = None

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self._env_errors: dict[str, str] = {}
        self.sources: dict[str, str] = {name: "default" for name in self.defaults}
        flags = self.flag_names()
        for name in flags:
            self.opts[name] = False
        coercers = self.coercers()
        for name, var in self.envVars.items():
            # --help names the variable next to each flag.
            self.docs[name] = f"{self.docs.get(name) or ''} (env {var})".strip()
            raw = self.environ.get(var, "")
            if raw == "":
                continue
            try:
                self.opts[name] = coercers[name](raw)
            except ValueError as e:
                self._env_errors[name] = f"environment variable {var}={raw!r}: {e}"
                continue
            self.sources[name] = "env"

    @classmethod
    def parameters(cls) -> list[tuple[str, str | None, Any, str | None, Callable[[str], Any] | None]]:
        """Every `optParameters` row of the class and its bases as (long, short, default, doc, coerce)."""
        rows: list[Any] = []
        reflect.accumulateClassList(cls, "optParameters", rows)
        return [tuple((list(row) + [None] * 5)[:5]) for row in rows]

    @classmethod
    def flag_names(cls) -> list[str]:
        """The long names of every `optFlags` row of the class and its bases."""
        rows: list[Any] = []
        reflect.accumulateClassList(cls, "optFlags", rows)
        return [str(row[0]) for row in rows]

    @classmethod
    def coercers(cls) -> dict[str, Callable[[str], Any]]:
        """Option long name -> the function turning its text (flag value or env var) into a value."""
        table: dict[str, Callable[[str], Any]] = {name: parse_bool for name in cls.flag_names()}
        for long, _short, _default, _doc, coerce in cls.parameters():
            table[long] = coerce or str
        return table

    def given(self, argv: Sequence[str]) -> list[tuple[str, str]]:
        """(long name, text) of each option on the command line, in order; `UsageError` for unknown ones."""
        try:
            pairs, _rest = getopt.getopt(list(argv), self.shortOpt, self.longOpt)
        except getopt.GetoptError as e:
            raise usage.UsageError(str(e)) from None
        return [(self.long_name(option), value) for option, value in pairs]

    def long_name(self, option: str) -> str:
        """The long name of `--name` or `-x` as getopt returns it (usage.Options' synonyms, `_` for `-`)."""
        key = option[2:] if option.startswith("--") else option[1:]
        return str(self.synonyms.get(key) or self.synonyms.get(key.replace("-", "_"), key))

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = sys.argv[1:] if options is None else list(options)
        if len(argv) > 1 and argv[-2] == "--_shell-completion":
            super().parseOptions(argv)  # usage.Options answers shell completion itself
            return
        coercers = self.coercers()
        parameters = {row[0] for row in self.parameters()}
        for name, text in self.given(argv):
            self.sources[name] = "flag"
            if name in parameters:
                try:
                    coercers[name](text)
                except ValueError as e:
                    raise usage.UsageError(f"--{name}: {e}") from None
        super().parseOptions(argv)

    def postOptions(self) -> None:
        errors = [error for name, error in self._env_errors.items() if self.sources.get(name) != "flag"]
        if errors:
            raise usage.UsageError("; ".join(errors))
        for name in self.flag_names():
            self.opts[name] = bool(self.opts[name])
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
        return [
            {
                "flag": f"--{long}",
                "env": cls.envVars.get(long),
                "default": default,
                "help": doc,
                "secret": long in cls.secretOptions,
            }
            for long, _short, default, doc, _coerce in cls.parameters()
        ]

    def usage_rows(self) -> list[dict[str, Any]]:
        """This parser's options (without --help/--version) as `usage.docMakeChunks` rows, for a help section
        printed by another parser (the adaptor's --help lists the chosen provider's flags)."""
        coercers = self.coercers()
        rows = []
        for option in self.longOpt:
            name = option.rstrip("=")
            if name in ("help", "version"):
                continue
            parameter = option.endswith("=")
            rows.append({
                "long": name,
                "short": None,
                "doc": self.docs.get(name),
                "optType": "parameter" if parameter else "flag",
                "default": self.defaults.get(name) if parameter else None,
                "dispatch": usage.CoerceParameter(self, coercers[name]) if parameter else None,
            })
        return rows
