"""IBM Cloud Power Virtual Server provider options (upstream's flags and env vars, spec-adaptor §7.3,
spec-providers §7) and the frozen configuration built from them."""

from __future__ import annotations

import math
import re
from typing import Any

from attrs import field, frozen
from twisted.python import usage

from caa.providers.ibmcloud.iam import DEFAULT_IAM_URL
from caa.providers.interfaces import InstanceSpec, InvalidConfig
from caa.providers.options import ProviderOptions, parse_bool, parse_duration
from caa.providers.redact import masked_fields

#: `<systype>-<cpus>x<memGB>`, e.g. s922-2x8 or e980-0.5x4 (the pod's machine_type annotation).
MACHINE_TYPE = re.compile(r"^([a-z0-9]+)-(\d+(?:\.\d+)?)x(\d+(?:\.\d+)?)$")


def parse_positive_float(value: str) -> float:
    number = float(value.strip())
    if not number > 0 or math.isinf(number):
        raise ValueError(f"{value!r} is not a positive number")
    return number


parse_positive_float.coerceDoc = "A positive number."  # type: ignore[attr-defined]


class PowerVSOptions(ProviderOptions):
    optParameters = [
        ["api-key", None, "", "IBM Cloud API key (required)."],
        ["zone", None, "", "PowerVS zone, e.g. dal12 (required)."],
        ["service-instance-id", None, "", "PowerVS workspace (service instance) id (required)."],
        ["network-id", None, "", "Network of the pod VMs (required)."],
        ["image-id", None, "", "Pod VM image id (required)."],
        ["ssh-key", None, "", "SSH key name."],
        ["proc-type", None, "shared", "Processor type: dedicated, shared or capped."],
        ["sys-type", None, "s922", "System type."],
        ["memory", None, 2.0, "Memory in GB.", parse_positive_float],
        ["cpu", None, 0.5, "Processors.", parse_positive_float],
        ["use-public-ip", None, False, "Dial the pod VM's external IP.", parse_bool],
        ["build-timeout", None, 150.0, "How long a VM may build before the create fails.", parse_duration],
    ]
    envVars = {
        "api-key": "IBMCLOUD_API_KEY",
        "zone": "POWERVS_ZONE",
        "service-instance-id": "POWERVS_SERVICE_INSTANCE_ID",
        "network-id": "POWERVS_NETWORK_ID",
        "image-id": "POWERVS_IMAGE_ID",
        "ssh-key": "POWERVS_SSH_KEY_NAME",
        "proc-type": "POWERVS_PROCESSOR_TYPE",
        "sys-type": "POWERVS_SYSTEM_TYPE",
        "memory": "POWERVS_MEMORY",
        "cpu": "POWERVS_PROCESSORS",
        "use-public-ip": "USE_PUBLIC_IP",
        "build-timeout": "POWERVS_BUILD_TIMEOUT",
    }
    secretOptions = frozenset({"api-key"})


def region_of(zone: str) -> str:
    """The PowerVS API region of a zone: `dal12` -> `dal`, `eu-de-1` -> `eu-de`, `us-south` -> `us-south`."""
    return re.sub(r"-?\d+$", "", zone)


@frozen
class Sizing:
    processors: float
    memory_gb: float
    sys_type: str


@frozen
class PowerVSConfig:
    api_key: str = field(default="", repr=False)
    zone: str = ""
    service_instance_id: str = ""
    network_id: str = ""
    image_id: str = ""
    ssh_key: str = ""
    proc_type: str = "shared"
    sys_type: str = "s922"
    memory_gb: float = 2.0
    processors: float = 0.5
    use_public_ip: bool = False
    build_timeout: float = 150.0
    iam_url: str = DEFAULT_IAM_URL
    iam_identity_url: str = "https://iam.cloud.ibm.com"  # IAM Identity: the API key's account
    endpoint: str = ""  # "" = https://<region of zone>.power-iaas.cloud.ibm.com
    poll_interval: float = 5.0  # upstream: at most 5 s between tries
    dhcp_timeout: float = 750.0  # waiting for the VM's DHCP lease (networks without fixed IPs)

    @classmethod
    def from_options(cls, options: usage.Options) -> PowerVSConfig:
        return cls(api_key=options["api-key"], zone=options["zone"], service_instance_id=options["service-instance-id"],
                   network_id=options["network-id"], image_id=options["image-id"], ssh_key=options["ssh-key"],
                   proc_type=options["proc-type"], sys_type=options["sys-type"], memory_gb=float(options["memory"]),
                   processors=float(options["cpu"]), use_public_ip=bool(options["use-public-ip"]),
                   build_timeout=float(options["build-timeout"]))

    @property
    def api(self) -> str:
        return (self.endpoint or f"https://{region_of(self.zone)}.power-iaas.cloud.ibm.com").rstrip("/")

    def check(self) -> None:
        for name, value in (("--api-key (IBMCLOUD_API_KEY)", self.api_key), ("--zone (POWERVS_ZONE)", self.zone),
                            ("--service-instance-id (POWERVS_SERVICE_INSTANCE_ID)", self.service_instance_id),
                            ("--network-id (POWERVS_NETWORK_ID)", self.network_id),
                            ("--image-id (POWERVS_IMAGE_ID)", self.image_id)):
            if not value:
                raise InvalidConfig(f"ibmcloud-powervs: {name} is required")
        if self.proc_type not in ("dedicated", "shared", "capped"):
            raise InvalidConfig("ibmcloud-powervs: --proc-type (POWERVS_PROCESSOR_TYPE) must be dedicated, shared "
                                "or capped")
        if self.build_timeout <= 0:
            raise InvalidConfig("ibmcloud-powervs: --build-timeout (POWERVS_BUILD_TIMEOUT) must be positive")

    def sizing(self, spec: InstanceSpec) -> Sizing:
        """vCPUs and memory from the pod when it gives both (memory rounded up to whole GB: upstream divides
        and floors); else its `<systype>-<cpus>x<memGB>` machine type, validated (upstream panics on a
        malformed one); else the configured defaults."""
        if spec.vcpus and spec.memory_mib:
            return Sizing(float(spec.vcpus), float(math.ceil(spec.memory_mib / 1024)), self.sys_type)
        if spec.instance_type:
            match = MACHINE_TYPE.match(spec.instance_type)
            if match is None:
                raise InvalidConfig(f"ibmcloud-powervs: machine type {spec.instance_type!r} is not "
                                    "<systype>-<cpus>x<memGB> (e.g. s922-2x8)")
            cpus, memory = float(match.group(2)), float(match.group(3))
            if cpus <= 0 or memory <= 0:
                raise InvalidConfig(f"ibmcloud-powervs: machine type {spec.instance_type!r} asks for no CPU or memory")
            return Sizing(cpus, memory, match.group(1))
        return Sizing(self.processors, self.memory_gb, self.sys_type)

    def secrets(self) -> list[str]:
        return [self.api_key] if self.api_key else []

    def redacted(self) -> dict[str, Any]:
        return masked_fields(self, ("api_key",))


PowerVSOptions.config_type = PowerVSConfig
