"""Providers built on demand from the current `CloudConfig`, cached by name until the settings change.

A PeerPod names its provider (`spec.cloudProvider`); the factory comes from the provider registry (never
from a `module:Factory` reference: the name is data written by whoever can create PeerPods). Its options
are the provider's own `ProviderOptions` built with the config's `environ`, so the same keys that configure
the adaptor (LIBVIRT_URI, ...) configure the delete here.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage

from caa.peerpodctrl.config import CloudConfig
from caa.providers.interfaces import IProvider, IProviderFactory, ProviderError
from caa.providers.options import ProviderOptions
from caa.providers.registry import UnknownProvider, get_factory
from caa.reactors import INodeReactor


class ProviderUnavailable(Exception):
    """The PeerPod's provider cannot be built: unknown name, or its settings are refused."""


def provider_options(factory: IProviderFactory, config: CloudConfig) -> usage.Options:
    """The factory's options with `config.environ` as their environment, parsed with no flags."""
    options = factory.options()
    if isinstance(options, ProviderOptions):
        options = type(options)(environ=config.environ)
    options.parseOptions([])
    return options


class ProviderCache:
    """`get(name)` builds (once per config) and returns the provider called `name`; `configure(config)`
    swaps the settings and tears down the providers built from the old ones."""

    _log = Logger()

    def __init__(self, reactor: INodeReactor, lookup: Callable[[str], IProviderFactory] = get_factory) -> None:
        self.reactor = reactor
        self.lookup = lookup
        self.config = CloudConfig()
        self._built: dict[str, IProvider] = {}

    def configure(self, config: CloudConfig) -> Deferred[None]:
        self.config = config
        return self.clear()

    def get(self, name: str) -> IProvider:
        provider = self._built.get(name)
        if provider is not None:
            return provider
        try:
            factory = self.lookup(name)
            provider = factory.create(self.reactor, provider_options(factory, self.config))
        except UnknownProvider as e:
            raise ProviderUnavailable(f"{name} cloud provider not supported ({e})") from e
        except (usage.UsageError, ProviderError) as e:
            raise ProviderUnavailable(f"{name} cloud provider: {e}") from e
        self._log.info("built provider {name}", name=name)
        self._built[name] = provider
        return provider

    def clear(self) -> Deferred[None]:
        """Tear down every built provider (their failures are logged)."""
        built, self._built = self._built, {}
        return Deferred.fromCoroutine(self._teardown(built))

    async def _teardown(self, built: dict[str, IProvider]) -> None:
        for name, provider in built.items():
            try:
                await provider.teardown()
            except Exception:
                self._log.failure("tearing down provider {name}", name=name)


__all__ = ["ProviderCache", "ProviderUnavailable", "provider_options"]
