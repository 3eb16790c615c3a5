"""Contracts of the node daemon: the per-sandbox agent proxy and the sandbox journal.

The agent proxy (`caa/adaptor/proxy.py`) is written against `IAgentProxy` / `IAgentProxyFactory`;
the hypervisor service only ever sees these interfaces, so tests drive it with fakes.

The sandbox journal (`ISandboxStore`) holds one `SandboxRecord` per sandbox under the pods directory.
Every side effect of StartVM/StopVM is bracketed by journal writes: an *intent* state is written
before the side effect (instance create, tunnel setup, teardown) and the *result* state after it, so
a restarted adaptor can tell what may exist in the cloud and on the node and finish or undo it.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

SOCKET_NAME = "agent.ttrpc"


class IAgentProxy(Interface):
    """One sandbox's agent proxy: a ttrpc server on a unix socket that relays to the pod VM's forwarder."""

    socket_path: str = Attribute("The unix socket the shim dials (<pods-dir>/<sid>/agent.ttrpc).")

    def start(address: tuple[str, int], server_name: str, deadline: float) -> Deferred[None]:
        """Listen on socket_path, dial the forwarder at address (host, port) with back-off (cap 1 s)
        until deadline (absolute, in clock.seconds() time), verifying the server certificate for
        server_name when TLS is on.

        Fires when the first upstream connection is up and the socket serves. Errbacks with
        TTRPCError(DEADLINE_EXCEEDED or UNAVAILABLE,
        'failed to establish agent proxy connection to <host:port>: <last error>') at the deadline,
        or if stop() is called first. After the first success the proxy reconnects by itself when
        the upstream link drops (calls wait for the reconnect within their own deadline).
        """

    def stop() -> Deferred[None]:
        """Close the listener, every shim connection and the upstream connection at once, cancel a
        dial in progress, and remove socket_path. Idempotent; fires when everything is closed."""


class IAgentProxyFactory(Interface):
    """Makes agent proxies; holds the TLS client material (CA, client certificate) they share."""

    def new(sandbox_id: str, socket_path: str) -> IAgentProxy:
        """A new, not yet started proxy for sandbox_id that will listen on socket_path."""


class SandboxState(enum.StrEnum):
    """Where a sandbox is in its lifecycle. `*_INTENT` states are written before a side effect."""

    CREATED = "created"  # CreateVM done: pod dir, apf.json, VNI; nothing in the cloud
    CREATE_INTENT = "create-intent"  # about to call provider.create_instance
    INSTANCE = "instance"  # instance exists (id known), no tunnel yet
    TUNNEL_INTENT = "tunnel-intent"  # about to set up the node-side tunnel
    TUNNEL = "tunnel"  # tunnel set up, proxy dialling the forwarder
    RUNNING = "running"  # StartVM answered OK
    STOP_INTENT = "stop-intent"  # StopVM (or a rollback) is tearing it down


@attrs.frozen
class SandboxRecord:
    """Everything needed to re-adopt or undo one sandbox after a restart. JSON-serialisable."""

    sandbox_id: str
    pod_name: str
    pod_namespace: str
    netns: str
    socket_path: str
    server_name: str
    state: SandboxState
    created: float  # wall-clock seconds (time.time()) of CreateVM
    updated: float = 0.0
    annotations: dict[str, str] = attrs.field(factory=dict)
    spec: dict[str, Any] = attrs.field(factory=dict)  # InstanceSpec fields
    pod_network: dict[str, Any] | None = None  # PodNetworkConfig JSON (apf.json "pod-network")
    vni: int | None = None
    instance_id: str = ""
    instance_name: str = ""
    ips: tuple[str, ...] = ()
    error: str = ""  # last failure, for caactl list

    def evolve(self, **changes: Any) -> SandboxRecord:
        return attrs.evolve(self, **changes)

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self, recurse=False)
        d["state"] = self.state.value
        d["ips"] = list(self.ips)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SandboxRecord:
        fields = {f.name for f in attrs.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["state"] = SandboxState(kw["state"])
        kw["ips"] = tuple(kw.get("ips", ()))
        return cls(**kw)


class ISandboxStore(Interface):
    """The sandbox journal: one record per sandbox, each write atomic (write, fsync, rename).

    Records live at <pods-dir>/<sid>/sandbox.json; the pod directory is 0700 and files 0600.
    Methods are synchronous and small (a few KiB per write on a local filesystem).
    """

    def pod_dir(sandbox_id: str) -> str:
        """<pods-dir>/<sid>."""

    def create_dir(sandbox_id: str) -> str:
        """Create the pod directory (0700) and return it."""

    def put(record: SandboxRecord) -> None:
        """Write record atomically (tmp file, fsync, rename, fsync dir)."""

    def get(sandbox_id: str) -> SandboxRecord | None:
        """The record of sandbox_id, or None."""

    def remove(sandbox_id: str) -> None:
        """Delete the record and the whole pod directory (keys, apf.json, socket). Idempotent."""

    def load_all() -> list[SandboxRecord]:
        """Every readable record (unreadable ones are logged and skipped), oldest first."""

    def remove_strays() -> list[str]:
        """Remove pod directories without a record (a CreateVM interrupted before its first journal write);
        return their sandbox ids. Called at start, before anything is served."""


class IPodNetworking(Interface):
    """The node side of pod networking as the hypervisor service uses it (adapter over caa.network).

    Every method is safe to repeat: recovery calls them again for sandboxes found in the journal.
    """

    def inspect(sandbox_id: str, netns: str) -> Deferred[dict[str, Any]]:
        """Inspect the pod netns and allocate the sandbox's VNI; fire with the apf.json "pod-network"
        object (JSON-ready dict, with "vxlan-id"). Allocating twice for one sandbox gives the same VNI."""

    def setup(sandbox_id: str, netns: str, ips: tuple[str, ...], pod_network: dict[str, Any]) -> Deferred[None]:
        """Set up the tunnel between the pod netns and the VM at ips[0] (rolled back on failure)."""

    def ensure(sandbox_id: str, netns: str, ips: tuple[str, ...], pod_network: dict[str, Any]) -> Deferred[None]:
        """Re-adoption after a restart: leave an existing tunnel of this VNI alone, set it up if it is gone."""

    def teardown(sandbox_id: str, netns: str, pod_network: dict[str, Any]) -> Deferred[None]:
        """Remove the tunnel if any and release the sandbox's VNI. Succeeds when nothing is there."""


class IAgentTLS(Interface):
    """The TLS material CreateVM puts into apf.json (adapter over caa.tls)."""

    def server_credentials(server_name: str) -> tuple[str, str]:
        """(certificate PEM, private key PEM) of a fresh server certificate for server_name, or ("", "")
        when a manual CA is configured (the pod VM image carries its own certificates)."""

    def client_ca_pem() -> str:
        """PEM the forwarder trusts to verify the adaptor's client certificate ("" in manual-CA mode)."""


@attrs.frozen(repr=False)
class ProxyTLS:
    """TLS client settings of every agent proxy (None = --disable-tls).

    The proxy factory is built as `AgentProxyFactory(reactor, tls: ProxyTLS | None)` and makes each
    proxy's client creator with `caa.tls.client_creator(ca_pem, cert_pem, key_pem, name, min_version,
    cipher_suites)`, where name is `server_name_override` when set (manual CA: "podvm-server"), else the
    server_name given to `IAgentProxy.start`.
    """

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    server_name_override: str = ""
    min_version: str = ""
    cipher_suites: tuple[str, ...] = ()
    skip_verify: bool = False

    def __repr__(self) -> str:
        return f"ProxyTLS(override={self.server_name_override!r}, min_version={self.min_version!r}, key=<redacted>)"
