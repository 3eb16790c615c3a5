"""apf.json, the forwarder's configuration written by caa-process-user-data (spec-podvm §1.2).

Parsed with Go `encoding/json` semantics, as upstream's forwarder does: unknown keys ignored, `null` is the
zero value, `{}` is valid, keys match case-insensitively. Unlike upstream, an absent or `null` `pod-network` is
not a crash: the forwarder then serves without building a pod network (and says so).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attr

if TYPE_CHECKING:
    from caa.network.interfaces import PodNetworkConfig

__all__ = ["ConfigError", "ForwarderConfig", "load_config", "parse_config"]


class ConfigError(Exception):
    """apf.json could not be read or parsed; the message names the file and the cause."""


@attr.frozen(repr=False)
class ForwarderConfig:
    pod_network: PodNetworkConfig | None = None
    pod_namespace: str = ""
    pod_name: str = ""
    tls_server_cert: str = ""
    tls_server_key: str = ""
    tls_client_ca: str = ""
    tls_min_version: str = ""
    tls_cipher_suites: tuple[str, ...] = ()
    sc_pp_prv: bytes = b""
    sc_wn_pub: bytes = b""

    def __repr__(self) -> str:  # never show the key
        return (f"ForwarderConfig(pod={self.pod_namespace}/{self.pod_name}, "
                f"pod_network={'yes' if self.pod_network else 'no'}, "
                f"tls_server_cert={'yes' if self.tls_server_cert else 'no'}, "
                f"tls_server_key={'<redacted>' if self.tls_server_key else 'no'}, "
                f"tls_client_ca={'yes' if self.tls_client_ca else 'no'}, "
                f"tls_min_version={self.tls_min_version!r})")


def _fold(d: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k.lower() not in out or k == k.lower():
            out[k.lower()] = v
    return out


def _str(d: Mapping[str, Any], key: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ConfigError(f"{key!r} must be a string")
    return v


def _bytes(d: Mapping[str, Any], key: str) -> bytes:
    v = _str(d, key)
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{key!r} must be base64") from None


def parse_config(doc: Any) -> ForwarderConfig:
    """The decoded JSON document -> ForwarderConfig; raises ConfigError (or the network ConfigError)."""
    if doc is None:
        return ForwarderConfig()
    if not isinstance(doc, dict):
        raise ConfigError(f"expected a JSON object, got {type(doc).__name__}")
    d = _fold(doc)
    suites = d.get("tls-cipher-suites") or []
    if not isinstance(suites, list) or not all(isinstance(s, str) for s in suites):
        raise ConfigError("'tls-cipher-suites' must be an array of strings")
    pod_network = None
    raw = d.get("pod-network")
    if raw is not None:
        from caa.network.interfaces import ConfigError as NetConfigError
        from caa.network.interfaces import PodNetworkConfig

        try:
            pod_network = PodNetworkConfig.from_json(raw)
        except NetConfigError as e:
            raise ConfigError(str(e)) from None
    return ForwarderConfig(
        pod_network=pod_network,
        pod_namespace=_str(d, "pod-namespace"),
        pod_name=_str(d, "pod-name"),
        tls_server_cert=_str(d, "tls-server-cert"),
        tls_server_key=_str(d, "tls-server-key"),
        tls_client_ca=_str(d, "tls-client-ca"),
        tls_min_version=_str(d, "tls-min-version"),
        tls_cipher_suites=tuple(suites),
        sc_pp_prv=_bytes(d, "sc-pp-prv"),
        sc_wn_pub=_bytes(d, "sc-wn-pub"),
    )


def load_config(path: str) -> ForwarderConfig:
    """Read and parse apf.json; errors carry upstream's wording (`failed to open`, `failed to decode`)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"failed to open {path}: {e.strerror or e}") from e
    try:
        return parse_config(json.loads(text))
    except (ValueError, ConfigError) as e:
        raise ConfigError(
            f"failed to decode a Agent Protocol Forwarder config file file: {path}: {e}"
        ) from None
