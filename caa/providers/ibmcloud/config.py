"""IBM Cloud VPC provider options (upstream's flags and env vars, spec-adaptor §7.3, spec-providers §6.1) and the
frozen configuration built from them."""

from __future__ import annotations

from typing import Any

from attrs import field, frozen
from twisted.python import usage

from caa.providers.ibmcloud.iam import DEFAULT_IAM_URL
from caa.providers.interfaces import InvalidConfig
from caa.providers.options import ProviderOptions, parse_bool, split_list
from caa.providers.redact import masked_fields

DEFAULT_CR_TOKEN_FILE = "/var/run/secrets/tokens/vault-token"
DEFAULT_TAGGING_URL = "https://tags.global-search-tagging.cloud.ibm.com"
#: The Kubernetes Service API: the cluster's security group `kube-<cluster id>`.
DEFAULT_CONTAINERS_URL = "https://containers.cloud.ibm.com/global"
#: The VPC API version we speak (query parameter `version`, with `generation=2`).
VPC_API_VERSION = "2025-03-04"


class IbmCloudOptions(ProviderOptions):
    optParameters = [
        ["api-key", None, "", "IBM Cloud API key (or --iam-profile-id)."],
        ["iam-profile-id", None, "", "Trusted profile id (with the projected token of --cr-token-filename)."],
        ["cr-token-filename", None, DEFAULT_CR_TOKEN_FILE, "Projected service-account token for the trusted profile."],
        ["iam-service-url", None, DEFAULT_IAM_URL, "IAM token endpoint."],
        ["vpc-service-url", None, "", "VPC API endpoint, e.g. https://us-south.iaas.cloud.ibm.com/v1 (required)."],
        ["resource-group-id", None, "", "Resource group of the pod VMs."],
        ["profile-name", None, "", "Instance profile when the pod asks for none (required)."],
        ["profile-list", None, "", "Allowed instance profiles (comma-separated)."],
        ["zone-name", None, "", "Zone of the pod VMs (required)."],
        ["primary-subnet-id", None, "", "Subnet of the pod VMs' primary interface (required)."],
        ["vpc-id", None, "", "VPC of the pod VMs (required)."],
        ["key-id", None, "", "SSH key id."],
        ["cluster-id", None, "", "Cluster id: pod VMs are tagged coco-pod-vm:<cluster id>."],
        ["image-id", None, "", "Pod VM image ids, comma-separated, one per architecture (required)."],
        ["security-group-ids", None, "", "Security group ids of the primary interface (comma-separated)."],
        ["secondary-subnet-id", None, "", "Subnet of a second interface (IP spoofing allowed)."],
        ["secondary-security-group-id", None, "", "Security group of the second interface."],
        ["dedicated-host-ids", None, "", "Dedicated host ids (the one in our zone is used), comma-separated."],
        ["dedicated-host-group-ids", None, "", "Dedicated host group ids (the one in our zone), comma-separated."],
        ["disable-cvm", None, True, "true: no TDX confidential mode and no secure boot.", parse_bool],
        ["tags", None, "", "Extra user tags, comma-separated."],
    ]
    envVars = {
        "api-key": "IBMCLOUD_API_KEY",
        "iam-profile-id": "IBMCLOUD_IAM_PROFILE_ID",
        "iam-service-url": "IBMCLOUD_IAM_ENDPOINT",
        "vpc-service-url": "IBMCLOUD_VPC_ENDPOINT",
        "resource-group-id": "IBMCLOUD_RESOURCE_GROUP_ID",
        "profile-name": "IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME",
        "profile-list": "IBMCLOUD_PODVM_INSTANCE_PROFILE_LIST",
        "zone-name": "IBMCLOUD_ZONE",
        "primary-subnet-id": "IBMCLOUD_VPC_SUBNET_ID",
        "vpc-id": "IBMCLOUD_VPC_ID",
        "key-id": "IBMCLOUD_SSH_KEY_ID",
        "cluster-id": "IBMCLOUD_CLUSTER_ID",
        "image-id": "IBMCLOUD_PODVM_IMAGE_ID",
        "security-group-ids": "IBMCLOUD_SECURITY_GROUP_IDS",
        "dedicated-host-ids": "IBMCLOUD_DEDICATED_HOST_IDS",
        "dedicated-host-group-ids": "IBMCLOUD_DEDICATED_HOST_GROUP_IDS",
        "disable-cvm": "DISABLECVM",
        "tags": "TAGS",
    }
    secretOptions = frozenset({"api-key"})


@frozen
class IbmCloudConfig:
    api_key: str = field(default="", repr=False)
    iam_profile_id: str = ""
    cr_token_file: str = DEFAULT_CR_TOKEN_FILE
    iam_url: str = DEFAULT_IAM_URL
    vpc_url: str = ""
    resource_group_id: str = ""
    profile_name: str = ""
    profile_list: tuple[str, ...] = ()
    zone: str = ""
    subnet_id: str = ""
    vpc_id: str = ""
    key_id: str = ""
    cluster_id: str = ""
    image_ids: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    secondary_subnet_id: str = ""
    secondary_security_group_id: str = ""
    dedicated_host_ids: tuple[str, ...] = ()
    dedicated_host_group_ids: tuple[str, ...] = ()
    disable_cvm: bool = True
    tags: tuple[str, ...] = ()
    tagging_url: str = DEFAULT_TAGGING_URL
    containers_url: str = DEFAULT_CONTAINERS_URL
    boot_timeout: float = 120.0  # until the instance runs with its IPs (upstream: 10 tries 2 s apart, then none)
    poll_interval: float = 2.0
    node_name: str = ""  # NODE_NAME: whose labels name the region, zone and subnet

    @classmethod
    def from_options(cls, options: usage.Options) -> IbmCloudConfig:
        environ = getattr(options, "environ", {})
        return cls(
            node_name=environ.get("NODE_NAME", ""),
            api_key=options["api-key"],
            iam_profile_id=options["iam-profile-id"],
            cr_token_file=options["cr-token-filename"],
            iam_url=options["iam-service-url"],
            vpc_url=options["vpc-service-url"].rstrip("/"),
            resource_group_id=options["resource-group-id"],
            profile_name=options["profile-name"],
            profile_list=split_list(options["profile-list"]),
            zone=options["zone-name"],
            subnet_id=options["primary-subnet-id"],
            vpc_id=options["vpc-id"],
            key_id=options["key-id"],
            cluster_id=options["cluster-id"],
            image_ids=split_list(options["image-id"]),
            security_group_ids=split_list(options["security-group-ids"]),
            secondary_subnet_id=options["secondary-subnet-id"],
            secondary_security_group_id=options["secondary-security-group-id"],
            dedicated_host_ids=split_list(options["dedicated-host-ids"]),
            dedicated_host_group_ids=split_list(options["dedicated-host-group-ids"]),
            disable_cvm=bool(options["disable-cvm"]),
            tags=split_list(options["tags"]),
        )

    def check(self) -> None:
        """What must be given whatever the cluster says (upstream's ConfigVerifier: an image; credentials)."""
        required = [("--api-key (IBMCLOUD_API_KEY) or --iam-profile-id (IBMCLOUD_IAM_PROFILE_ID)",
                     self.api_key or self.iam_profile_id),
                    ("--image-id (IBMCLOUD_PODVM_IMAGE_ID)", self.image_ids),
                    ("--profile-name (IBMCLOUD_PODVM_INSTANCE_PROFILE_NAME)", self.profile_name)]
        missing = [name for name, value in required if not value]
        if missing:
            raise InvalidConfig(f"ibmcloud: {missing[0]} is required")
        if bool(self.secondary_subnet_id) != bool(self.secondary_security_group_id):
            raise InvalidConfig("ibmcloud: --secondary-subnet-id and --secondary-security-group-id go together")

    def check_discovered(self) -> None:
        """After the start-up discovery (discovery.py): what neither the options nor the cluster gave."""
        if not self.zone:
            raise InvalidConfig("ibmcloud: zone was not provided and could not detect automatically "
                                "(--zone-name, IBMCLOUD_ZONE)")
        for name, value in (("--vpc-service-url (IBMCLOUD_VPC_ENDPOINT)", self.vpc_url),
                            ("--primary-subnet-id (IBMCLOUD_VPC_SUBNET_ID)", self.subnet_id),
                            ("--vpc-id (IBMCLOUD_VPC_ID)", self.vpc_id)):
            if not value:
                raise InvalidConfig(f"ibmcloud: {name} was not provided and could not be detected from the cluster")

    def secrets(self) -> list[str]:
        return [self.api_key] if self.api_key else []

    def redacted(self) -> dict[str, Any]:
        return masked_fields(self, ("api_key",))


IbmCloudOptions.config_type = IbmCloudConfig
