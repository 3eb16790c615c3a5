"""GCP provider options (upstream's flags and env vars, spec-adaptor §7.3, spec-providers §5.1) and the frozen
configuration built from them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import field, frozen
from twisted.python import usage

from caa.providers.interfaces import InvalidConfig
from caa.providers.options import ProviderOptions, parse_bool, parse_tags, parse_uint, split_list, tags_option
from caa.providers.redact import masked_fields

#: Compute Engine v1 and Resource Manager v3 in Google's cloud; CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE and
#: CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER (gcloud's variables) replace them (Private Service Connect,
#: the tests' fake).
DEFAULT_COMPUTE_ENDPOINT = "https://compute.googleapis.com/compute/v1"
DEFAULT_RESOURCE_MANAGER_ENDPOINT = "https://cloudresourcemanager.googleapis.com/v3"
#: The GCE metadata server (application-default credentials on GCE/GKE); GCE_METADATA_HOST (or its old name
#: GCE_METADATA_ROOT, as google-auth reads them) moves it.
DEFAULT_METADATA_HOST = "metadata.google.internal"
CONFIDENTIAL_TYPES = ("SEV", "SEV_SNP", "TDX")


class GcpOptions(ProviderOptions):
    optParameters = [
        ["gcp-credentials", None, "", "Service account key (JSON text); empty: application-default credentials."],
        ["gcp-project-id", None, "", "Project of the pod VMs (required)."],
        ["zone", None, "", "Zone of the pod VMs, e.g. us-central1-a (required)."],
        ["image-name", None, "", "Pod VM image: a name in the project, projects/<p>/global/images/<i> or a URL."],
        ["machine-type", None, "e2-medium", "Machine type when the pod asks for none."],
        ["machine-types", None, "", "Allowed machine types (comma-separated)."],
        ["network", None, "", "VPC network of the pod VMs (required)."],
        ["subnetwork", None, "", "Subnetwork (a short name is taken from the zone's region)."],
        ["disk-type", None, "pd-standard", "Boot disk type."],
        ["disable-cvm", None, False, "true: no confidential computing.", parse_bool],
        ["confidential-type", None, "", "SEV, SEV_SNP or TDX (required unless --disable-cvm)."],
        ["root-volume-size", None, 10, "Boot disk size in GB (at least the image's).", parse_uint],
        ["use-public-ip", None, False, "Give each pod VM an external IP and dial it.", parse_bool],
        ["tags", None, "", "Resource Manager tags, key=value short names of the project's tags (comma-separated).",
         tags_option],
    ]
    envVars = {
        "gcp-credentials": "GCP_CREDENTIALS",
        "gcp-project-id": "GCP_PROJECT_ID",
        "zone": "GCP_ZONE",
        "image-name": "PODVM_IMAGE_NAME",
        "machine-type": "GCP_MACHINE_TYPE",
        "machine-types": "GCP_INSTANCE_TYPES",
        "network": "GCP_NETWORK",
        "subnetwork": "GCP_SUBNETWORK",
        "disk-type": "GCP_DISK_TYPE",
        "disable-cvm": "DISABLECVM",
        "confidential-type": "GCP_CONFIDENTIAL_TYPE",
        "root-volume-size": "ROOT_VOLUME_SIZE",
        "use-public-ip": "USE_PUBLIC_IP",
        "tags": "TAGS",
    }
    secretOptions = frozenset({"gcp-credentials"})


@frozen
class GcpConfig:
    credentials: str = field(default="", repr=False)
    project_id: str = ""
    zone: str = ""
    image_name: str = ""
    machine_type: str = "e2-medium"
    machine_types: tuple[str, ...] = ()
    network: str = ""
    subnetwork: str = ""
    disk_type: str = "pd-standard"
    disable_cvm: bool = False
    confidential_type: str = ""
    root_volume_size: int = 10
    use_public_ip: bool = False
    tags: tuple[tuple[str, str], ...] = ()
    compute_endpoint: str = DEFAULT_COMPUTE_ENDPOINT
    resource_manager_endpoint: str = DEFAULT_RESOURCE_MANAGER_ENDPOINT
    credentials_file: str = ""  # GOOGLE_APPLICATION_CREDENTIALS, when --gcp-credentials is empty
    metadata_host: str = DEFAULT_METADATA_HOST
    boot_timeout: float = 300.0
    poll_interval: float = 2.0

    @classmethod
    def from_options(cls, options: usage.Options) -> GcpConfig:
        environ: Mapping[str, str] = getattr(options, "environ", {})
        return cls(
            credentials=options["gcp-credentials"],
            project_id=options["gcp-project-id"],
            zone=options["zone"],
            image_name=options["image-name"],
            machine_type=options["machine-type"],
            machine_types=split_list(options["machine-types"]),
            network=options["network"],
            subnetwork=options["subnetwork"],
            disk_type=options["disk-type"],
            disable_cvm=bool(options["disable-cvm"]),
            confidential_type=options["confidential-type"],
            root_volume_size=int(options["root-volume-size"]),
            use_public_ip=bool(options["use-public-ip"]),
            tags=parse_tags(options["tags"]),
            compute_endpoint=(environ.get("CLOUDSDK_API_ENDPOINT_OVERRIDES_COMPUTE")
                              or DEFAULT_COMPUTE_ENDPOINT).rstrip("/"),
            resource_manager_endpoint=(environ.get("CLOUDSDK_API_ENDPOINT_OVERRIDES_CLOUDRESOURCEMANAGER")
                                       or DEFAULT_RESOURCE_MANAGER_ENDPOINT).rstrip("/"),
            credentials_file=environ.get("GOOGLE_APPLICATION_CREDENTIALS", ""),
            metadata_host=(environ.get("GCE_METADATA_HOST") or environ.get("GCE_METADATA_ROOT")
                           or DEFAULT_METADATA_HOST),
        )

    def check(self) -> None:
        """The required options (upstream's) and our checks; one-line InvalidConfig naming the option."""
        for value, flag, env in (
            (self.project_id, "gcp-project-id", "GCP_PROJECT_ID"),
            (self.zone, "zone", "GCP_ZONE"),
            (self.network, "network", "GCP_NETWORK"),
            (self.image_name, "image-name", "PODVM_IMAGE_NAME"),
        ):
            if not value:
                raise InvalidConfig(f"gcp: --{flag} ({env}) is required")
        if not self.disable_cvm and self.confidential_type not in CONFIDENTIAL_TYPES:
            # upstream fails every create with "ConfidentialType must be set when using Confidential VM."
            raise InvalidConfig("gcp: --confidential-type (GCP_CONFIDENTIAL_TYPE) must be one of "
                                f"{', '.join(CONFIDENTIAL_TYPES)} unless --disable-cvm, not "
                                f"{self.confidential_type!r}")
        if self.zone.count("-") < 2:
            raise InvalidConfig(f"gcp: --zone {self.zone!r} is not a zone (e.g. us-central1-a)")
        if not self.machine_type:
            raise InvalidConfig("gcp: --machine-type must not be empty")

    @property
    def region(self) -> str:
        return self.zone.rsplit("-", 1)[0]

    def secrets(self) -> list[str]:
        return [self.credentials] if self.credentials else []

    def redacted(self) -> dict[str, Any]:
        return masked_fields(self, ("credentials",))


GcpOptions.config_type = GcpConfig
