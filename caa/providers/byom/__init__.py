"""
BYOM, "bring your own machine" (spec-providers §9): pod VMs are machines created beforehand (running the byom
variant of the pod VM image, see docs/podvm.md), known only by their IPs. Creating an instance reserves a free IP
in the cluster-wide pool (the ConfigMap `byom-ip-pool-state`, pool.py) and pushes the user data over SFTP to
/media/cidata/user-data on it (sftp.py); deleting pushes `reboot` to /media/cidata/reboot (the VM reboots to a
clean state) and returns the IP. The instance id is the IP.

Options (default < env < flag), upstream's names:

    --vm-pool-ips                 VM_POOL_IPS                 "" (required: IPs and ranges a-b, comma-separated)
    --ssh-username                SSH_USERNAME                peerpod
    --ssh-pub-key                 SSH_PUB_KEY_PATH            /root/.ssh/id_rsa.pub
    --ssh-priv-key                SSH_PRIV_KEY_PATH           /root/.ssh/id_rsa
    --ssh-timeout                 SSH_TIMEOUT                 30 (seconds)
    --ssh-host-key-allowlist-dir  SSH_HOST_KEY_ALLOWLIST_DIR  "" (unset: any host key, logged)
    --pool-namespace              POOL_NAMESPACE              "" (the service account's namespace, POD_NAMESPACE,
                                                              else confidential-containers-system)
    --pool-configmap-name         POOL_CONFIGMAP_NAME         byom-ip-pool-state
    --max-range-ips               MAX_RANGE_IPS               100

The Kubernetes API is reached in-cluster, else through KUBECONFIG. docs/providers.md has the RBAC and an example.
"""

from __future__ import annotations

from twisted.python import usage
from zope.interface import implementer

from caa.providers.byom.config import ByomConfig, ByomOptions
from caa.providers.interfaces import IProvider, IProviderFactory
from caa.reactors import INodeReactor


@implementer(IProviderFactory)
class ByomProviderFactory:
    name = "byom"
    description = "Pod VMs from a pool of pre-created machines, user data pushed over SFTP"

    def options(self) -> usage.Options:
        return ByomOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        from caa.providers.byom.provider import ByomProvider

        return ByomProvider(reactor, ByomConfig.from_options(options))


__all__ = ["ByomConfig", "ByomOptions", "ByomProviderFactory"]
