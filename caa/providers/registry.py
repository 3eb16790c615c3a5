"""
Provider registry: finds an `IProviderFactory` by name.

Providers are declared as entry points in the group `caa.providers` (setup.cfg)::

    [options.entry_points]
    caa.providers =
        libvirt = caa.providers.libvirt:LibvirtProviderFactory
        local = caa.providers.local:LocalProviderFactory

so a third-party package adds a cloud by declaring its own entry point in that group; nothing here
changes. An entry point names a factory class (instantiated with no arguments) or a factory object. The
built-in providers are also known without installed metadata (running from a source tree).

How the adaptor uses it (`twistd caa-adaptor --provider NAME`, env `CLOUD_PROVIDER`)::

    from caa.providers.registry import get_factory, UnknownProvider

    factory = get_factory(name)              # UnknownProvider -> "Unsupported cloud provider: NAME"
    options = factory.options()              # a ProviderOptions: reads the provider's env vars now
    options.parseOptions(provider_argv)      # the provider's flags, e.g. ["--uri", "qemu:///system"]
    provider = factory.create(reactor, options)   # IProvider; no I/O yet
    await provider.verify_config()           # at start; ProviderError -> refuse to start, one line
    ...
    instance = await provider.create_instance(pod, sid, user_data, spec)
    await provider.delete_instance(instance.id)
    await provider.teardown()                # at stop

`subcommands()` gives `usage.Options.subCommands` rows (`twistd caa-adaptor [opts] libvirt --uri ...`,
upstream's `cloud-api-adaptor libvirt -uri ...` form) for an adaptor that prefers sub-commands; each
row's parser is the provider's `ProviderOptions`. The option table of each provider (flag, env,
default, help, secret) is `factory.options().optionTable()`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from twisted.python import usage
from zope.interface.verify import verifyObject

from caa.providers.interfaces import IProviderFactory

ENTRY_POINT_GROUP = "caa.providers"

BUILTIN_PROVIDERS: Mapping[str, str] = {
    "libvirt": "caa.providers.libvirt:LibvirtProviderFactory",
    "local": "caa.providers.local:LocalProviderFactory",
}


class UnknownProvider(LookupError):
    """No provider of that name is installed."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"Unsupported cloud provider: {name!r} (known: {', '.join(self.known) or 'none'})")

    def __str__(self) -> str:
        return str(self.args[0])


def _load_reference(reference: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def _as_factory(loaded: Any, name: str) -> IProviderFactory:
    factory = loaded() if isinstance(loaded, type) else loaded
    verifyObject(IProviderFactory, factory)
    if factory.name != name:
        raise ValueError(f"provider entry point {name!r} names a factory called {factory.name!r}")
    return factory  # type: ignore[no-any-return]


class ProviderRegistry:
    """
    Name -> factory. `entry_points_` overrides the installed entry points (tests); `register` adds a
    factory object directly (tests, embedding).
    """

    def __init__(
        self,
        entry_points_: Iterable[EntryPoint] | None = None,
        builtins: Mapping[str, str] = BUILTIN_PROVIDERS,
    ) -> None:
        self._references: dict[str, Callable[[], Any]] = {}
        for name, reference in builtins.items():
            self._references[name] = functools.partial(_load_reference, reference)
        found = entry_points(group=ENTRY_POINT_GROUP) if entry_points_ is None else entry_points_
        for entry_point in found:
            self._references[entry_point.name] = entry_point.load
        self._factories: dict[str, IProviderFactory] = {}

    def register(self, factory: IProviderFactory) -> None:
        verifyObject(IProviderFactory, factory)
        self._factories[factory.name] = factory

    def names(self) -> list[str]:
        return sorted(set(self._references) | set(self._factories))

    def get(self, name: str) -> IProviderFactory:
        """The factory called `name`; raises `UnknownProvider`."""
        if name in self._factories:
            return self._factories[name]
        reference = self._references.get(name)
        if reference is None:
            raise UnknownProvider(name, self.names())
        factory = _as_factory(reference(), name)
        self._factories[name] = factory
        return factory

    def subcommands(self) -> list[tuple[str, None, Callable[[], usage.Options], str]]:
        rows = []
        for name in self.names():
            factory = self.get(name)
            rows.append((name, None, factory.options, factory.description))
        return rows


_default: ProviderRegistry | None = None


def default_registry() -> ProviderRegistry:
    global _default
    if _default is None:
        _default = ProviderRegistry()
    return _default


def get_factory(name: str) -> IProviderFactory:
    """The installed provider factory called `name`; raises `UnknownProvider`."""
    return default_registry().get(name)


def provider_names() -> list[str]:
    return default_registry().names()


def subcommands() -> list[tuple[str, None, Callable[[], usage.Options], str]]:
    return default_registry().subcommands()
