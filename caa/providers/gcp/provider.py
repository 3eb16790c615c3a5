"""The GCP provider: one Compute Engine instance per pod VM (spec-providers §5), on Compute REST (`compute.py`)
with tokens from `auth.py`. The instance id is its name (upstream's)."""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from treq.client import HTTPClient
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from caa.once import Once
from caa.providers.base import CoroutineProvider
from caa.providers.gcp.auth import ServiceAccountKey, metadata_token, parse_key, service_account_token
from caa.providers.gcp.compute import ComputeClient, resource_path
from caa.providers.gcp.config import GcpConfig
from caa.providers.gcp.disks import attached_disks, disk_path, disk_problem
from caa.providers.instancetypes import InstanceTypeInfo, select_instance_type
from caa.providers.interfaces import (
    ErrorKind,
    Instance,
    InstanceSpec,
    InvalidConfig,
    IProvider,
    ProviderError,
    TransientError,
)
from caa.providers.redact import Redactor
from caa.providers.rest import RestClient, RetryPolicy, default_http_client, poll
from caa.providers.token import TokenCache
from caa.reactors import INodeReactor

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1035, Compute's instance names
TOKEN_POLICY = RetryPolicy(attempts=3, base=0.2, cap=2.0, attempt_timeout=10.0, call_timeout=30.0)


def image_path(image: str, project: str) -> str:
    """The image as Compute takes it and `images.get` finds it: a bare name (or `global/images/...`) in the
    project as `projects/<p>/global/images/<name>`, `/projects/...` without its slash, URLs as they are."""
    if image.startswith(("https://", "http://", "projects/")):
        return image
    if image.startswith("/projects/"):
        return image[1:]
    if image.startswith("global/"):
        return f"projects/{project}/{image}"
    return f"projects/{project}/global/images/{image}"


def network_path(network: str, project: str) -> str:
    return network if "/" in network else f"projects/{project}/global/networks/{network}"


def subnetwork_path(subnetwork: str, project: str, region: str) -> str:
    return subnetwork if "/" in subnetwork else f"projects/{project}/regions/{region}/subnetworks/{subnetwork}"


def instance_body(
    config: GcpConfig, name: str, machine_type: str, image: str, disk_size: int, user_data: bytes,
    tag_values: dict[str, str], gpus: int,
) -> dict[str, Any]:
    """The Compute `Instance` of one pod VM (spec-providers §5.2); pure, so tested without a cloud."""
    zone = config.zone
    interface: dict[str, Any] = {"network": network_path(config.network, config.project_id), "stackType": "IPV4_ONLY"}
    if config.subnetwork:
        interface["subnetwork"] = subnetwork_path(config.subnetwork, config.project_id, config.region)
    if config.use_public_ip:
        interface["accessConfigs"] = [{"name": "External NAT", "type": "ONE_TO_ONE_NAT", "networkTier": "STANDARD"}]
    body: dict[str, Any] = {
        "name": name,
        "machineType": f"zones/{zone}/machineTypes/{machine_type}",
        "disks": [{
            "boot": True, "autoDelete": True, "type": "PERSISTENT",
            "initializeParams": {"diskSizeGb": str(disk_size), "sourceImage": image,
                                 "diskType": f"zones/{zone}/diskTypes/{config.disk_type}"},
        }],
        "metadata": {"items": [{"key": "user-data", "value": base64.b64encode(user_data).decode()},
                               {"key": "user-data-encoding", "value": "base64"}]},
        "networkInterfaces": [interface],
    }
    if not config.disable_cvm:
        body["confidentialInstanceConfig"] = {"confidentialInstanceType": config.confidential_type,
                                              "enableConfidentialCompute": True}
    if not config.disable_cvm or gpus > 0:  # neither can live-migrate
        body["scheduling"] = {"onHostMaintenance": "TERMINATE"}
    if tag_values:
        body["params"] = {"resourceManagerTags": tag_values}
    return body


@implementer(IProvider)
class GcpProvider(CoroutineProvider):
    _log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        config: GcpConfig,
        http: HTTPClient | None = None,
        policy: RetryPolicy = RetryPolicy(),
        token_policy: RetryPolicy = TOKEN_POLICY,
    ) -> None:
        self._reactor = reactor
        self.config = config
        if http is None:
            http, self.owned_pool = default_http_client(reactor)
        self.redactor = Redactor(config.secrets())
        self._token_rest = RestClient(reactor, http, token_policy, self.redactor)
        self._key: ServiceAccountKey | None = None
        self.tokens = TokenCache(reactor, self._fetch_token, self.redactor)
        self.compute = ComputeClient(reactor, RestClient(reactor, http, policy, self.redactor),
                                     config.compute_endpoint, self.tokens, config.poll_interval)
        self._types = Once(self._load_machine_types)
        self._tag_values: dict[str, str] | None = None
        self._disk_sizes: dict[str, int] = {}

    # -- credentials --------------------------------------------------------------------------------
    async def _fetch_token(self) -> tuple[str, float]:
        if self._key is None:
            text, source = self.config.credentials, "--gcp-credentials (GCP_CREDENTIALS)"
            if not text and self.config.credentials_file:
                source = f"GOOGLE_APPLICATION_CREDENTIALS {self.config.credentials_file}"
                try:
                    text = await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), _read,
                                                   self.config.credentials_file)
                except OSError as e:
                    raise InvalidConfig(f"gcp: reading {source}: {e.strerror}") from None
            if not text:
                return await metadata_token(self._token_rest, self.config.metadata_host)
            self._key, pem = parse_key(text, source)
            self.redactor.add(pem)
            self.redactor.add(text)
        return await service_account_token(self._token_rest, self._key)

    # -- paths --------------------------------------------------------------------------------------
    def _zone(self) -> str:
        return f"projects/{self.config.project_id}/zones/{self.config.zone}"

    def instance_path(self, name: str) -> str:
        return f"{self._zone()}/instances/{name}"

    # -- internals ----------------------------------------------------------------------------------
    async def _verify(self) -> None:
        self.config.check()
        await self._image_disk_size(image_path(self.config.image_name, self.config.project_id))
        await self._machine_types()
        await self._tags()

    async def _machine_types(self) -> list[InstanceTypeInfo]:
        """vCPUs, memory and GPUs of the allowed machine types (and the default), once."""
        return await self._types.get()

    async def _load_machine_types(self) -> list[InstanceTypeInfo]:
        types = []
        for name in sorted({self.config.machine_type, *self.config.machine_types}):
            try:
                found = await self.compute.call("GET", f"{self._zone()}/machineTypes/{name}",
                                                what=f"machine type {name}")
            except ProviderError as e:
                if e.kind is not ErrorKind.NOT_FOUND:
                    raise
                raise InvalidConfig(f"gcp: machine type {name} does not exist in {self.config.zone}") from None
            gpus = sum(int(a.get("guestAcceleratorCount") or 0) for a in found.get("accelerators", []))
            types.append(InstanceTypeInfo(name, int(found.get("guestCpus") or 0), int(found.get("memoryMb") or 0),
                                          gpus))
        return types

    async def _image_disk_size(self, image: str) -> int:
        """The image's disk size in GB (the boot disk is never smaller); InvalidConfig when it does not exist."""
        if image not in self._disk_sizes:
            try:
                found = await self.compute.call("GET", resource_path(image), what=f"image {image}")
            except ProviderError as e:
                if e.retryable:
                    raise
                raise InvalidConfig(f"gcp: image {image}: {e}") from None
            self._disk_sizes[image] = int(found.get("diskSizeGb") or 0)
        return self._disk_sizes[image]

    async def _tags(self) -> dict[str, str]:
        """--tags as Resource Manager `tagKeys/<id>` -> `tagValues/<id>`, resolved once by namespaced name."""
        if self._tag_values is None:
            values: dict[str, str] = {}
            for key, value in self.config.tags:
                query = urlencode({"name": f"{self.config.project_id}/{key}/{value}"})
                try:
                    found = await self.compute.call(
                        "GET", f"{self.config.resource_manager_endpoint}/tagValues/namespaced?{query}",
                        what=f"tag {key}={value}")
                except ProviderError as e:
                    if e.retryable:
                        raise
                    # getNamespaced answers PERMISSION_DENIED for a value that does not exist
                    raise InvalidConfig(f"Aborting: Tag {key}={value} not found ({e})") from None
                values[str(found.get("parent", ""))] = str(found.get("name", ""))
            self._tag_values = values
        return self._tag_values

    async def _create(self, name: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        config = self.config
        if spec.multi_nic:
            raise InvalidConfig("gcp: a second NIC (--ext-network-via-podvm) is not supported yet")
        disks = await self._check_disks(name, spec.volumes) if spec.volumes else []
        types = await self._machine_types()
        machine_type = select_instance_type(spec, types, config.machine_types, config.machine_type)
        # a machine type with GPUs (a2, g2, ...) cannot live-migrate whether or not the pod asked for GPUs
        gpus = max([spec.gpus] + [t.gpus for t in types if t.name == machine_type])
        image = image_path(config.image_name, config.project_id)
        if spec.image:
            image = image_path(spec.image, config.project_id)  # upstream: a bare name is in the project too
            self._log.info("Choosing {image} from annotation as the GCP image for the PodVM image", image=spec.image)
        disk_size = max(config.root_volume_size, await self._image_disk_size(image))
        body = instance_body(config, name, machine_type, image, disk_size, user_data, await self._tags(), gpus)
        body["disks"] += attached_disks(disks)
        try:
            # requestId: a retry of an insert whose answer was lost is not a second insert (409 alreadyExists)
            operation = await self.compute.call("POST", f"{self._zone()}/instances?{_request_id()}", body,
                                                f"insert {name}")
            await self.compute.wait(operation, config.boot_timeout, f"insert {name}")
            self._log.info("created instance {name} ({type})", name=name, type=machine_type)
            for entry in body["disks"][1:]:
                self._log.info("instance {name}: disk {disk} as {device}", name=name, disk=entry["source"],
                               device=entry["deviceName"])
            return await self._wait_running(name)
        except BaseException as e:  # a failure or a cancel: roll back (the contract), then re-raise
            await self._roll_back(name, e)
            if isinstance(e, ProviderError) and e.kind is ErrorKind.NOT_FOUND:
                raise InvalidConfig(e.message) from e  # the image, network or a disk the insert names is missing
            raise

    async def _check_disks(self, name: str, disk_ids: Sequence[str]) -> list[str]:
        """The paths of the CSI disks, each checked before the insert: it exists, is in the zone and READY, and
        no other instance uses it."""
        config = self.config
        paths: list[str] = []
        for disk_id in disk_ids:
            try:
                paths.append(disk_path(disk_id, config.project_id, config.zone))
            except ValueError as e:
                raise InvalidConfig(f"gcp: disk pre-validation failed: {e}") from None
        if len(set(paths)) != len(paths):
            raise InvalidConfig(f"gcp: disk pre-validation failed: a disk is named twice: {paths}")
        problems: list[ProviderError] = []
        for path in paths:
            try:
                disk = await self.compute.call("GET", path, what=f"disk {path}")
            except ProviderError as e:
                if e.retryable:
                    raise
                problems.append(InvalidConfig(f"disk {path} not found" if e.kind is ErrorKind.NOT_FOUND
                                              else f"disk {path}: {e}"))
                continue
            problem = disk_problem(path, disk, config.zone, name)
            if problem is not None:
                problems.append(problem)
        if problems:
            text = "gcp: disk pre-validation failed: " + "; ".join(p.message for p in problems)
            if any(not p.retryable for p in problems):
                raise InvalidConfig(text)
            raise TransientError(text)
        return paths

    async def _wait_running(self, name: str) -> Instance:
        # The internal IP (networkIP) is assigned by the insert: once it is done, a PROVISIONING or STAGING
        # instance is returned at once so the agent proxy dials while it boots. An external IP (natIP) waits
        # for RUNNING.
        early = not self.config.use_public_ip

        async def probe() -> Instance | None:
            found = await self.compute.call("GET", self.instance_path(name), what=f"get {name}")
            status = found.get("status")
            instance = self._instance_of(found)
            if instance.ips and (status == "RUNNING" or (early and status in ("PROVISIONING", "STAGING"))):
                if status != "RUNNING":
                    self._log.info("instance {name} has internal IP {ip} while {status}: not waiting for it to run",
                                   name=name, ip=instance.ips[0], status=status)
                return instance
            if status in ("STOPPING", "STOPPED", "SUSPENDED", "TERMINATED"):
                raise TransientError(f"instance {name} did not start: {status}")
            return None

        return await poll(self._reactor, probe, self.config.poll_interval, self.config.boot_timeout,
                          f"instance {name} not running with an IP")

    def _instance_of(self, found: Any) -> Instance:
        ips: list[str] = []
        for interface in found.get("networkInterfaces", []):
            if self.config.use_public_ip:
                ips += [str(a.get("natIP", "")) for a in interface.get("accessConfigs", [])]
            else:
                ips.append(str(interface.get("networkIP", "")))
        name = str(found.get("name", ""))
        return Instance(name, name, [ip for ip in ips if ip])

    async def _delete(self, instance_id: str) -> None:
        """The instance; its CSI disks (autoDelete false) stay, detached by Compute with it."""
        if not _NAME.match(instance_id):
            self._log.info("delete of {id}: not an instance name, nothing to delete", id=instance_id)
            return
        try:
            operation = await self.compute.call("DELETE", f"{self.instance_path(instance_id)}?{_request_id()}",
                                                what=f"delete {instance_id}")
            await self.compute.wait(operation, self.config.boot_timeout, f"delete {instance_id}")
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                return  # already gone
            raise
        self._log.info("deleted instance {name}", name=instance_id)

    async def _find(self, name: str) -> Instance | None:
        if not _NAME.match(name):
            return None
        try:
            found = await self.compute.call("GET", self.instance_path(name), what=f"get {name}")
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                return None
            raise
        return self._instance_of(found)


def _request_id() -> str:
    """Compute's `requestId` query parameter: one UUID per logical request, the same for its retries."""
    return urlencode({"requestId": str(uuid.uuid4())})


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()
