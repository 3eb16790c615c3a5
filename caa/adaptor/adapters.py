"""Adapters from caa.network and caa.tls to the hypervisor service's own seams (IPodNetworking, IAgentTLS), and
the null cluster duties (IClusterDuties outside a cluster)."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from caa.adaptor.interfaces import IAgentTLS, IClusterDuties, IPodNetworking, IPoolPeerPods, SandboxRecord
from caa.network.interfaces import INodeNetwork, PodNetworkConfig
from caa.tls import CertificateAuthority


@implementer(IPodNetworking)
class NodeNetworking:
    """IPodNetworking over caa.network's INodeNetwork (VXLAN)."""

    _log = Logger()

    def __init__(self, node: INodeNetwork) -> None:
        self.node = node

    def inspect(self, sandbox_id: str, netns: str) -> Deferred[PodNetworkConfig]:
        return self.node.inspect(netns, sandbox_id)

    def setup(self, sandbox_id: str, netns: str, ips: tuple[str, ...],
              pod_network: PodNetworkConfig) -> Deferred[None]:
        return self.node.setup(netns, list(ips), pod_network)

    def ensure(self, sandbox_id: str, netns: str, ips: tuple[str, ...],
               pod_network: PodNetworkConfig) -> Deferred[None]:
        return Deferred.fromCoroutine(self._ensure(sandbox_id, netns, ips, pod_network))

    async def _ensure(self, sandbox_id: str, netns: str, ips: tuple[str, ...], config: PodNetworkConfig) -> None:
        present = await self.node.present_vnis()
        if config.vxlan_id in present:
            self._log.info("{sandbox_id}: tunnel VNI {vni} still present; kept", sandbox_id=sandbox_id,
                           vni=config.vxlan_id)
            return
        await self.node.setup(netns, list(ips), config)

    def teardown(self, sandbox_id: str, netns: str, pod_network: PodNetworkConfig | None) -> Deferred[None]:
        if pod_network is None:
            return succeed(None)
        return self.node.teardown(netns, pod_network)

    def sweep(self, live_vnis: Sequence[int]) -> Deferred[list[int]]:
        return self.node.sweep(live_vnis)

    def release_unowned(self, live_sandboxes: Sequence[str]) -> list[int]:
        """Release VNIs allocated to sandboxes the journal does not know (CreateVM interrupted after inspect)."""
        allocator = getattr(self.node, "allocator", None)
        if allocator is None:
            return []
        released = []
        for vni, owner in allocator.allocated().items():
            if owner and owner not in live_sandboxes:
                allocator.release(vni)
                released.append(vni)
        return released


# The pod-network object of --tunnel-type none (JSON: no vxlan-port / vxlan-id keys).
NULL_POD_NETWORK = PodNetworkConfig(pod_ip="0.0.0.0/32", pod_hw_addr="", interface="", worker_node_ip="0.0.0.0/32",
                                    mtu=1500, vxlan_id=0, vxlan_port=0, tunnel_type="none")


@implementer(IPodNetworking)
class NullNetworking:
    """--tunnel-type none: no pod network plumbing (development and process-level tests).

    inspect still answers a syntactically valid pod-network object so apf.json keeps its schema.
    """

    def inspect(self, sandbox_id: str, netns: str) -> Deferred[PodNetworkConfig]:
        return succeed(NULL_POD_NETWORK)

    def setup(self, sandbox_id: str, netns: str, ips: tuple[str, ...],
              pod_network: PodNetworkConfig) -> Deferred[None]:
        return succeed(None)

    def ensure(self, sandbox_id: str, netns: str, ips: tuple[str, ...],
               pod_network: PodNetworkConfig) -> Deferred[None]:
        return succeed(None)

    def teardown(self, sandbox_id: str, netns: str, pod_network: PodNetworkConfig | None) -> Deferred[None]:
        return succeed(None)


@implementer(IAgentTLS)
class AutoTLS:
    """Auto mode: per-VM server certificates from the persisted CA; the client certificate as client CA."""

    def __init__(self, ca: CertificateAuthority | None, client_cert_pem: bytes) -> None:
        self.ca = ca
        self.client_cert_pem = client_cert_pem

    def server_credentials(self, server_name: str) -> tuple[str, str]:
        if self.ca is None:
            return "", ""
        pair = self.ca.issue_server_certificate(server_name)
        return pair.cert_pem.decode(), pair.key_pem.decode()

    def client_ca_pem(self) -> str:
        return "" if self.ca is None else self.client_cert_pem.decode()


@implementer(IClusterDuties, IPoolPeerPods)
class NullClusterDuties:
    """Outside a cluster (no API server, or no NODE_NAME): no node value, no PeerPods, nothing to probe."""

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def peerpod_name(self, pod_name: str) -> str:
        return ""

    def instance_created(self, record: SandboxRecord) -> None:
        pass

    def instance_deleted(self, record: SandboxRecord) -> None:
        pass

    def startup_ready(self) -> Deferred[bool]:
        return succeed(True)

    def pool_vm_created(self, name: str, instance_id: str, pool: str) -> None:
        """Outside a cluster a pool VM has no PeerPod: only the adaptor's journal records it."""

    def pool_vm_released(self, name: str) -> None:
        """Outside a cluster there is no PeerPod to release."""
