"""The Azure provider: one ARM virtual machine per pod VM (spec-providers §4), with its own NIC (and public IP),
on ARM REST (`arm.py`) with tokens from `identity.py`."""

from __future__ import annotations

import base64
import os
import re
import stat
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from treq.client import HTTPClient
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from caa.once import Once
from caa.providers.azure.arm import COMPUTE_API, DISK_API, NETWORK_API, ArmClient
from caa.providers.azure.config import MAX_USER_DATA, AzureConfig
from caa.providers.azure.disks import DISK_ID, MAX_LUNS, data_disks, disk_problem
from caa.providers.azure.identity import credential_kind, fetch_token
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
from caa.providers.rest import RestClient, RetryPolicy, default_http_client
from caa.providers.token import TokenCache
from caa.reactors import INodeReactor

_VM_ID = re.compile(
    r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute/virtualMachines/([^/]+)$",
    re.IGNORECASE)
# The identity endpoints answer at once; a node off Azure (no IMDS) must not hold a call for long.
TOKEN_POLICY = RetryPolicy(attempts=3, base=0.2, cap=2.0, attempt_timeout=10.0, call_timeout=30.0)


def nic_name(vm: str) -> str:
    return f"{vm}-net"


def public_ip_name(vm: str) -> str:
    return f"{vm}-ip"


def disk_name(vm: str) -> str:
    return f"{vm}-disk"


def vm_body(
    config: AzureConfig, name: str, size: str, image: str, user_data: bytes, nic_id: str, ssh_key: str,
    disk_ids: Sequence[str] = (),
) -> dict[str, Any]:
    """The ARM VirtualMachine of one pod VM (spec-providers §4.2); pure, so tested without a cloud."""
    encoded = base64.b64encode(user_data).decode()
    if len(encoded) > MAX_USER_DATA:
        raise InvalidConfig("base64 encoded userData is greater than 64KB")
    image_reference = ({"communityGalleryImageId": image} if image.startswith("/CommunityGalleries/")
                       else {"id": image})
    managed_disk: dict[str, Any] = {"storageAccountType": "Premium_LRS"}
    if not config.disable_cvm:
        managed_disk["securityProfile"] = {"securityEncryptionType": "VMGuestStateOnly"}
    os_disk: dict[str, Any] = {"name": disk_name(name), "createOption": "FromImage", "caching": "ReadWrite",
                               "deleteOption": "Delete", "managedDisk": managed_disk}
    if config.root_volume_size > 0:
        os_disk["diskSizeGB"] = config.root_volume_size
    storage: dict[str, Any] = {"imageReference": image_reference, "osDisk": os_disk}
    if disk_ids:
        storage["dataDisks"] = data_disks(disk_ids)
    properties: dict[str, Any] = {
        "hardwareProfile": {"vmSize": size},
        "storageProfile": storage,
        "osProfile": {
            "computerName": name,
            "adminUsername": config.ssh_username,
            "linuxConfiguration": {
                "disablePasswordAuthentication": True,
                "ssh": {"publicKeys": [{"path": f"/home/{config.ssh_username}/.ssh/authorized_keys",
                                        "keyData": ssh_key}]},
            },
        },
        "networkProfile": {"networkInterfaces": [{"id": nic_id,
                                                  "properties": {"primary": True, "deleteOption": "Delete"}}]},
        "diagnosticsProfile": {"bootDiagnostics": {"enabled": True}},
        "userData": encoded,
    }
    if not config.disable_cvm:
        properties["securityProfile"] = {
            "securityType": "ConfidentialVM",
            "uefiSettings": {"secureBootEnabled": config.enable_secure_boot, "vTpmEnabled": True},
        }
    body: dict[str, Any] = {"location": config.region, "properties": properties}
    if config.tags:
        body["tags"] = dict(config.tags)
    if config.zone:
        body["zones"] = [config.zone]
    return body


def nic_body(config: AzureConfig, public_ip_id: str) -> dict[str, Any]:
    """The ARM NetworkInterface of one pod VM: one dynamic IP configuration on --subnetid (and the public IP)."""
    ip_config: dict[str, Any] = {"subnet": {"id": config.subnet_id}, "privateIPAllocationMethod": "Dynamic"}
    if public_ip_id:
        ip_config["publicIPAddress"] = {"id": public_ip_id}
    properties: dict[str, Any] = {"ipConfigurations": [{"name": "ip-config", "properties": ip_config}]}
    if config.security_group_id:
        properties["networkSecurityGroup"] = {"id": config.security_group_id}
    body: dict[str, Any] = {"location": config.region, "properties": properties}
    if config.tags:
        body["tags"] = dict(config.tags)
    return body


def public_ip_body(config: AzureConfig) -> dict[str, Any]:
    body: dict[str, Any] = {"location": config.region, "sku": {"name": "Standard"},
                            "properties": {"publicIPAllocationMethod": "Static"}}
    if config.tags:
        body["tags"] = dict(config.tags)
    if config.zone:
        body["zones"] = [config.zone]
    return body


def _generated_ssh_key() -> str:
    """An OpenSSH RSA-4096 public key whose private half is discarded (upstream's default: no SSH into pod VMs)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def _read_ssh_key(path: str) -> str:
    """The public key of --ssh-key-path, checked as upstream's ConfigVerifier does: mode 0600, a valid key."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode != 0o600:
        raise InvalidConfig(f"azure: --ssh-key-path {path}: SSH key file permissions are {mode:o}, not 600")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    try:
        serialization.load_ssh_public_key(text.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise InvalidConfig(f"azure: --ssh-key-path {path}: not an SSH public key: {e}") from None
    return text


@implementer(IProvider)
class AzureProvider(CoroutineProvider):
    _log = Logger()

    def __init__(
        self,
        reactor: INodeReactor,
        config: AzureConfig,
        http: HTTPClient | None = None,
        policy: RetryPolicy = RetryPolicy(),
        token_policy: RetryPolicy = TOKEN_POLICY,
    ) -> None:
        self._reactor = reactor
        self.config = config
        if http is None:
            http, self.owned_pool = default_http_client(reactor)
        self.redactor = Redactor(config.secrets())
        token_rest = RestClient(reactor, http, token_policy, self.redactor)
        self.tokens = TokenCache(reactor, lambda: fetch_token(reactor, token_rest, config), self.redactor)
        self.arm = ArmClient(reactor, RestClient(reactor, http, policy, self.redactor), config.arm_endpoint,
                             self.tokens, config.poll_interval)
        self._sizes = Once(self._list_vm_sizes)
        self._max_data_disks: dict[str, int] = {}  # size -> maxDataDiskCount, from the same size list
        self._ssh_key = Once(self._load_public_key)

    # -- paths --------------------------------------------------------------------------------------
    def _group(self) -> str:
        return f"/subscriptions/{self.config.subscription_id}/resourceGroups/{self.config.resource_group}"

    def vm_path(self, name: str) -> str:
        return f"{self._group()}/providers/Microsoft.Compute/virtualMachines/{name}"

    def nic_path(self, vm: str) -> str:
        return f"{self._group()}/providers/Microsoft.Network/networkInterfaces/{nic_name(vm)}"

    def public_ip_path(self, vm: str) -> str:
        return f"{self._group()}/providers/Microsoft.Network/publicIPAddresses/{public_ip_name(vm)}"

    def disk_path(self, vm: str) -> str:
        return f"{self._group()}/providers/Microsoft.Compute/disks/{disk_name(vm)}"

    # -- internals ----------------------------------------------------------------------------------
    async def _verify(self) -> None:
        self.config.check()
        if self.config.ssh_key_path:
            await self._public_key()  # upstream's ConfigVerifier: a bad key file stops the start
        self._log.info("azure: {kind} credentials for subscription {sub}", kind=credential_kind(self.config),
                       sub=self.config.subscription_id)
        try:
            await self.arm.get(self.config.subnet_id, NETWORK_API, "subnet")
        except ProviderError as e:
            if e.retryable:
                raise
            raise InvalidConfig(f"azure: --subnetid: {e}") from None
        await self._vm_sizes()

    async def _vm_sizes(self) -> list[InstanceTypeInfo]:
        """Cores and memory of the allowed sizes (and the default), from the region's size list, once."""
        return await self._sizes.get()

    async def _list_vm_sizes(self) -> list[InstanceTypeInfo]:
        wanted = {self.config.instance_size, *self.config.instance_sizes}
        path = (f"/subscriptions/{self.config.subscription_id}/providers/Microsoft.Compute/locations/"
                f"{self.config.region}/vmSizes")
        # VirtualMachineSizeListResult: one answer, `value` only (the list is not paged)
        listed = await self.arm.get(path, COMPUTE_API, "list VM sizes")
        sizes: list[InstanceTypeInfo] = []
        for s in listed.get("value", []):
            if s.get("name") in wanted:
                sizes.append(InstanceTypeInfo(str(s["name"]), int(s.get("numberOfCores") or 0),
                                              int(s.get("memoryInMB") or 0)))
                self._max_data_disks[str(s["name"])] = int(s.get("maxDataDiskCount") or 0)
        return sizes

    async def _public_key(self) -> str:
        """The VM's SSH key: --ssh-key-path's, or one generated once (concurrent first creates share it)."""
        return await self._ssh_key.get()

    async def _load_public_key(self) -> str:
        pool = self._reactor.getThreadPool()
        if self.config.ssh_key_path:
            try:
                return await deferToThreadPool(self._reactor, pool, _read_ssh_key, self.config.ssh_key_path)
            except OSError as e:
                raise InvalidConfig(f"azure: --ssh-key-path: {e.strerror}: {self.config.ssh_key_path}") from None
        return await deferToThreadPool(self._reactor, pool, _generated_ssh_key)

    async def _create(self, name: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        config = self.config
        if spec.multi_nic:
            raise InvalidConfig("azure: a second NIC (--ext-network-via-podvm) is not supported yet")
        size = select_instance_type(spec, await self._vm_sizes(), config.instance_sizes, config.instance_size)
        disk_ids = tuple(spec.volumes)
        if disk_ids:  # before anything is made: a disk that cannot be attached leaves nothing behind
            await self._check_data_disks(name, size, disk_ids)
        image = config.image_id
        if spec.image:
            image = spec.image
            self._log.info("Choosing {image} from annotation as the Azure image for the PodVM image", image=image)
        vm = self.vm_path(name)
        body = vm_body(config, name, size, image, user_data, self.nic_path(name), await self._public_key(),
                       disk_ids)
        timeout = config.boot_timeout
        try:
            public_ip = ""
            if config.use_public_ip:
                public_ip = self.public_ip_path(name)
                await self.arm.put(public_ip, NETWORK_API, public_ip_body(config), timeout,
                                   f"create {public_ip_name(name)}")
            await self.arm.put(self.nic_path(name), NETWORK_API, nic_body(config, public_ip), timeout,
                               f"create {nic_name(name)}")
            created = await self.arm.put(vm, COMPUTE_API, body, timeout, f"create {name}")
            self._log.info("created VM {name} ({size})", name=name, size=size)
            for lun, disk_id in enumerate(disk_ids):
                self._log.info("VM {name}: data disk {disk} at LUN {lun}", name=name, disk=disk_id, lun=lun)
            instance = await self._instance_of(created, name)
            if not instance.ips:
                raise TransientError(f"VM {name}: address not ready")
            return instance
        except BaseException as e:  # a failure or a cancel: roll back what exists (the contract), then re-raise
            await self._roll_back(vm, e, lambda: self._delete_named(name))
            if isinstance(e, ProviderError) and e.kind is ErrorKind.NOT_FOUND:
                raise InvalidConfig(e.message) from e  # the image, subnet or NSG the create names is missing
            raise

    async def _check_data_disks(self, name: str, size: str, disk_ids: Sequence[str]) -> None:
        """Upstream's pre-check of the CSI disks: managed disk ids, no more than the size takes, each disk in
        the region and free (or held by this VM already)."""
        bad = [d for d in disk_ids if not DISK_ID.fullmatch(d)]
        if bad:
            raise InvalidConfig(f"azure: data disk pre-validation failed: {', '.join(bad)}: not a managed disk id "
                                "(/subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Compute/disks/<name>)")
        if len({d.lower() for d in disk_ids}) != len(disk_ids):
            raise InvalidConfig(f"azure: data disk pre-validation failed: a disk is named twice: {list(disk_ids)}")
        limit = self._max_data_disks.get(size, 0) or MAX_LUNS
        if size not in self._max_data_disks:
            self._log.warn("VM size {size}: no maxDataDiskCount known, checking only ARM's {n} LUNs", size=size,
                           n=MAX_LUNS)
        if len(disk_ids) > limit:
            raise InvalidConfig(f"azure: data disk pre-validation failed: {len(disk_ids)} data disks, VM size "
                                f"{size} takes at most {limit}")
        problems: list[ProviderError] = []
        for disk_id in disk_ids:
            try:
                disk = await self.arm.get(disk_id, DISK_API, f"get disk {disk_id.rsplit('/', 1)[-1]}")
            except ProviderError as e:
                if e.retryable:
                    raise
                problems.append(InvalidConfig(f"disk {disk_id} not found" if e.kind is ErrorKind.NOT_FOUND
                                              else f"disk {disk_id}: {e}"))
                continue
            problem = disk_problem(disk_id, disk, self.config.region, self.vm_path(name))
            if problem is not None:
                problems.append(problem)
            elif self.config.zone and disk.get("zones") and self.config.zone not in disk["zones"]:
                self._log.warn("disk {disk} is in zones {zones}, the VM in zone {zone}", disk=disk_id,
                               zones=disk["zones"], zone=self.config.zone)
        if problems:
            text = "azure: data disk pre-validation failed: " + "; ".join(p.message for p in problems)
            if any(not p.retryable for p in problems):
                raise InvalidConfig(text)
            raise TransientError(text)

    async def _instance_of(self, vm: Any, name: str) -> Instance:
        """The Instance of a VM's JSON: its id and IPs (public first when asked, then private)."""
        ips: list[str] = []
        try:
            nic = await self.arm.get(self.nic_path(name), NETWORK_API, f"get {nic_name(name)}")
        except ProviderError as e:
            if e.kind is not ErrorKind.NOT_FOUND:
                raise
            nic = {}
        configurations = nic.get("properties", {}).get("ipConfigurations", [])
        if self.config.use_public_ip:
            for configuration in configurations:
                if configuration.get("properties", {}).get("publicIPAddress"):
                    address = await self.arm.get(self.public_ip_path(name), NETWORK_API,
                                                 f"get {public_ip_name(name)}")
                    ips.append(str(address.get("properties", {}).get("ipAddress", "")))
        ips += [str(c.get("properties", {}).get("privateIPAddress", "")) for c in configurations]
        usable = [ip for ip in ips if ip not in ("", "0.0.0.0")]
        return Instance(str(vm.get("id") or self.vm_path(name)), name, usable)

    async def _delete(self, instance_id: str) -> None:
        match = _VM_ID.match(instance_id)
        if match is None:
            self._log.info("delete of {id}: not a VM id, nothing to delete", id=instance_id)
            return  # names no VM: nothing to delete (upstream: "VM name not found")
        sub, group, name = match.groups()
        if (sub.lower(), group.lower()) != (self.config.subscription_id.lower(), self.config.resource_group.lower()):
            raise InvalidConfig(f"azure: {instance_id} is not in resource group {self.config.resource_group}")
        await self._delete_named(name)

    async def _delete_named(self, name: str) -> None:
        """The VM, then its NIC, public IP and OS disk (ARM removes them with the VM through deleteOption; each
        delete of an already-gone one is a no-op), in that order: a NIC cannot go while its VM exists. The CSI
        data disks are never deleted: their deleteOption Detach makes ARM release them with the VM."""
        timeout = self.config.boot_timeout
        deleted = await self.arm.delete(self.vm_path(name), COMPUTE_API, timeout, f"delete {name}")
        await self.arm.delete(self.nic_path(name), NETWORK_API, timeout, f"delete {nic_name(name)}")
        # Also without --use-public-ip: the VM may have been created before the option changed.
        await self.arm.delete(self.public_ip_path(name), NETWORK_API, timeout, f"delete {public_ip_name(name)}")
        await self.arm.delete(self.disk_path(name), DISK_API, timeout, f"delete {disk_name(name)}")
        if deleted:
            self._log.info("deleted VM {name}", name=name)

    async def _find(self, name: str) -> Instance | None:
        try:
            vm = await self.arm.get(self.vm_path(name), COMPUTE_API, f"get {name}")
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                return None
            raise
        return await self._instance_of(vm, name)
