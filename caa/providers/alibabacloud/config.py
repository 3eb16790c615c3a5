"""Alibaba Cloud provider options (upstream's flags and env vars, spec-adaptor §7.3, spec-providers §8) and the
frozen configuration built from them. Unlike upstream, `--security-group-ids` has no `cn-beijing` default (a bug:
the region was the default security group) and is required, and `--instance-types` (PODVM_INSTANCE_TYPES) is
registered (upstream's Config has the field but no flag)."""

from __future__ import annotations

from typing import Any

from attrs import field, frozen
from twisted.python import usage

from caa.providers.alibabacloud.rrsa import rrsa_settings
from caa.providers.interfaces import InvalidConfig
from caa.providers.options import ProviderOptions, parse_bool, parse_tags, parse_uint, split_list, tags_option
from caa.providers.redact import masked_fields


class AlibabaCloudOptions(ProviderOptions):
    optParameters = [
        ["alibabacloud-access-key-id", None, "", "Access key id."],
        ["alibabacloud-secret-access-key", None, "", "Access key secret."],
        ["alibabacloud-security-token", None, "", "STS security token (temporary keys)."],
        ["region", None, "cn-beijing", "Region."],
        ["imageid", None, "", "Pod VM image id (required)."],
        ["instance-type", None, "ecs.g8i.xlarge", "Instance type when the pod asks for none."],
        ["instance-types", None, "", "Allowed instance types (comma-separated)."],
        ["vswitch-id", None, "", "vSwitch of the pod VMs (required)."],
        ["keyname", None, "", "Key pair name."],
        ["use-public-ip", None, False, "Give the pod VM a public IP and dial it.", parse_bool],
        ["system-disk-size", None, 40, "System disk size in GiB.", parse_uint],
        ["disable-cvm", None, False, "true: no TDX confidential computing mode.", parse_bool],
        ["vpc-id", None, "", "VPC (found from the vSwitch at start)."],
        ["security-group-ids", None, "", "Security group ids, comma-separated (required)."],
        ["tags", None, "", "Extra instance tags, key=value pairs (comma-separated).", tags_option],
    ]
    envVars = {
        "alibabacloud-access-key-id": "ALIBABACLOUD_ACCESS_KEY_ID",
        "alibabacloud-secret-access-key": "ALIBABACLOUD_ACCESS_KEY_SECRET",
        "alibabacloud-security-token": "ALIBABACLOUD_SECURITY_TOKEN",
        "region": "REGION",
        "imageid": "IMAGEID",
        "instance-type": "PODVM_INSTANCE_TYPE",
        "instance-types": "PODVM_INSTANCE_TYPES",
        "vswitch-id": "VSWITCH_ID",
        "keyname": "KEYNAME",
        "use-public-ip": "USE_PUBLIC_IP",
        "system-disk-size": "SYSTEM_DISK_SIZE",
        "disable-cvm": "DISABLECVM",
        "security-group-ids": "SECURITY_GROUP_IDS",
        "tags": "TAGS",
    }
    secretOptions = frozenset({"alibabacloud-access-key-id", "alibabacloud-secret-access-key",
                               "alibabacloud-security-token"})


@frozen
class AlibabaCloudConfig:
    access_key_id: str = field(default="", repr=False)
    access_key_secret: str = field(default="", repr=False)
    security_token: str = field(default="", repr=False)
    region: str = "cn-beijing"
    image_id: str = ""
    instance_type: str = "ecs.g8i.xlarge"
    instance_types: tuple[str, ...] = ()
    vswitch_id: str = ""
    key_name: str = ""
    use_public_ip: bool = False
    system_disk_size: int = 40
    disable_cvm: bool = False
    vpc_id: str = ""
    security_group_ids: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    role_arn: str = ""  # RRSA (rrsa.py), from ALIBABA_CLOUD_ROLE_ARN ...
    oidc_provider_arn: str = ""
    oidc_token_file: str = ""
    role_session_name: str = "cloud-api-adaptor"
    sts_endpoint: str = "https://sts.aliyuncs.com"
    ecs_endpoint: str = ""  # "" = https://ecs.<region>.aliyuncs.com
    vpc_endpoint: str = ""  # "" = https://vpc.<region>.aliyuncs.com
    boot_timeout: float = 120.0  # wall clock, until Running with its IPs
    delete_timeout: float = 30.0  # wall clock, while the instance is in a state that refuses deletion
    nic_timeout: float = 60.0  # wall clock, each wait of the second NIC (ENI attach, EIP bind / unbind)
    poll_interval: float = 1.0

    @classmethod
    def from_options(cls, options: usage.Options) -> AlibabaCloudConfig:
        role_arn, provider_arn, token_file, session = rrsa_settings(getattr(options, "environ", {}))
        return cls(
            role_arn=role_arn, oidc_provider_arn=provider_arn, oidc_token_file=token_file, role_session_name=session,
            access_key_id=options["alibabacloud-access-key-id"],
            access_key_secret=options["alibabacloud-secret-access-key"],
            security_token=options["alibabacloud-security-token"],
            region=options["region"],
            image_id=options["imageid"],
            instance_type=options["instance-type"],
            instance_types=split_list(options["instance-types"]),
            vswitch_id=options["vswitch-id"],
            key_name=options["keyname"],
            use_public_ip=bool(options["use-public-ip"]),
            system_disk_size=int(options["system-disk-size"]),
            disable_cvm=bool(options["disable-cvm"]),
            vpc_id=options["vpc-id"],
            security_group_ids=split_list(options["security-group-ids"]),
            tags=parse_tags(options["tags"]),
        )

    @property
    def ecs(self) -> str:
        return self.ecs_endpoint or f"https://ecs.{self.region}.aliyuncs.com"

    @property
    def vpc(self) -> str:
        return self.vpc_endpoint or f"https://vpc.{self.region}.aliyuncs.com"

    def check(self) -> None:
        for name, value in (("--imageid (IMAGEID)", self.image_id), ("--vswitch-id (VSWITCH_ID)", self.vswitch_id),
                            ("--security-group-ids (SECURITY_GROUP_IDS)", self.security_group_ids),
                            ("--region (REGION)", self.region), ("--instance-type (PODVM_INSTANCE_TYPE)",
                                                                 self.instance_type)):
            if not value:
                raise InvalidConfig(f"alibabacloud: {name} is required")
        if not (self.access_key_id and self.access_key_secret) and not self.rrsa:
            raise InvalidConfig("alibabacloud: credentials are required: --alibabacloud-access-key-id and "
                                "--alibabacloud-secret-access-key (ALIBABACLOUD_ACCESS_KEY_ID, "
                                "ALIBABACLOUD_ACCESS_KEY_SECRET), or RRSA (ALIBABA_CLOUD_ROLE_ARN, "
                                "ALIBABA_CLOUD_OIDC_PROVIDER_ARN, ALIBABA_CLOUD_OIDC_TOKEN_FILE)")
        if self.system_disk_size < 20 or self.system_disk_size > 2048:
            raise InvalidConfig("alibabacloud: --system-disk-size must be 20..2048 GiB")

    @property
    def rrsa(self) -> bool:
        return bool(self.role_arn and self.oidc_provider_arn and self.oidc_token_file)

    def secrets(self) -> list[str]:
        return [s for s in (self.access_key_id, self.access_key_secret, self.security_token) if s]

    def redacted(self) -> dict[str, Any]:
        return masked_fields(self, ("access_key_id", "access_key_secret", "security_token"))


AlibabaCloudOptions.config_type = AlibabaCloudConfig
