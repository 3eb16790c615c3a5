"""
Alibaba Cloud provider (spec-providers §8): one ECS instance per pod VM, created through the RPC-style ECS API
(rpc.py: signature v1, HMAC-SHA1) on treq, the user data in `UserData` (base64), TDX unless --disable-cvm.

Options (default < env < flag), upstream's names: see `AlibabaCloudOptions` (config.py) and docs/providers.md.
"""

from __future__ import annotations

from twisted.python import usage
from zope.interface import implementer

from caa.providers.alibabacloud.config import AlibabaCloudConfig, AlibabaCloudOptions
from caa.providers.interfaces import IProvider, IProviderFactory
from caa.reactors import INodeReactor


@implementer(IProviderFactory)
class AlibabaCloudProviderFactory:
    name = "alibabacloud"
    description = "Pod VMs as Alibaba Cloud ECS instances (Intel TDX unless --disable-cvm)"

    def options(self) -> usage.Options:
        return AlibabaCloudOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        from caa.providers.alibabacloud.provider import AlibabaCloudProvider

        return AlibabaCloudProvider(reactor, AlibabaCloudConfig.from_options(options))


__all__ = ["AlibabaCloudConfig", "AlibabaCloudOptions", "AlibabaCloudProviderFactory"]
