"""AWS provider options (upstream's flags and env vars, spec-adaptor §7.3, spec-providers §3.1) and the frozen
configuration built from them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import field, frozen
from twisted.python import usage

from caa.providers.interfaces import InvalidConfig
from caa.providers.options import ProviderOptions, parse_bool, parse_tags, parse_uint, split_list, tags_option
from caa.providers.redact import masked_fields

#: Where EC2 is reached when no endpoint is configured; AWS_ENDPOINT_URL_EC2 / AWS_ENDPOINT_URL (the SDKs'
#: standard variables) replace it (tests: moto's server).
DEFAULT_ENDPOINT = "https://ec2.{region}.amazonaws.com"
MAX_ROOT_VOLUME_GIB = 2**31 - 1


class AwsOptions(ProviderOptions):
    optParameters = [
        ["aws-access-key-id", None, "", "Access key id (with --aws-secret-key: static credentials)."],
        ["aws-secret-key", None, "", "Secret access key."],
        ["aws-session-token", None, "", "Session token of temporary credentials."],
        ["aws-region", None, "", "Region (else the profile's or AWS_DEFAULT_REGION)."],
        ["aws-profile", None, "", "Shared config/credentials profile."],
        ["instance-type", None, "m6a.large", "Instance type when the pod asks for none."],
        ["instance-types", None, "", "Allowed instance types (comma-separated)."],
        ["aws-lt-name", None, "kata", "Launch template name (with --use-lt)."],
        ["use-lt", None, False, "Create from the launch template (type, AMI, network come from it).", parse_bool],
        ["imageid", None, "", "Pod VM AMI id (required unless --use-lt)."],
        ["keyname", None, "", "EC2 key pair name."],
        ["subnetid", None, "", "Subnet of the pod VMs."],
        ["securitygroupids", None, "", "Security group ids (comma-separated)."],
        ["use-public-ip", None, False, "Dial the pod VM's public IP (one is associated at launch).", parse_bool],
        ["root-volume-size", None, 30, "Root volume size in GiB (0 = the AMI's size).", parse_uint],
        ["disable-cvm", None, False, "true: no AMD SEV-SNP CPU options.", parse_bool],
        ["tags", None, "", "Extra instance tags, key=value pairs (comma-separated).", tags_option],
    ]
    envVars = {
        "aws-access-key-id": "AWS_ACCESS_KEY_ID",
        "aws-secret-key": "AWS_SECRET_ACCESS_KEY",
        "aws-session-token": "AWS_SESSION_TOKEN",
        "aws-region": "AWS_REGION",
        "instance-type": "PODVM_INSTANCE_TYPE",
        "instance-types": "PODVM_INSTANCE_TYPES",
        "aws-lt-name": "PODVM_LAUNCHTEMPLATE_NAME",
        "use-lt": "USE_PODVM_LAUNCHTEMPLATE",
        "imageid": "PODVM_AMI_ID",
        "keyname": "SSH_KP_NAME",
        "subnetid": "AWS_SUBNET_ID",
        "securitygroupids": "AWS_SG_IDS",
        "use-public-ip": "USE_PUBLIC_IP",
        "root-volume-size": "ROOT_VOLUME_SIZE",
        "disable-cvm": "DISABLECVM",
        "tags": "TAGS",
    }
    secretOptions = frozenset({"aws-access-key-id", "aws-secret-key", "aws-session-token"})


def _endpoint(environ: Mapping[str, str]) -> str:
    return environ.get("AWS_ENDPOINT_URL_EC2") or environ.get("AWS_ENDPOINT_URL") or ""


def _imds(environ: Mapping[str, str]) -> str:
    if environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return ""
    return environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "http://169.254.169.254"


@frozen
class AwsConfig:
    access_key_id: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    region: str = ""
    profile: str = ""
    instance_type: str = "m6a.large"
    instance_types: tuple[str, ...] = ()
    lt_name: str = "kata"
    use_lt: bool = False
    image_id: str = ""
    key_name: str = ""
    subnet_id: str = ""
    security_group_ids: tuple[str, ...] = ()
    use_public_ip: bool = False
    root_volume_size: int = 30
    disable_cvm: bool = False
    tags: tuple[tuple[str, str], ...] = ()
    endpoint: str = ""  # "" = DEFAULT_ENDPOINT of the region
    imds_endpoint: str = ""  # the instance metadata service for the fill-in ("" = off; imds.py)
    boot_timeout: float = 120.0  # until the instance runs (upstream's InstanceRunning waiter)
    poll_interval: float = 2.0
    volume_poll_interval: float = 3.0  # DescribeVolumes while CSI volumes attach (upstream: 3 s, up to 60 s)
    volume_attach_timeout: float = 60.0

    @classmethod
    def from_options(cls, options: usage.Options) -> AwsConfig:
        environ: Mapping[str, str] = getattr(options, "environ", {})
        return cls(
            access_key_id=options["aws-access-key-id"],
            secret_key=options["aws-secret-key"],
            session_token=options["aws-session-token"],
            region=options["aws-region"],
            profile=options["aws-profile"],
            instance_type=options["instance-type"],
            instance_types=split_list(options["instance-types"]),
            lt_name=options["aws-lt-name"],
            use_lt=bool(options["use-lt"]),
            image_id=options["imageid"],
            key_name=options["keyname"],
            subnet_id=options["subnetid"],
            security_group_ids=split_list(options["securitygroupids"]),
            use_public_ip=bool(options["use-public-ip"]),
            root_volume_size=int(options["root-volume-size"]),
            disable_cvm=bool(options["disable-cvm"]),
            tags=parse_tags(options["tags"]),
            endpoint=_endpoint(environ),
            imds_endpoint=_imds(environ),
        )

    def check(self) -> None:
        """upstream's ConfigVerifier (the AMI) plus our checks; raises InvalidConfig with one line."""
        if not self.image_id and not self.use_lt:
            raise InvalidConfig("aws: --imageid (PODVM_AMI_ID) is required")
        if self.use_lt and not self.lt_name:
            raise InvalidConfig("aws: --aws-lt-name must not be empty with --use-lt")
        if bool(self.access_key_id) != bool(self.secret_key):
            raise InvalidConfig("aws: --aws-access-key-id and --aws-secret-key go together")
        if not self.instance_type:
            raise InvalidConfig("aws: --instance-type must not be empty")
        if self.root_volume_size > MAX_ROOT_VOLUME_GIB:
            raise InvalidConfig(f"aws: --root-volume-size is at most {MAX_ROOT_VOLUME_GIB}")

    def secrets(self) -> list[str]:
        return [s for s in (self.access_key_id, self.secret_key, self.session_token) if s]

    def redacted(self) -> dict[str, Any]:
        return masked_fields(self, ("access_key_id", "secret_key", "session_token"))


AwsOptions.config_type = AwsConfig
