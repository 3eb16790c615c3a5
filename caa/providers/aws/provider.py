"""The AWS provider: one EC2 instance per pod VM (spec-providers §3), on the EC2 Query API (`ec2.py`)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Sequence
from xml.etree import ElementTree

from treq.client import HTTPClient
from twisted.logger import Logger
from zope.interface import implementer

from caa.once import Once
from caa.providers.aws.config import AwsConfig
from caa.providers.aws.ec2 import Ec2Client, query_params, resolve_target
from caa.providers.aws.imds import fill_from_metadata
from caa.providers.aws.volumes import (
    VOLUME_ID,
    VolumeState,
    device_name,
    is_data_device,
    parse_volumes,
    prevalidation_problems,
)
from caa.providers.base import CoroutineProvider
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
from caa.reactors import INodeReactor

LIVE_STATES = ("pending", "running", "stopping", "stopped")
# The metadata service answers at once on EC2; elsewhere do not hold the start-up for long.
IMDS_POLICY = RetryPolicy(attempts=2, base=0.1, cap=0.5, attempt_timeout=2.0, call_timeout=5.0)


def run_instances_params(
    config: AwsConfig,
    name: str,
    user_data: bytes,
    instance_type: str,
    image_id: str,
    root_device: str,
    root_size: int,
    client_token: str,
) -> dict[str, str]:
    """The RunInstances form of one pod VM (spec-providers §3.3); pure, so tested without a cloud."""
    params = {
        "MinCount": "1",
        "MaxCount": "1",
        "UserData": base64.b64encode(user_data).decode(),
        "ClientToken": client_token,
        "TagSpecification.1.ResourceType": "instance",
    }
    for i, (key, value) in enumerate((("Name", name), *config.tags), 1):
        params[f"TagSpecification.1.Tag.{i}.Key"] = key
        params[f"TagSpecification.1.Tag.{i}.Value"] = value
    if root_device and root_size > 0:
        params["BlockDeviceMapping.1.DeviceName"] = root_device
        params["BlockDeviceMapping.1.Ebs.VolumeSize"] = str(root_size)
    if config.use_lt:  # the template carries type, AMI, network, key and CPU options
        params["LaunchTemplate.LaunchTemplateName"] = config.lt_name
        return params
    params["ImageId"] = image_id
    params["InstanceType"] = instance_type
    if config.key_name:
        params["KeyName"] = config.key_name
    if config.use_public_ip:
        params.update({
            "NetworkInterface.1.DeviceIndex": "0",
            "NetworkInterface.1.AssociatePublicIpAddress": "true",
            "NetworkInterface.1.DeleteOnTermination": "true",
        })
        if config.subnet_id:
            params["NetworkInterface.1.SubnetId"] = config.subnet_id
        params.update(query_params("NetworkInterface.1.SecurityGroupId", config.security_group_ids))
    else:
        if config.subnet_id:
            params["SubnetId"] = config.subnet_id
        params.update(query_params("SecurityGroupId", config.security_group_ids))
    if not config.disable_cvm:
        params["CpuOptions.AmdSevSnp"] = "enabled"
    return params


def _instance_of(item: ElementTree.Element, public: bool) -> tuple[Instance, str]:
    """(Instance, state) of a DescribeInstances / RunInstances `item`."""
    tags = {tag.findtext("key", ""): tag.findtext("value", "") for tag in item.findall("tagSet/item")}
    private = item.findtext("privateIpAddress", "")
    public_ip = item.findtext("ipAddress", "")
    ips = [ip for ip in ((public_ip if public else private),) if ip and ip != "0.0.0.0"]
    return Instance(item.findtext("instanceId", ""), tags.get("Name", ""), ips), item.findtext(
        "instanceState/name", "")


def type_info(item: ElementTree.Element) -> InstanceTypeInfo:
    gpus = sum(int(gpu.findtext("count", "0") or 0) for gpu in item.findall("gpuInfo/gpus/item"))
    return InstanceTypeInfo(
        name=item.findtext("instanceType", ""),
        vcpus=int(item.findtext("vCpuInfo/defaultVCpus", "0") or 0),
        memory_mib=int(item.findtext("memoryInfo/sizeInMiB", "0") or 0),
        gpus=gpus,
        arch=item.findtext("processorInfo/supportedArchitectures/item", ""),
    )


@implementer(IProvider)
class AwsProvider(CoroutineProvider):
    _log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        config: AwsConfig,
        http: HTTPClient | None = None,
        policy: RetryPolicy = RetryPolicy(),
    ) -> None:
        self._reactor = reactor
        self.config = config
        if http is None:
            http, self.owned_pool = default_http_client(reactor)
        self.redactor = Redactor(config.secrets())
        static = (config.access_key_id, config.secret_key, config.session_token) if config.access_key_id else None
        self._imds = RestClient(reactor, http, IMDS_POLICY, self.redactor)
        self.ec2 = Ec2Client(
            reactor, RestClient(reactor, http, policy, self.redactor),
            lambda: resolve_target(self.config.region, self.config.profile, self.config.endpoint, static),
            prepare=self._fill_in)
        self._types = Once(self._describe_instance_types)
        self._root_devices: dict[str, tuple[str, int]] = {}

    # -- internals ----------------------------------------------------------------------------------
    async def _fill_in(self) -> None:
        """Before the first EC2 call: what was not configured, from the node's IMDS (imds.py)."""
        self.config = await fill_from_metadata(self.config, self._imds)

    async def _verify(self) -> None:
        self.config.check()
        if self.config.image_id:
            await self.root_volume(self.config.image_id)
        await self._instance_types()

    async def _instance_types(self) -> list[InstanceTypeInfo]:
        """vCPUs, memory and GPUs of the allowed types (and the default), from DescribeInstanceTypes, once."""
        return await self._types.get()

    async def _describe_instance_types(self) -> list[InstanceTypeInfo]:
        names = sorted({self.config.instance_type, *self.config.instance_types})
        root = await self.ec2.call("DescribeInstanceTypes", query_params("InstanceType", names))
        return [type_info(item) for item in root.findall("instanceTypeSet/item")]

    async def root_volume(self, image_id: str) -> tuple[str, int]:
        """The AMI's root device name and the root volume size to ask for: --root-volume-size, raised to the
        AMI's snapshot size when smaller (("", 0) when the size is left to the AMI); InvalidConfig when the AMI
        cannot be described."""
        if self.config.root_volume_size <= 0:
            return "", 0
        if image_id not in self._root_devices:
            try:
                root = await self.ec2.call("DescribeImages", query_params("ImageId", [image_id]))
            except ProviderError as e:
                if e.retryable:
                    raise
                raise InvalidConfig(f"unable to get image details: {e}") from None
            image = root.find("imagesSet/item")
            device = image.findtext("rootDeviceName", "") if image is not None else ""
            if image is None or not device:
                raise InvalidConfig(f"unable to get image details: AMI {image_id} not found or has no root device")
            sizes = [int(m.findtext("ebs/volumeSize", "0") or 0) for m in image.findall("blockDeviceMapping/item")
                     if m.findtext("deviceName") == device]
            self._root_devices[image_id] = (device, max([self.config.root_volume_size, *sizes]))
        return self._root_devices[image_id]

    async def _create(self, name: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        await self.ec2.target()  # the first call fills the configuration in from IMDS
        config = self.config
        if spec.multi_nic:
            raise InvalidConfig("aws: a second NIC (--ext-network-via-podvm) is not supported yet")
        volumes = tuple(spec.volumes)
        if volumes:
            await self._prevalidate(volumes)
        image_id = config.image_id
        instance_type = config.instance_type
        if not config.use_lt:
            instance_type = select_instance_type(
                spec, await self._instance_types(), config.instance_types, config.instance_type)
            if spec.image:
                image_id = spec.image
                self._log.info("Choosing {image} from annotation as the AWS AMI for the PodVM image", image=image_id)
        root_device, root_size = await self.root_volume(image_id) if image_id else ("", 0)
        params = run_instances_params(config, name, user_data, instance_type, image_id, root_device, root_size,
                                      f"{name}-{uuid.uuid4().hex}"[:64])
        root = await self.ec2.call("RunInstances", params)
        item = root.find("instancesSet/item")
        instance_id = "" if item is None else item.findtext("instanceId", "")
        if item is None or not instance_id:
            raise TransientError("RunInstances: the answer names no instance")
        self._log.info("created instance {id} ({name}, {type})", id=instance_id, name=name, type=instance_type)
        # A pending instance already has its private IP (RunInstances answers with it): return at once and let
        # the agent proxy dial while it boots. Wait for "running" only when something needs it: EBS attachment
        # (AttachVolume wants a running instance) or the public IP (assigned later).
        if not volumes and not config.use_public_ip:
            early, _ = _instance_of(item, public=False)
            if early.ips:
                self._log.info("instance {id} has private IP {ip} while pending: not waiting for it to run",
                               id=instance_id, ip=early.ips[0])
                return Instance(instance_id, name, early.ips)
        try:
            instance = await self._wait_running(instance_id, name)
            if volumes:
                await self._attach(instance_id, volumes)
            return instance
        except BaseException as e:  # a failure or a cancel: roll back (the contract), then re-raise
            await self._roll_back(instance_id, e)
            raise

    async def _wait_running(self, instance_id: str, name: str) -> Instance:
        async def probe() -> Instance | None:
            root = await self.ec2.call("DescribeInstances", query_params("InstanceId", [instance_id]))
            item = root.find("reservationSet/item/instancesSet/item")
            if item is None:
                return None  # not listed yet (EC2 is eventually consistent)
            instance, state = _instance_of(item, self.config.use_public_ip)
            if state == "running" and instance.ips:
                return Instance(instance_id, name, instance.ips)
            if state in ("shutting-down", "terminated", "stopping", "stopped"):
                reason = item.findtext("stateReason/message", "") or state
                raise ProviderError(ErrorKind.QUOTA if "capacity" in reason.lower() else ErrorKind.TRANSIENT,
                                    f"instance {instance_id} did not start: {reason}")
            return None

        return await poll(self._reactor, probe, self.config.poll_interval, self.config.boot_timeout,
                          f"instance {instance_id} not running with an IP")

    # -- CSI volumes (EBS) ----------------------------------------------------------------------------
    async def _volumes(self, volume_ids: Sequence[str]) -> dict[str, VolumeState]:
        return parse_volumes(await self.ec2.call("DescribeVolumes", query_params("VolumeId", volume_ids)))

    async def _prevalidate(self, volume_ids: Sequence[str]) -> None:
        """Upstream's check before RunInstances: well-formed ids, every volume available."""
        bad = [v for v in volume_ids if not VOLUME_ID.fullmatch(v)]
        if bad:
            raise InvalidConfig(f"EBS volume pre-validation failed: invalid volume ids {bad} (want vol-<hex>)")
        try:
            found = await self._volumes(volume_ids)
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                raise InvalidConfig(f"EBS volume pre-validation failed: {e}") from None
            raise
        problems = prevalidation_problems(volume_ids, found)
        if problems:
            # in use or still creating: may be fine on a later try (a detach of the pod's previous VM)
            raise TransientError("EBS volume pre-validation failed: " + "; ".join(problems))

    async def _attach(self, instance_id: str, volume_ids: Sequence[str]) -> None:
        """Attach each volume at its device (the order fixes the name), skip one attached already, then wait
        until EC2 reports all of them attached."""
        found = await self._volumes(volume_ids)
        for index, volume_id in enumerate(volume_ids):
            state = found.get(volume_id)
            if state is not None and state.attachment_to(instance_id) is not None:
                continue
            await self.ec2.call("AttachVolume", {"VolumeId": volume_id, "InstanceId": instance_id,
                                                 "Device": device_name(index)})
            self._log.info("attaching volume {volume} to {id} as {device}", volume=volume_id, id=instance_id,
                           device=device_name(index))

        async def attached() -> bool | None:
            states = await self._volumes(volume_ids)
            for volume_id in volume_ids:
                attachment = states[volume_id].attachment_to(instance_id) if volume_id in states else None
                if attachment is None or attachment.state != "attached":
                    return None
            return True

        await poll(self._reactor, attached, self.config.volume_poll_interval, self.config.volume_attach_timeout,
                   f"volumes {list(volume_ids)} not attached to instance {instance_id}")

    async def _detach_all(self, instance_id: str) -> None:
        """Detach the volumes we attached (at one of our device names, deleteOnTermination false: never the root
        volume) so that they outlive the instance; they are never deleted."""
        root = await self.ec2.call("DescribeVolumes", {"Filter.1.Name": "attachment.instance-id",
                                                       "Filter.1.Value.1": instance_id})
        for state in parse_volumes(root).values():
            attachment = state.attachment_to(instance_id)
            if (attachment is None or attachment.delete_on_termination or not is_data_device(attachment.device)
                    or attachment.state in ("detaching", "detached")):
                continue
            try:
                await self.ec2.call("DetachVolume", {"VolumeId": state.volume_id, "InstanceId": instance_id})
            except ProviderError as e:
                if e.kind is not ErrorKind.NOT_FOUND and "IncorrectState" not in e.message:
                    raise
            self._log.info("detached volume {volume} from {id}", volume=state.volume_id, id=instance_id)

    async def _delete(self, instance_id: str) -> None:
        if instance_id.startswith("i-"):  # anything else names no instance (and no attachment)
            await self._detach_all(instance_id)
        try:
            await self.ec2.call("TerminateInstances", query_params("InstanceId", [instance_id]))
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                return  # unknown or malformed id: nothing to delete
            raise
        self._log.info("terminated instance {id}", id=instance_id)

    async def _find(self, name: str) -> Instance | None:
        found = await self.live_instances([name])
        return found[0] if found else None

    async def live_instances(self, names: Sequence[str]) -> list[Instance]:
        """The live (not terminated or shutting down) instances tagged Name=one of `names`."""
        params = {"Filter.1.Name": "tag:Name", **query_params("Filter.1.Value", names),
                  "Filter.2.Name": "instance-state-name", **query_params("Filter.2.Value", LIVE_STATES)}
        root = await self.ec2.call("DescribeInstances", params)
        return [_instance_of(item, self.config.use_public_ip)[0]
                for item in root.findall("reservationSet/item/instancesSet/item")]


