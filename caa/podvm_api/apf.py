"""apf.json: the forwarder's configuration, written by the adaptor and read in the pod VM (spec-adaptor §5.5,
spec-podvm §1.2).

One class for both directions. `to_json` writes what upstream's adaptor writes (Go `MarshalIndent` with four
spaces, keys in upstream's struct order, empty optional keys omitted); `from_dict` reads with Go
`encoding/json` rules, as upstream's forwarder does: unknown keys ignored, `null` is the zero value, `{}` is
valid, keys match case-insensitively. Unlike upstream, an absent or `null` `pod-network` is not a crash: it
reads as `None` (the forwarder then serves without building a pod network).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from caa.network.interfaces import ConfigError as PodNetworkError
from caa.network.interfaces import PodNetworkConfig
from caa.podvm_api import gojson

__all__ = ["APFConfig", "APFError", "POOL_VM_KEY", "CLAIM_TOKEN_KEY"]

POOL_VM_KEY = "caa-pool-vm"
CLAIM_TOKEN_KEY = "caa-claim-token-sha256"


class APFError(ValueError):
    """apf.json is malformed; the message names the key."""


def _pod_network(value: PodNetworkConfig | Mapping[str, Any] | None) -> PodNetworkConfig | None:
    # The adaptor's network adapter still hands the "pod-network" object over as its JSON dict.
    if value is None or isinstance(value, PodNetworkConfig):
        return value
    return PodNetworkConfig.from_json(value)


def _strings_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True, repr=False)
class APFConfig:
    pod_network: PodNetworkConfig | None = attrs.field(default=None, converter=_pod_network)
    pod_namespace: str = ""
    pod_name: str = ""
    tls_server_key: str = ""
    tls_server_cert: str = ""
    tls_client_ca: str = ""
    tls_min_version: str = ""
    tls_cipher_suites: tuple[str, ...] = attrs.field(default=(), converter=_strings_tuple)
    #: upstream's legacy "secure comms" keys: read and carried, never used, never written by CAA
    sc_pp_prv: bytes = b""
    sc_wn_pub: bytes = b""
    #: caa's warm pools (not upstream): a pool VM's bootstrap apf.json names the VM and holds the SHA-256 of
    #: its one-time claim token (hex); the forwarder then starts unclaimed (caa.forwarder.claim)
    pool_vm_name: str = ""
    claim_token_sha256: str = ""

    def __repr__(self) -> str:  # never show the key
        return (f"APFConfig(pod={self.pod_namespace}/{self.pod_name}, "
                f"pod_network={'yes' if self.pod_network else 'no'}, "
                f"tls_server_cert={'yes' if self.tls_server_cert else 'no'}, "
                f"tls_server_key={'<redacted>' if self.tls_server_key else 'no'}, "
                f"tls_client_ca={'yes' if self.tls_client_ca else 'no'}, "
                f"tls_min_version={self.tls_min_version!r}"
                f"{', pool_vm=' + repr(self.pool_vm_name) if self.pool_vm_name else ''})")

    # -- writing (the adaptor) ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, keys in upstream's order; `omitempty` keys left out when empty."""
        d: dict[str, Any] = {
            "pod-network": None if self.pod_network is None else self.pod_network.to_json(),
            "pod-namespace": self.pod_namespace,
            "pod-name": self.pod_name,
        }
        for key, value in (("tls-server-key", self.tls_server_key), ("tls-server-cert", self.tls_server_cert),
                           ("tls-client-ca", self.tls_client_ca), ("tls-min-version", self.tls_min_version)):
            if value:
                d[key] = value
        if self.tls_cipher_suites:
            d["tls-cipher-suites"] = list(self.tls_cipher_suites)
        for key, value in ((POOL_VM_KEY, self.pool_vm_name), (CLAIM_TOKEN_KEY, self.claim_token_sha256)):
            if value:
                d[key] = value
        for key, raw in (("sc-pp-prv", self.sc_pp_prv), ("sc-wn-pub", self.sc_wn_pub)):
            if raw:
                d[key] = base64.b64encode(raw).decode("ascii")  # Go's []byte
        return d

    def to_json(self) -> str:
        """The file as upstream writes it: Go MarshalIndent, four spaces."""
        return gojson.dumps(self.to_dict(), indent=4)

    # -- reading (the pod VM) ----------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, doc: Any) -> APFConfig:
        """The decoded JSON value -> APFConfig, with Go's decoding rules; raises APFError."""
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise APFError(f"expected a JSON object, got {type(doc).__name__}")
        d = gojson.fold_keys(doc)
        pod_network = None
        if d.get("pod-network") is not None:
            try:
                pod_network = PodNetworkConfig.from_json(d["pod-network"])
            except PodNetworkError as e:
                raise APFError(str(e)) from None
        return cls(
            pod_network=pod_network,
            pod_namespace=_str(d, "pod-namespace"),
            pod_name=_str(d, "pod-name"),
            tls_server_key=_str(d, "tls-server-key"),
            tls_server_cert=_str(d, "tls-server-cert"),
            tls_client_ca=_str(d, "tls-client-ca"),
            tls_min_version=_str(d, "tls-min-version"),
            tls_cipher_suites=_strings(d, "tls-cipher-suites"),
            sc_pp_prv=_bytes(d, "sc-pp-prv"),
            sc_wn_pub=_bytes(d, "sc-wn-pub"),
            pool_vm_name=_str(d, POOL_VM_KEY),
            claim_token_sha256=_str(d, CLAIM_TOKEN_KEY),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> APFConfig:
        """Parse the file's text; raises APFError (ValueError) for bad JSON too."""
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise APFError(str(e)) from None
        return cls.from_dict(doc)


def _str(d: Mapping[str, Any], key: str) -> str:
    v = d.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise APFError(f"{key!r} must be a string")
    return v


def _strings(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    v: Iterable[Any] = d.get(key) or []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APFError(f"{key!r} must be an array of strings")
    return tuple(v)


def _bytes(d: Mapping[str, Any], key: str) -> bytes:
    text = _str(d, key)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise APFError(f"{key!r} must be base64") from None
