"""
IBM Cloud VPC provider (spec-providers §6): one virtual server instance per pod VM, created through the VPC REST
API on treq with IAM tokens from an API key or a trusted profile (iam.py), the user data in `user_data`.

Options (default < env < flag), upstream's names: see `IbmCloudOptions` (config.py) and docs/providers.md.
What is left unset (cluster id, endpoint, zone, subnet, VPC, resource group) is discovered at start from the
cluster (discovery.py) as upstream does on IKS.
"""

from __future__ import annotations

from twisted.python import usage
from zope.interface import implementer

from caa.providers.ibmcloud.config import IbmCloudConfig, IbmCloudOptions
from caa.providers.interfaces import IProvider, IProviderFactory
from caa.reactors import INodeReactor


@implementer(IProviderFactory)
class IbmCloudProviderFactory:
    name = "ibmcloud"
    description = "Pod VMs as IBM Cloud VPC virtual server instances (TDX unless --disable-cvm, the default)"

    def options(self) -> usage.Options:
        return IbmCloudOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        from caa.providers.ibmcloud.provider import IbmCloudProvider

        return IbmCloudProvider(reactor, IbmCloudConfig.from_options(options))


__all__ = ["IbmCloudConfig", "IbmCloudOptions", "IbmCloudProviderFactory"]
