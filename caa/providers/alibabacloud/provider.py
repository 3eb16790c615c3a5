"""The Alibaba Cloud provider: one ECS instance per pod VM (spec-providers §8), on the RPC API (rpc.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

from treq.client import HTTPClient
from twisted.logger import Logger
from zope.interface import implementer

from caa.once import Once
from caa.providers.alibabacloud.config import AlibabaCloudConfig
from caa.providers.alibabacloud.rpc import ECS_VERSION, VPC_VERSION, Credentials, RpcClient
from caa.providers.alibabacloud.rrsa import OidcRoleCredentials
from caa.providers.alibabacloud.secondary import SecondaryNic
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


def run_instances_params(config: AlibabaCloudConfig, name: str, user_data: bytes, instance_type: str,
                         image_id: str) -> dict[str, str]:
    """The RunInstances parameters of one pod VM (spec-providers §8); pure, so tested without a cloud."""
    params = {
        "RegionId": config.region, "Amount": "1", "MinAmount": "1", "ImageId": image_id,
        "InstanceType": instance_type, "InstanceChargeType": "PostPaid", "VSwitchId": config.vswitch_id,
        "InstanceName": name, "UserData": base64.b64encode(user_data).decode(),
        "SystemDisk.Size": str(config.system_disk_size), "SystemDisk.Category": "cloud_essd",
    }
    for i, group in enumerate(config.security_group_ids, 1):
        params[f"SecurityGroupIds.{i}"] = group
    for i, (key, value) in enumerate(config.tags, 1):
        params[f"Tag.{i}.Key"] = key
        params[f"Tag.{i}.Value"] = value
    if config.key_name:
        params["KeyPairName"] = config.key_name
    if config.use_public_ip:
        params["InternetChargeType"] = "PayByTraffic"
        params["InternetMaxBandwidthOut"] = "100"
    if not config.disable_cvm:
        params["SecurityOptions.ConfidentialComputingMode"] = "TDX"
    return params


def _ips(item: dict[str, Any], public: bool) -> tuple[str, ...]:
    private = list(((item.get("VpcAttributes") or {}).get("PrivateIpAddress") or {}).get("IpAddress") or [])
    if not public:
        return tuple(private)
    addresses = list((item.get("PublicIpAddress") or {}).get("IpAddress") or [])
    eip = (item.get("EipAddress") or {}).get("IpAddress")
    if eip:
        addresses.append(eip)
    return tuple(addresses[:1] + private)  # the public IP first (the one dialled), as upstream


@implementer(IProvider)
class AlibabaCloudProvider(CoroutineProvider):
    _log = Logger()

    def __init__(self, reactor: INodeReactor, config: AlibabaCloudConfig, http: HTTPClient | None = None,
                 policy: RetryPolicy = RetryPolicy()) -> None:
        self._reactor = reactor
        self.config = config
        if http is None:
            http, self.owned_pool = default_http_client(reactor)
        rest = RestClient(reactor, http, policy, Redactor(config.secrets()))
        credentials: Credentials | OidcRoleCredentials = Credentials(
            config.access_key_id, config.access_key_secret, config.security_token)
        if not config.access_key_id and config.rrsa:
            credentials = self.rrsa = OidcRoleCredentials(reactor, rest, config.role_arn, config.oidc_provider_arn,
                                                          config.oidc_token_file, config.role_session_name,
                                                          config.sts_endpoint)
        self.rpc = RpcClient(reactor, rest, credentials)
        self._types = Once(self._load)
        self._vpc_id = config.vpc_id
        self.nic = SecondaryNic(reactor, config, self.ecs, self.vpc_call)

    # -- internals ----------------------------------------------------------------------------------------
    async def ecs(self, action: str, params: dict[str, str]) -> Any:
        return await self.rpc.call(self.config.ecs, ECS_VERSION, action, {"RegionId": self.config.region, **params})

    async def vpc_call(self, action: str, params: dict[str, str]) -> Any:
        return await self.rpc.call(self.config.vpc, VPC_VERSION, action, {"RegionId": self.config.region, **params})

    async def _verify(self) -> None:
        await self._prepare()

    async def _prepare(self) -> list[InstanceTypeInfo]:
        """Once: the VPC of the vSwitch (DescribeVSwitchAttributes) and the sizes of the allowed types."""
        return await self._types.get()

    async def _load(self) -> list[InstanceTypeInfo]:
        self.config.check()
        vswitch = await self.rpc.call(self.config.vpc, VPC_VERSION, "DescribeVSwitchAttributes",
                                      {"RegionId": self.config.region, "VSwitchId": self.config.vswitch_id})
        self._vpc_id = str(vswitch.get("VpcId") or self._vpc_id)
        names = list(dict.fromkeys((self.config.instance_type, *self.config.instance_types)))
        answer = await self.ecs("DescribeInstanceTypes", {f"InstanceTypes.{i}": n for i, n in enumerate(names, 1)})
        return [InstanceTypeInfo(str(t["InstanceTypeId"]), int(t.get("CpuCoreCount") or 0),
                                 int(float(t.get("MemorySize") or 0) * 1024), int(t.get("GPUAmount") or 0))
                for t in (answer.get("InstanceTypes") or {}).get("InstanceType") or []]

    async def _create(self, name: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        if spec.volumes:
            raise InvalidConfig("alibabacloud: CSI volumes are not supported yet")
        types = await self._prepare()
        config = self.config
        instance_type = select_instance_type(spec, types, config.instance_types, config.instance_type)
        image_id = config.image_id  # a local: the annotation is for this pod only (upstream kept it for all)
        if spec.image:
            image_id = spec.image
            self._log.info("Choosing {image} from annotation as the Alibaba Cloud image for the PodVM", image=image_id)
        answer = await self.ecs("RunInstances", run_instances_params(config, name, user_data, instance_type, image_id))
        ids = (answer.get("InstanceIdSets") or {}).get("InstanceIdSet") or []
        if not ids:
            raise TransientError("RunInstances: the answer names no instance")
        instance_id = str(ids[0])
        self._log.info("alibabacloud: created instance {id} ({name}, {type})", id=instance_id, name=name,
                       type=instance_type)
        try:
            instance = await self._wait_running(instance_id, name)
            if spec.multi_nic:  # --ext-network-via-podvm: a second NIC (and an EIP on it with a public IP)
                await self.nic.add(instance_id)
            return instance
        except BaseException as e:  # a failure or a cancel: roll back (the contract), then re-raise
            await self._roll_back(instance_id, e)
            raise

    async def _describe(self, params: dict[str, str]) -> list[dict[str, Any]]:
        answer = await self.ecs("DescribeInstances", params)
        return list((answer.get("Instances") or {}).get("Instance") or [])

    async def _wait_running(self, instance_id: str, name: str) -> Instance:
        """Until Running with its private IP (and the public one when asked): one wall-clock deadline, sleeps
        included (upstream's wait counted only the time inside its calls)."""
        async def probe() -> Instance | None:
            found = await self._describe({"InstanceIds": json.dumps([instance_id])})
            if not found:
                return None  # not listed yet
            item = found[0]
            status = item.get("Status")
            if status in ("Stopped", "Stopping"):
                raise TransientError(f"alibabacloud: instance {instance_id} is {status}")
            ips = _ips(item, self.config.use_public_ip)
            private = _ips(item, False)
            if status == "Running" and private and (not self.config.use_public_ip or len(ips) > len(private)):
                return Instance(instance_id, name, ips)
            return None

        return await poll(self._reactor, probe, self.config.poll_interval, self.config.boot_timeout,
                          f"alibabacloud: instance {instance_id} not Running with its IPs")

    async def _delete(self, instance_id: str) -> None:
        await self.nic.remove(instance_id)  # looked up in the cloud: nothing to remember across restarts

        async def attempt() -> bool | None:
            try:
                await self.ecs("DeleteInstance", {"InstanceId": instance_id, "Force": "true"})
            except ProviderError as e:
                if e.kind is ErrorKind.NOT_FOUND:
                    return True  # already gone
                if e.message.startswith("DeleteInstance: IncorrectInstanceStatus"):
                    return None  # still starting: again, until the deadline
                raise
            return True

        await poll(self._reactor, attempt, self.config.poll_interval, self.config.delete_timeout,
                   f"alibabacloud: instance {instance_id} could not be deleted")
        self._log.info("alibabacloud: deleted instance {id}", id=instance_id)

    async def _find(self, name: str) -> Instance | None:
        for item in await self._describe({"InstanceName": name}):
            if item.get("InstanceName") == name:
                return Instance(str(item["InstanceId"]), name, _ips(item, self.config.use_public_ip))
        return None
