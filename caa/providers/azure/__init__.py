"""
Azure provider (spec-providers §4): one ARM virtual machine per pod VM with its own NIC (and public IP), created
through ARM REST on treq (`arm.py`), the user data in `properties.userData` (base64), a confidential VM
security profile (vTPM, secure boot with --enable-secure-boot) unless --disable-cvm. Tokens: `identity.py`.

Options (default < env < flag), upstream's names:

    --clientid            AZURE_CLIENT_ID        "" (secret, as upstream marks it)
    --secret              AZURE_CLIENT_SECRET    "" (secret; else workload identity, else managed identity)
    --tenantid            AZURE_TENANT_ID        "" (secret, as upstream marks it)
    --subscriptionid      AZURE_SUBSCRIPTION_ID  "" (required)
    --region              AZURE_REGION           "" (required)
    --resourcegroup       AZURE_RESOURCE_GROUP   "" (required)
    --instance-size       AZURE_INSTANCE_SIZE    Standard_DC2as_v5
    --instance-sizes      AZURE_INSTANCE_SIZES   "" (allowed list, comma-separated)
    --zone                (none)                 ""
    --subnetid            AZURE_SUBNET_ID        "" (required, ARM id)
    --securitygroupid     AZURE_NSG_ID           ""
    --imageid             AZURE_IMAGE_ID         "" (required)
    --ssh-key-path        (none)                 ""
    --ssh-username        SSH_USERNAME           peerpod
    --disable-cvm         DISABLECVM             false
    --enable-secure-boot  ENABLE_SECURE_BOOT     false
    --use-public-ip       USE_PUBLIC_IP          false
    --root-volume-size    ROOT_VOLUME_SIZE       0 (GB; 0 = the image's)
    --tags                TAGS                   "" (k=v,k2=v2)

AZURE_RESOURCE_MANAGER_ENDPOINT, AZURE_AUTHORITY_HOST, AZURE_FEDERATED_TOKEN_FILE and
AZURE_POD_IDENTITY_AUTHORITY_HOST move the endpoints / choose the credential; docs/providers.md has the role
assignments and an example.
"""

from __future__ import annotations

from twisted.python import usage
from zope.interface import implementer

from caa.providers.azure.config import AzureConfig, AzureOptions
from caa.providers.interfaces import IProvider, IProviderFactory
from caa.reactors import INodeReactor


@implementer(IProviderFactory)
class AzureProviderFactory:
    name = "azure"
    description = "Pod VMs as Azure virtual machines (confidential VMs unless --disable-cvm)"

    def options(self) -> usage.Options:
        return AzureOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        from caa.providers.azure.provider import AzureProvider

        return AzureProvider(reactor, AzureConfig.from_options(options))


__all__ = ["AzureProviderFactory", "AzureOptions", "AzureConfig"]
