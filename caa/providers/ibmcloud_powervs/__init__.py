"""
IBM Cloud Power Virtual Server provider, `ibmcloud-powervs` (spec-providers §7): one PVM instance per pod VM in a
PowerVS workspace, through the PowerVS REST API on treq with an IAM token from the API key (caa.providers.ibmcloud
.iam), the user data in `userData` (base64). Sizes come from the pod (vCPUs and memory, or a
`<systype>-<cpus>x<memGB>` machine type), else the options. Names are cut to 47 characters.

Options (default < env < flag), upstream's names: see `PowerVSOptions` (config.py) and docs/providers.md.
"""

from __future__ import annotations

from twisted.python import usage
from zope.interface import implementer

from caa.providers.ibmcloud_powervs.config import PowerVSConfig, PowerVSOptions
from caa.providers.interfaces import IProvider, IProviderFactory
from caa.reactors import INodeReactor


@implementer(IProviderFactory)
class PowerVSProviderFactory:
    name = "ibmcloud-powervs"
    description = "Pod VMs as IBM Cloud Power Virtual Server instances"

    def options(self) -> usage.Options:
        return PowerVSOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        from caa.providers.ibmcloud_powervs.provider import PowerVSProvider

        return PowerVSProvider(reactor, PowerVSConfig.from_options(options))


__all__ = ["PowerVSConfig", "PowerVSOptions", "PowerVSProviderFactory"]
