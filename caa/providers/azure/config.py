"""Azure provider options (upstream's flags and env vars, spec-adaptor §7.3, spec-providers §4.1) and the frozen
configuration built from them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen
from twisted.python import usage

from caa.providers.interfaces import InvalidConfig
from caa.providers.options import ProviderOptions, parse_bool, parse_tags, parse_uint, split_list, tags_option
from caa.providers.redact import masked_fields

#: Where ARM and the identity platform are reached in Azure's public cloud; AZURE_RESOURCE_MANAGER_ENDPOINT and
#: AZURE_AUTHORITY_HOST (azure-identity's variable) replace them (sovereign clouds, the tests' fake).
DEFAULT_ARM_ENDPOINT = "https://management.azure.com"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
#: The instance metadata service (managed identity); AZURE_POD_IDENTITY_AUTHORITY_HOST (azure-identity's) moves it.
DEFAULT_IMDS_ENDPOINT = "http://169.254.169.254"
#: osProfile.adminUsername values ARM refuses (Compute's API reference, OSProfile.adminUsername)
RESERVED_ADMIN_NAMES = frozenset({
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a", "actuser",
    "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root", "server", "sql",
    "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
})
MAX_USER_DATA = 65536  # characters of base64 (ARM's limit on userData)
_SUBNET_ID = re.compile(
    r"^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Network/virtualNetworks/[^/]+/subnets/[^/]+$",
    re.IGNORECASE)


class AzureOptions(ProviderOptions):
    optParameters = [
        ["clientid", None, "", "Client id of the service principal or managed/workload identity."],
        ["secret", None, "", "Client secret of the service principal (else workload identity or managed identity)."],
        ["tenantid", None, "", "Tenant id (directory)."],
        ["subscriptionid", None, "", "Subscription id (required)."],
        ["region", None, "", "Region of the pod VMs, e.g. eastus (required)."],
        ["resourcegroup", None, "", "Resource group of the pod VMs (required)."],
        ["instance-size", None, "Standard_DC2as_v5", "VM size when the pod asks for none."],
        ["instance-sizes", None, "", "Allowed VM sizes (comma-separated)."],
        ["zone", None, "", "Availability zone of the pod VMs (empty: none)."],
        ["subnetid", None, "", "ARM id of the pod VMs' subnet (required)."],
        ["securitygroupid", None, "", "ARM id of a network security group for the pod VMs' NICs."],
        ["imageid", None, "", "Pod VM image: an ARM image id or /CommunityGalleries/... id (required)."],
        ["ssh-key-path", None, "", "Public SSH key file for the admin user (empty: an unusable generated key)."],
        ["ssh-username", None, "peerpod", "Admin user of the pod VMs."],
        ["disable-cvm", None, False, "true: no confidential VM security profile.", parse_bool],
        ["enable-secure-boot", None, False, "Secure boot of confidential VMs.", parse_bool],
        ["use-public-ip", None, False, "Give each pod VM a public IP and dial it.", parse_bool],
        ["root-volume-size", None, 0, "OS disk size in GB (0 = the image's size).", parse_uint],
        ["tags", None, "", "Tags of the pod VMs, key=value pairs (comma-separated).", tags_option],
    ]
    envVars = {
        "clientid": "AZURE_CLIENT_ID",
        "secret": "AZURE_CLIENT_SECRET",
        "tenantid": "AZURE_TENANT_ID",
        "subscriptionid": "AZURE_SUBSCRIPTION_ID",
        "region": "AZURE_REGION",
        "resourcegroup": "AZURE_RESOURCE_GROUP",
        "instance-size": "AZURE_INSTANCE_SIZE",
        "instance-sizes": "AZURE_INSTANCE_SIZES",
        "subnetid": "AZURE_SUBNET_ID",
        "securitygroupid": "AZURE_NSG_ID",
        "imageid": "AZURE_IMAGE_ID",
        "ssh-username": "SSH_USERNAME",
        "disable-cvm": "DISABLECVM",
        "enable-secure-boot": "ENABLE_SECURE_BOOT",
        "use-public-ip": "USE_PUBLIC_IP",
        "root-volume-size": "ROOT_VOLUME_SIZE",
        "tags": "TAGS",
    }
    secretOptions = frozenset({"clientid", "secret", "tenantid"})  # upstream marks all three Secret()


@frozen
class AzureConfig:
    client_id: str = field(default="", repr=False)
    client_secret: str = field(default="", repr=False)
    tenant_id: str = field(default="", repr=False)
    subscription_id: str = ""
    region: str = ""
    resource_group: str = ""
    instance_size: str = "Standard_DC2as_v5"
    instance_sizes: tuple[str, ...] = ()
    zone: str = ""
    subnet_id: str = ""
    security_group_id: str = ""
    image_id: str = ""
    ssh_key_path: str = ""
    ssh_username: str = "peerpod"
    disable_cvm: bool = False
    enable_secure_boot: bool = False
    use_public_ip: bool = False
    root_volume_size: int = 0
    tags: tuple[tuple[str, str], ...] = ()
    arm_endpoint: str = DEFAULT_ARM_ENDPOINT
    authority_host: str = DEFAULT_AUTHORITY_HOST
    federated_token_file: str = ""  # AZURE_FEDERATED_TOKEN_FILE: workload identity
    imds_endpoint: str = DEFAULT_IMDS_ENDPOINT
    boot_timeout: float = 600.0  # a confidential VM's create takes minutes
    poll_interval: float = 5.0  # when ARM sends no Retry-After

    @classmethod
    def from_options(cls, options: usage.Options) -> AzureConfig:
        environ: Mapping[str, str] = getattr(options, "environ", {})
        return cls(
            client_id=options["clientid"],
            client_secret=options["secret"],
            tenant_id=options["tenantid"],
            subscription_id=options["subscriptionid"],
            region=options["region"],
            resource_group=options["resourcegroup"],
            instance_size=options["instance-size"],
            instance_sizes=split_list(options["instance-sizes"]),
            zone=options["zone"],
            subnet_id=options["subnetid"],
            security_group_id=options["securitygroupid"],
            image_id=options["imageid"],
            ssh_key_path=options["ssh-key-path"],
            ssh_username=options["ssh-username"],
            disable_cvm=bool(options["disable-cvm"]),
            enable_secure_boot=bool(options["enable-secure-boot"]),
            use_public_ip=bool(options["use-public-ip"]),
            root_volume_size=int(options["root-volume-size"]),
            tags=parse_tags(options["tags"]),
            arm_endpoint=(environ.get("AZURE_RESOURCE_MANAGER_ENDPOINT") or DEFAULT_ARM_ENDPOINT).rstrip("/"),
            authority_host=_with_scheme(environ.get("AZURE_AUTHORITY_HOST") or DEFAULT_AUTHORITY_HOST),
            federated_token_file=environ.get("AZURE_FEDERATED_TOKEN_FILE", ""),
            imds_endpoint=(environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") or DEFAULT_IMDS_ENDPOINT).rstrip("/"),
        )

    def check(self) -> None:
        """The required options (upstream's entrypoint and ConfigVerifier) and our checks; one-line InvalidConfig."""
        for value, flag, env in (
            (self.subscription_id, "subscriptionid", "AZURE_SUBSCRIPTION_ID"),
            (self.region, "region", "AZURE_REGION"),
            (self.resource_group, "resourcegroup", "AZURE_RESOURCE_GROUP"),
            (self.subnet_id, "subnetid", "AZURE_SUBNET_ID"),
            (self.image_id, "imageid", "AZURE_IMAGE_ID"),
        ):
            if not value:
                raise InvalidConfig(f"azure: --{flag} ({env}) is required")
        if not _SUBNET_ID.match(self.subnet_id):
            raise InvalidConfig(f"azure: --subnetid {self.subnet_id!r} is not a subnet's ARM id "
                                "(/subscriptions/.../virtualNetworks/<vnet>/subnets/<subnet>)")
        if self.client_secret and not (self.client_id and self.tenant_id):
            raise InvalidConfig("azure: --secret (AZURE_CLIENT_SECRET) needs --clientid and --tenantid")
        if self.federated_token_file and not self.client_secret and not (self.client_id and self.tenant_id):
            raise InvalidConfig("azure: workload identity (AZURE_FEDERATED_TOKEN_FILE) needs --clientid and "
                                "--tenantid")
        if not self.instance_size:
            raise InvalidConfig("azure: --instance-size must not be empty")
        if self.ssh_username.lower() in RESERVED_ADMIN_NAMES or not 1 <= len(self.ssh_username) <= 64:
            # ARM refuses these as osProfile.adminUsername: every create would fail
            raise InvalidConfig(f"azure: --ssh-username (SSH_USERNAME) {self.ssh_username!r} is not allowed as an "
                                "Azure VM's admin user")

    def secrets(self) -> list[str]:
        """What never reaches a log or an error: upstream's Secret() options (its Redact masks the same three)."""
        return [value for value in (self.client_id, self.client_secret, self.tenant_id) if value]

    def redacted(self) -> dict[str, Any]:
        return masked_fields(self, ("client_id", "client_secret", "tenant_id"))


def _with_scheme(host: str) -> str:
    """An authority host as azure-identity normalises it: https:// when it names no scheme, no trailing slash."""
    host = host.strip().rstrip("/")
    return host if "://" in host else f"https://{host}"


AzureOptions.config_type = AzureConfig
