"""
GCP provider (spec-providers §5): one Compute Engine instance per pod VM, created through Compute REST on treq
(`compute.py`), the user data in the `user-data` metadata item (base64, `user-data-encoding=base64`), a
confidential instance config (SEV, SEV_SNP or TDX) unless --disable-cvm. Tokens: `auth.py`.

Options (default < env < flag), upstream's names:

    --gcp-credentials    GCP_CREDENTIALS        "" (secret; service account key JSON; else application default)
    --gcp-project-id     GCP_PROJECT_ID         "" (required)
    --zone               GCP_ZONE               "" (required)
    --image-name         PODVM_IMAGE_NAME       "" (required)
    --machine-type       GCP_MACHINE_TYPE       e2-medium
    --machine-types      GCP_INSTANCE_TYPES     "" (allowed list, comma-separated)
    --network            GCP_NETWORK            "" (required)
    --subnetwork         GCP_SUBNETWORK         ""
    --disk-type          GCP_DISK_TYPE          pd-standard
    --disable-cvm        DISABLECVM             false
    --confidential-type  GCP_CONFIDENTIAL_TYPE  "" (SEV, SEV_SNP, TDX; required unless --disable-cvm)
    --root-volume-size   ROOT_VOLUME_SIZE       10 (GB; at least the image's)
    --use-public-ip      USE_PUBLIC_IP          false
    --tags               TAGS                   "" (k=v short names of the project's Resource Manager tags)

GOOGLE_APPLICATION_CREDENTIALS, GCE_METADATA_HOST, CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE and
CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER choose the credential / move the endpoints;
docs/providers.md has the roles and an example.
"""

from __future__ import annotations

from twisted.python import usage
from zope.interface import implementer

from caa.providers.gcp.config import GcpConfig, GcpOptions
from caa.providers.interfaces import IProvider, IProviderFactory
from caa.reactors import INodeReactor


@implementer(IProviderFactory)
class GcpProviderFactory:
    name = "gcp"
    description = "Pod VMs as Google Compute Engine instances (confidential VMs unless --disable-cvm)"

    def options(self) -> usage.Options:
        return GcpOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        from caa.providers.gcp.provider import GcpProvider

        return GcpProvider(reactor, GcpConfig.from_options(options))


__all__ = ["GcpProviderFactory", "GcpOptions", "GcpConfig"]
