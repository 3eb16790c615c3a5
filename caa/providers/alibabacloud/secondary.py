"""The pod VM's second NIC on Alibaba Cloud (`--ext-network-via-podvm`, spec-providers §8): an ENI named
`peerpod-nic-<instance id>` in the pod VMs' vSwitch and first security group, attached to the instance, and with
`--use-public-ip` an EIP bound to that ENI.

Restart-proof without journal state: upstream kept the EIP id in memory and leaked it when the adaptor restarted.
Here nothing is remembered between calls; `remove` finds what belongs to an instance from the cloud itself: the
ENI by its name (attached or not), the EIP by what it is bound to (`AssociatedInstanceType=NetworkInterface`,
`AssociatedInstanceId=<eni>`). An EIP allocated but not yet bound is released by `add` itself on any failure.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from caa.providers.alibabacloud.config import AlibabaCloudConfig
from caa.providers.interfaces import ErrorKind, ProviderError, TransientError
from caa.providers.rest import poll

Call = Callable[[str, dict[str, str]], Awaitable[Any]]

#: CreateNetworkInterface may answer without an id (documented: "call the operation again"); upstream tries 5 times
CREATE_ATTEMPTS = 5


def eni_name(instance_id: str) -> str:
    return f"peerpod-nic-{instance_id}"


class SecondaryNic:
    _log = Logger()

    def __init__(self, clock: IReactorTime, config: AlibabaCloudConfig, ecs: Call, vpc: Call) -> None:
        self._clock = clock
        self.config = config
        self._ecs = ecs
        self._vpc = vpc

    async def _wait(self, probe: Callable[[], Awaitable[bool]], what: str) -> None:
        async def once() -> bool | None:
            return True if await probe() else None
        await poll(self._clock, once, self.config.poll_interval, self.config.nic_timeout, what)

    # -- create -------------------------------------------------------------------------------------------
    async def add(self, instance_id: str) -> None:
        """ENI created, attached (InUse), DeleteOnRelease set; with a public IP an EIP bound to it (InUse). On a
        failure the EIP made here is released; the ENI is left to `remove` (it is found by name)."""
        eni = await self._create_eni(instance_id)
        await self._ecs("AttachNetworkInterface", {"InstanceId": instance_id, "NetworkInterfaceId": eni})
        await self._wait(lambda: self._eni_status(eni, "InUse"),
                         f"alibabacloud: network interface {eni} not attached to {instance_id}")
        # a backstop should the instance go without us: the ENI goes with it
        await self._ecs("ModifyNetworkInterfaceAttribute", {"NetworkInterfaceId": eni, "DeleteOnRelease": "true"})
        self._log.info("alibabacloud: attached network interface {eni} to {id}", eni=eni, id=instance_id)
        if not self.config.use_public_ip:
            return
        answer = await self._vpc("AllocateEipAddress", {"Description": "Peerpod External Network EIP",
                                                        "InstanceChargeType": "PostPaid",
                                                        "InternetChargeType": "PayByTraffic"})
        eip = str(answer.get("AllocationId") or "")
        if not eip:
            raise TransientError("alibabacloud: AllocateEipAddress named no EIP")
        try:
            await self._wait(lambda: self._eip_status(eip, "Available"), f"alibabacloud: EIP {eip} not Available")
            await self._vpc("AssociateEipAddress", {"AllocationId": eip, "InstanceId": eni,
                                                    "InstanceType": "NetworkInterface"})
            await self._wait(lambda: self._eip_status(eip, "InUse"), f"alibabacloud: EIP {eip} not bound to {eni}")
        except BaseException:
            await self._release_eip_quietly(eip)
            raise
        self._log.info("alibabacloud: bound EIP {eip} ({ip}) to {eni}", eip=eip, ip=answer.get("EipAddress"),
                       eni=eni)

    async def _create_eni(self, instance_id: str) -> str:
        params = {"VSwitchId": self.config.vswitch_id, "SecurityGroupId": self.config.security_group_ids[0],
                  "NetworkInterfaceName": eni_name(instance_id)}
        for _ in range(CREATE_ATTEMPTS):
            answer = await self._ecs("CreateNetworkInterface", params)
            if answer.get("NetworkInterfaceId"):
                return str(answer["NetworkInterfaceId"])
        raise TransientError(f"alibabacloud: CreateNetworkInterface named no interface {CREATE_ATTEMPTS} times")

    async def _release_eip_quietly(self, eip: str) -> None:
        try:
            await self._release_eip(eip, await self._describe_eip(eip))
        except ProviderError as e:
            self._log.warn("alibabacloud: rollback of EIP {eip} failed: {error}", eip=eip, error=e)

    # -- lookups ------------------------------------------------------------------------------------------
    async def _eni_status(self, eni: str, wanted: str) -> bool:
        return await self._eni_state(eni) == wanted

    async def _eips(self, params: dict[str, str]) -> list[dict[str, Any]]:
        answer = await self._vpc("DescribeEipAddresses", {"PageSize": "100", **params})
        return list((answer.get("EipAddresses") or {}).get("EipAddress") or [])

    async def _describe_eip(self, eip: str) -> dict[str, Any] | None:
        found = await self._eips({"AllocationId": eip})
        return found[0] if found else None

    async def _eip_status(self, eip: str, wanted: str) -> bool:
        item = await self._describe_eip(eip)
        return item is not None and item.get("Status") == wanted

    # -- delete -------------------------------------------------------------------------------------------
    async def remove(self, instance_id: str) -> None:
        """Every EIP bound to the instance's ENI unbound and released, the ENI detached and deleted; a second call
        finds nothing and does nothing."""
        answer = await self._ecs("DescribeNetworkInterfaces", {"NetworkInterfaceName": eni_name(instance_id),
                                                               "PageSize": "100"})
        for item in (answer.get("NetworkInterfaceSets") or {}).get("NetworkInterfaceSet") or []:
            eni = str(item["NetworkInterfaceId"])
            for eip in await self._eips({"AssociatedInstanceType": "NetworkInterface",
                                         "AssociatedInstanceId": eni}):
                await self._release_eip(str(eip["AllocationId"]), eip)
            await self._delete_eni(eni, item)

    async def _release_eip(self, eip: str, item: dict[str, Any] | None) -> None:
        if item is None:
            return  # gone already
        if item.get("Status") in ("InUse", "Associating"):
            await self._wait(lambda: self._eip_status(eip, "InUse"), f"alibabacloud: EIP {eip} still binding")
            await self._ignoring("UnassociateEipAddress", self._vpc, {
                "AllocationId": eip, "InstanceId": str(item.get("InstanceId") or ""),
                "InstanceType": str(item.get("InstanceType") or "NetworkInterface")})
        await self._wait(lambda: self._eip_gone_or(eip, "Available"), f"alibabacloud: EIP {eip} not unbound")
        await self._ignoring("ReleaseEipAddress", self._vpc, {"AllocationId": eip})
        await self._wait(lambda: self._eip_gone_or(eip, None), f"alibabacloud: EIP {eip} not released")
        self._log.info("alibabacloud: released EIP {eip}", eip=eip)

    async def _eip_gone_or(self, eip: str, status: str | None) -> bool:
        item = await self._describe_eip(eip)
        return item is None or (status is not None and item.get("Status") == status)

    async def _delete_eni(self, eni: str, item: dict[str, Any]) -> None:
        instance_id = str(item.get("InstanceId") or "")
        if instance_id and item.get("Status") in ("InUse", "Attaching"):
            await self._wait(lambda: self._eni_settled(eni), f"alibabacloud: network interface {eni} still attaching")
            await self._ignoring("DetachNetworkInterface", self._ecs,
                                 {"InstanceId": instance_id, "NetworkInterfaceId": eni})
        await self._wait(lambda: self._eni_gone_or_available(eni),
                         f"alibabacloud: network interface {eni} not detached")
        await self._ignoring("DeleteNetworkInterface", self._ecs, {"NetworkInterfaceId": eni})
        self._log.info("alibabacloud: deleted network interface {eni}", eni=eni)

    async def _eni_state(self, eni: str) -> str | None:
        """The ENI's Status, None once it is gone."""
        try:
            answer = await self._ecs("DescribeNetworkInterfaceAttribute", {"NetworkInterfaceId": eni})
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                return None
            raise
        return str(answer.get("Status") or "")

    async def _eni_settled(self, eni: str) -> bool:
        return await self._eni_state(eni) != "Attaching"

    async def _eni_gone_or_available(self, eni: str) -> bool:
        return await self._eni_state(eni) in (None, "Available")

    async def _ignoring(self, action: str, call: Call, params: dict[str, str]) -> None:
        """`action`, where "already done" (the object gone, or the instance it was attached to gone) is success."""
        try:
            await call(action, params)
        except ProviderError as e:
            if e.kind is not ErrorKind.NOT_FOUND:
                raise
