"""Contracts of the node daemon: the per-sandbox agent proxy and the sandbox journal.

The agent proxy (`caa/adaptor/proxy.py`) is written against `IAgentProxy` / `IAgentProxyFactory`;
the hypervisor service only ever sees these interfaces, so tests drive it with fakes.

The sandbox journal (`ISandboxStore`) holds one `SandboxRecord` per sandbox under the pods directory.
Every side effect of StartVM/StopVM is bracketed by journal writes: an *intent* state is written
before the side effect (instance create, tunnel setup, teardown) and the *result* state after it, so
a restarted adaptor can tell what may exist in the cloud and on the node and finish or undo it. The
states and their allowed transitions are in caa/adaptor/states.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from caa.adaptor.states import SandboxState, check_transition
from caa.network.interfaces import PodNetworkConfig
from caa.providers.interfaces import InstanceSpec

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
        dial in progress, and remove socket_path while it is still this proxy's socket (a newer
        adaptor's socket at that path stays). Idempotent; fires when everything is closed."""

    def drain(timeout: float) -> Deferred[None]:
        """After a rolling update handed the sandbox to a newer adaptor: stop listening (the path is left
        to the newer adaptor), let the shim connections already open relay until their clients close
        them or `timeout` seconds pass, then stop. Fires when stopped."""


class IAgentProxyFactory(Interface):
    """Makes agent proxies; holds the TLS client material (CA, client certificate) they share."""

    def new(sandbox_id: str, socket_path: str, volumes: tuple[str, ...]) -> IAgentProxy:
        """A new, not yet started proxy for sandbox_id that will listen on socket_path. volumes: the disk ids
        the sandbox's VM is created with, in attach order (its record's `spec.volumes`); CreateContainer numbers
        the pod's cloud volumes by it."""


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attrs.frozen
class SandboxRecord:
    """Everything needed to re-adopt or undo one sandbox after a restart, as typed values.

    Only the store (caa/adaptor/store.py) turns a record into sandbox.json and back. Move a record to another
    state with `advance`, which checks the transition table (caa/adaptor/states.py).
    """

    sandbox_id: str
    pod_name: str
    pod_namespace: str
    netns: str
    socket_path: str
    server_name: str
    state: SandboxState
    created: float  # wall-clock seconds (time.time()) of CreateVM
    updated: float = 0.0
    annotations: Mapping[str, str] = attrs.field(factory=dict)
    spec: InstanceSpec = InstanceSpec()
    pod_network: PodNetworkConfig | None = None  # apf.json "pod-network"
    instance_id: str = ""
    instance_name: str = ""
    ips: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    error: str = ""  # last failure, for caactl list
    # The PeerPod guarding the instance in a cluster ("" outside one): kept so a restarted adaptor still
    # releases its finalizer after deleting the instance (upstream keeps it in memory only).
    peerpod: str = ""

    @property
    def vni(self) -> int | None:
        """The sandbox's VXLAN id (None without a VXLAN tunnel)."""
        return self.pod_network.vxlan_id or None if self.pod_network is not None else None

    def advance(self, state: SandboxState | None = None, **changes: Any) -> SandboxRecord:
        """A copy in `state` (default: the same) with `changes`; raises IllegalTransition for a move the
        table does not allow."""
        new_state = self.state if state is None else state
        check_transition(self.sandbox_id, self.state, new_state)
        return attrs.evolve(self, state=new_state, **changes)

    def evolve(self, **changes: Any) -> SandboxRecord:
        """A copy with changes, without the transition check (tests that fake an older journal)."""
        return attrs.evolve(self, **changes)


class ISandboxStore(Interface):
    """The sandbox journal and everything else in a pod directory: the only code that touches those files.

    Layout: <pods-dir>/<sid>/ (0700) holds sandbox.json (the record), apf.json, user-data (0600 each) and the
    agent proxy's socket. Every write is atomic (tmp file, fsync, rename, fsync dir). File I/O runs off the
    reactor thread (the store is given a runner, e.g. a thread pool); the calls for one sandbox run one after
    the other in the order they were made, and a call's Deferred fires once its write is durable. Cancelling
    a returned Deferred does not cancel the write.
    """

    def pod_dir(sandbox_id: str) -> str:
        """<pods-dir>/<sid> (no I/O). Raises ValueError for an id that is not a plain file name."""

    def socket_path(sandbox_id: str) -> str:
        """<pods-dir>/<sid>/agent.ttrpc, where the sandbox's agent proxy listens (no I/O)."""

    def create(record: SandboxRecord, apf_json: bytes, user_data: bytes) -> Deferred[None]:
        """Create the pod directory, write apf.json and user-data, then the record (the commit point: a
        directory without a record is removed by `remove_strays`)."""

    def put(record: SandboxRecord) -> Deferred[None]:
        """Write the record (atomically)."""

    def get(sandbox_id: str) -> Deferred[SandboxRecord | None]:
        """The record of sandbox_id, or None."""

    def read_user_data(sandbox_id: str) -> Deferred[bytes]:
        """The user-data written by `create`."""

    def remove(sandbox_id: str) -> Deferred[None]:
        """Delete the record, then the whole pod directory (keys, apf.json, socket). Idempotent."""

    def load_all() -> Deferred[list[SandboxRecord]]:
        """Every readable record (unreadable ones are logged and skipped), oldest first."""

    def remove_strays() -> Deferred[list[str]]:
        """Remove pod directories without a record (a CreateVM interrupted before its record was written);
        fire with their sandbox ids. Called at start, before anything is served."""


class IPodNetworking(Interface):
    """The node side of pod networking as the hypervisor service uses it (adapter over caa.network).

    Every method is safe to repeat: recovery calls them again for sandboxes found in the journal.
    """

    def inspect(sandbox_id: str, netns: str) -> Deferred[PodNetworkConfig]:
        """Inspect the pod netns and allocate the sandbox's VNI; fire with the apf.json "pod-network" value
        (with its vxlan_id). Allocating twice for one sandbox gives the same VNI."""

    def setup(sandbox_id: str, netns: str, ips: tuple[str, ...], pod_network: PodNetworkConfig) -> Deferred[None]:
        """Set up the tunnel between the pod netns and the VM at ips[0] (rolled back on failure)."""

    def ensure(sandbox_id: str, netns: str, ips: tuple[str, ...], pod_network: PodNetworkConfig) -> Deferred[None]:
        """Re-adoption after a restart: leave an existing tunnel of this VNI alone, set it up if it is gone."""

    def teardown(sandbox_id: str, netns: str, pod_network: PodNetworkConfig | None) -> Deferred[None]:
        """Remove the tunnel if any and release the sandbox's VNI. Succeeds when nothing is there (or
        pod_network is None: CreateVM failed before the netns was inspected)."""


class IAgentTLS(Interface):
    """The TLS material CreateVM puts into apf.json (adapter over caa.tls)."""

    def server_credentials(server_name: str) -> tuple[str, str]:
        """(certificate PEM, private key PEM) of a fresh server certificate for server_name, or ("", "")
        when a manual CA is configured (the pod VM image carries its own certificates)."""

    def client_ca_pem() -> str:
        """PEM the forwarder trusts to verify the adaptor's client certificate ("" in manual-CA mode)."""


class IClusterDuties(Interface):
    """What the adaptor owes the Kubernetes cluster it runs in (caa/adaptor/cluster.py; `NullClusterDuties`
    outside a cluster). The service calls it at state transitions; nothing here ever blocks a caller on the API
    server: API work runs in background tasks retried with back-off."""

    def start() -> None:
        """Advertise kata.peerpods.io/vm on the node (background, retried until it succeeds or `stop`)."""

    def stop() -> Deferred[None]:
        """Cancel the background work, then withdraw the node's value if this instance still owns it."""

    def peerpod_name(pod_name: str) -> str:
        """A fresh PeerPod name for pod_name (`<pod>-resource-<5 random>`), "" when no PeerPods are kept."""

    def instance_created(record: SandboxRecord) -> None:
        """The record's instance exists (record.instance_id, record.peerpod journalled): create its PeerPod in the
        background. An existing PeerPod of that name counts as created (re-adoption after a restart)."""

    def instance_deleted(record: SandboxRecord) -> None:
        """The record's instance is gone: stop creating its PeerPod and release the PeerPod's finalizer in the
        background (a missing PeerPod counts as released)."""

    def startup_ready() -> Deferred[bool]:
        """The startup probe's cluster check (spec-adaptor §7.4): every peer pod on this node was Ready since
        this adaptor started (checked until it once succeeds). Never errbacks."""


class IPoolPeerPods(Interface):
    """PeerPods for warm-pool VMs (caa/adaptor/cluster.py; nothing outside a cluster): a pool VM has no pod, so
    its PeerPod lives in the adaptor's namespace, owned by the adaptor's Node. Background work, like
    IClusterDuties'; names are the VMs' names, so a restarted adaptor finds them again."""

    def pool_vm_created(name: str, instance_id: str, pool: str) -> None:
        """Pool VM `name` exists: create its PeerPod (finalizer set, labelled `caa.peerpods.io/pool=<pool>`)."""

    def pool_vm_released(name: str) -> None:
        """Pool VM `name` is deleted or handed to a sandbox (whose own PeerPod takes over): release the
        PeerPod's finalizer, then delete the object (a missing PeerPod counts as released)."""


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


__all__ = [
    "SOCKET_NAME", "IAgentProxy", "IAgentProxyFactory", "IAgentTLS", "IClusterDuties", "IPodNetworking",
    "ISandboxStore", "ProxyTLS", "SandboxRecord", "SandboxState",
]
