"""Provider settings of the controller: the `peer-pods-cm` ConfigMap and `peer-pods-secret` Secret, as one
explicit value instead of upstream's process-environment side channel (spec-providers §11.5 #2).

Their keys are upstream's environment variable names (CLOUD_PROVIDER, LIBVIRT_URI, ...); a provider reads
them as the `environ` of its `ProviderOptions`, exactly as the adaptor reads its process environment.
`CloudConfigWatch` follows both objects with watches and reports every change.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from caa.k8s.client import KubeClient
from caa.k8s.interfaces import IWatchSource
from caa.k8s.objects import JSONObject
from caa.k8s.watch import DELETED, Watcher, WatchEvent, namespaced_source

#: Where the controller (and upstream's chart) runs: the settings objects and the Lease live there.
DEFAULT_NAMESPACE = "confidential-containers-system"
CONFIG_MAP_NAME = "peer-pods-cm"
SECRET_NAME = "peer-pods-secret"


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return dict(value)


@attrs.frozen
class CloudConfig:
    """Variables for the providers' options (`environ`), from the ConfigMap's data and the Secret's decoded
    data (the Secret wins on a key in both, as upstream sets it last). `present` names the objects found."""

    environ: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_mapping)
    present: frozenset[str] = frozenset()

    @classmethod
    def from_objects(cls, config_map: JSONObject | None, secret: JSONObject | None) -> CloudConfig:
        environ: dict[str, str] = {}
        present = set()
        if config_map is not None:
            present.add(CONFIG_MAP_NAME)
            environ.update({str(k): str(v) for k, v in (config_map.get("data") or {}).items()})
        if secret is not None:
            present.add(SECRET_NAME)
            for key, value in (secret.get("data") or {}).items():
                try:
                    environ[str(key)] = base64.b64decode(str(value), validate=True).decode()
                except (binascii.Error, UnicodeDecodeError):
                    continue  # not a text value: no provider setting can use it
            environ.update({str(k): str(v) for k, v in (secret.get("stringData") or {}).items()})
        return cls(environ, frozenset(present))


def cloud_config_sources(client: KubeClient, namespace: str, config_map: str = CONFIG_MAP_NAME,
                         secret: str = SECRET_NAME, server_timeout: int = 300) -> tuple[IWatchSource, IWatchSource]:
    """The two objects as watch sources, each a list/watch field-selected by name (so RBAC can restrict the
    controller to exactly these names)."""
    return (namespaced_source(client, "config_map", namespace, server_timeout=server_timeout,
                              field_selector=f"metadata.name={config_map}"),
            namespaced_source(client, "secret", namespace, server_timeout=server_timeout,
                              field_selector=f"metadata.name={secret}"))


class CloudConfigWatch(MultiService):
    """Watches the ConfigMap and the Secret and calls `on_change(config)` with the resulting `CloudConfig`
    once both first lists are in, then whenever it changes. `current` is the latest value."""

    _log = Logger()

    def __init__(self, sources: tuple[IWatchSource, IWatchSource], clock: IReactorTime,
                 on_change: Callable[[CloudConfig], object]) -> None:
        super().__init__()
        self.setName("cloud-config")
        self.on_change = on_change
        self.current = CloudConfig()
        self.published = False
        self._objects: dict[str, JSONObject | None] = {CONFIG_MAP_NAME: None, SECRET_NAME: None}
        self.watchers: list[Watcher] = []
        for key, source in zip((CONFIG_MAP_NAME, SECRET_NAME), sources, strict=True):
            watcher = Watcher(source, clock, self._handler(key), name=key)
            watcher.setServiceParent(self)
            self.watchers.append(watcher)

    def whenSynced(self) -> Deferred[None]:
        d = gatherResults([w.whenSynced() for w in self.watchers], consumeErrors=True)
        return d.addCallback(lambda _: None)

    def startService(self) -> None:
        super().startService()
        self.whenSynced().addCallback(lambda _: self._publish())

    def _handler(self, key: str) -> Callable[[WatchEvent], None]:
        def handle(event: WatchEvent) -> None:
            self._objects[key] = None if event.type == DELETED else event.object
            if all(w.synced for w in self.watchers):
                self._publish()
        return handle

    def _publish(self) -> None:
        config = CloudConfig.from_objects(self._objects[CONFIG_MAP_NAME], self._objects[SECRET_NAME])
        if self.published and config == self.current:
            return
        self.current, self.published = config, True
        # Both missing is not an error (upstream): providers then run on their defaults.
        self._log.info("provider settings: {count} keys from {objects}", count=len(config.environ),
                       objects=", ".join(sorted(config.present)) or "neither object exists")
        self.on_change(config)


__all__ = ["CONFIG_MAP_NAME", "DEFAULT_NAMESPACE", "SECRET_NAME", "CloudConfig", "CloudConfigWatch",
           "cloud_config_sources"]
