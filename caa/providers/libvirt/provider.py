"""
The libvirt provider. Every libvirt call runs on one owner thread per connection (a one-thread pool), so
the reactor never blocks and libvirt streams are never used re-entrantly; waits (the VM's IP) are
scheduled on the injected reactor clock with one overall deadline.

Fixes over upstream (spec-providers §16.2 #2-#6, #26):
- a domain that already exists under the VM name is returned (after checking it belongs to the same
  sandbox) instead of a success without UUID or IPs;
- a create that fails at any step, or is cancelled, removes what it made (volumes, ISO, domain);
  leftovers of an interrupted earlier create (same names) are removed before creating;
- the VM's address is reserved on the network's DHCP (a `<host>` entry for a MAC we choose) before the domain
  is defined, so create returns as soon as the domain is started and the adaptor dials while the guest boots;
  where the network has no DHCP range or refuses the update (or --ip-reservation=false), the IP wait below;
  the reservation goes with the domain (delete, rollback, leftover cleanup);
- the IP wait polls the domain's lease addresses and the network's DHCP leases with a short back-off up
  to one deadline (--ip-timeout), and stops at once if the domain dies;
- the ISO's disk path is the volume's path, not its key;
- a lost connection (libvirtd restart) is reopened on the next call;
- deleting a missing instance succeeds.
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import libvirt
from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from caa.podvm_api.naming import instance_name
from caa.podvm_api.volumes import data_disk_serial
from caa.providers.cidata import build_cidata_iso
from caa.providers.interfaces import (
    Instance,
    InstanceSpec,
    InvalidConfig,
    IProvider,
    ProviderError,
    QuotaExceeded,
    TransientError,
)
from caa.providers.libvirt.config import LibvirtConfig
from caa.providers.libvirt.dhcp import DhcpHost, choose_address, dhcp_scope, hosts_of, random_mac, reserved_ips
from caa.providers.libvirt.domainxml import (
    METADATA_NS,
    DataDisk,
    DomainParams,
    HostCapabilities,
    LaunchSecurity,
    SevParameters,
    build_domain_xml,
    file_disk_paths,
    interface_macs,
    iso_volume_xml,
    parse_sev_parameters,
    resolve_launch_security,
    root_volume_xml,
    volume_capacity_bytes,
    volume_format,
)
from caa.reactors import INodeReactor

T = TypeVar("T")


def _ignore_libvirt_errors(_context: object, _error: object) -> None:
    """libvirt prints every error on stderr by default; we report them ourselves."""


libvirt.registerErrorHandler(_ignore_libvirt_errors, None)

_BROKEN_CONNECTION = {
    libvirt.VIR_ERR_SYSTEM_ERROR,
    libvirt.VIR_ERR_NO_CONNECT,
    libvirt.VIR_ERR_RPC,
    libvirt.VIR_ERR_INTERNAL_ERROR,
}
_CONFIG_ERRORS = {
    libvirt.VIR_ERR_XML_ERROR,
    libvirt.VIR_ERR_XML_DETAIL,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED,
    libvirt.VIR_ERR_NO_STORAGE_POOL,
    libvirt.VIR_ERR_NO_NETWORK,
    libvirt.VIR_ERR_NO_STORAGE_VOL,
}
_UUID = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$")
#: Addresses tried per create when other adaptors sharing the network take the chosen one first.
_RESERVE_ATTEMPTS = 16
_QUOTA_WORDS = ("cannot allocate memory", "no space left", "not enough free space", "out of memory", "insufficient")


def _code(error: libvirt.libvirtError) -> int:
    return error.get_error_code() or 0


def map_libvirt_error(error: libvirt.libvirtError, context: str) -> ProviderError:
    """`<context>: <libvirt message>` as a ProviderError of the right kind."""
    message = f"{context}: {error.get_error_message() or error}"
    code = _code(error)
    if any(word in message.lower() for word in _QUOTA_WORDS):
        return QuotaExceeded(message)
    if code in _CONFIG_ERRORS:
        return InvalidConfig(message)
    return TransientError(message)


def _is_connection_error(error: libvirt.libvirtError) -> bool:
    if _code(error) not in _BROKEN_CONNECTION:
        return False
    text = str(error).lower()
    return _code(error) != libvirt.VIR_ERR_INTERNAL_ERROR or "connection" in text or "closed" in text


@define
class _Made:
    """What one create has made so far (filled in on the owner thread)."""

    volumes: list[str] = field(factory=list)
    domain_defined: bool = False


class ConnectionRunner(Protocol):
    """Runs f(conn, *args) where the libvirt connection lives; tests may pass a synchronous one."""

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]: ...

    def close(self) -> Deferred[None]: ...


class _ConnectionOwner:
    """The thread that owns one libvirt connection; `run(f, ...)` calls `f(conn, ...)` there."""

    _log = Logger()

    def __init__(self, reactor: INodeReactor, uri: str, redacted_uri: str) -> None:
        self._reactor = reactor
        self._uri = uri
        self._redacted_uri = redacted_uri
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"libvirt-{redacted_uri}")
        self._started = False
        self._conn: libvirt.virConnect | None = None
        self._trigger: Any = None

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        if not self._started:
            self._pool.start()
            self._started = True
            # The worker thread is not a daemon: stop it with the reactor even if teardown() is never called.
            add_trigger = getattr(self._reactor, "addSystemEventTrigger", None)
            if add_trigger is not None:
                self._trigger = add_trigger("during", "shutdown", self._stop_pool)
        return deferToThreadPool(self._reactor, self._pool, self._call, function, *args)

    def _stop_pool(self) -> None:
        if self._started:
            self._started = False
            self._pool.stop()

    def _connection(self) -> libvirt.virConnect:
        if self._conn is not None:
            try:
                alive = self._conn.isAlive()
            except libvirt.libvirtError:
                alive = 0
            if alive:
                return self._conn
            self._log.warn("libvirt connection to {uri} lost; reconnecting", uri=self._redacted_uri)
            self._drop()
        try:
            self._conn = libvirt.open(self._uri)
        except libvirt.libvirtError as e:
            raise TransientError(f"cannot connect to libvirt at {self._redacted_uri}: {e}") from None
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        conn = self._connection()
        try:
            return function(conn, *args)
        except libvirt.libvirtError as e:
            if _is_connection_error(e):
                self._drop()
            raise map_libvirt_error(e, "libvirt") from None

    def close(self) -> Deferred[None]:
        if not self._started:
            return Deferred.fromCoroutine(_none())

        def close_on_thread(_conn: object = None) -> None:
            self._drop()

        d = deferToThreadPool(self._reactor, self._pool, close_on_thread)

        def stop(result: object) -> object:
            self._stop_pool()
            if self._trigger is not None:
                self._reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None
            return result

        d.addBoth(stop)
        return d


async def _none() -> None:
    return None


def _not_found(error: libvirt.libvirtError, *codes: int) -> bool:
    return _code(error) in codes


@implementer(IProvider)
class LibvirtProvider:
    _log = Logger()

    def __init__(self, reactor: INodeReactor, config: LibvirtConfig, owner: ConnectionRunner | None = None) -> None:
        self._reactor = reactor
        self.config = config
        # `owner` runs f(conn, *args) on the connection's thread; tests may pass a synchronous one.
        if owner is None:
            owner = _ConnectionOwner(reactor, config.uri, str(config.redacted()["uri"]))
        self._owner: ConnectionRunner = owner
        self._host: HostCapabilities | None = None
        self._sev: SevParameters | None = None

    # -- IProvider ------------------------------------------------------------------------------------

    def instance_name(self, pod_name: str, sandbox_id: str) -> str:
        return instance_name(pod_name, sandbox_id, 63)

    def create_instance(
        self, pod_name: str, sandbox_id: str, user_data: bytes, spec: InstanceSpec
    ) -> Deferred[Instance]:
        return Deferred.fromCoroutine(self._create(pod_name, sandbox_id, user_data, spec))

    def delete_instance(self, instance_id: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._delete(instance_id))

    def find_instance(self, name: str) -> Deferred[Instance | None]:
        return self._owner.run(self._t_find, name)

    def verify_config(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._verify())

    def teardown(self) -> Deferred[None]:
        return self._owner.close()

    # -- coroutines on the reactor thread --------------------------------------------------------------

    async def _verify(self) -> None:
        self.config.check()
        await self._owner.run(self._t_verify)
        self._log.info("libvirt provider ready: {config}", config=self.config.redacted())

    async def _create(self, pod_name: str, sandbox_id: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        started = self._reactor.seconds()
        deadline = started + self.config.ip_timeout
        name = self.instance_name(pod_name, sandbox_id)
        vcpus = spec.vcpus or self.config.cpu
        memory = spec.memory_mib or self.config.memory
        image = spec.image or self.config.vol_name
        self._log.info(
            "{sandbox_id}: Choosing {image} as libvirt volume for the PodVM image", sandbox_id=sandbox_id, image=image
        )
        if spec.gpus or spec.instance_type:
            self._log.info(
                "{sandbox_id}: libvirt ignores the instance type {type!r} and GPU count {gpus} (as upstream)",
                sandbox_id=sandbox_id, type=spec.instance_type, gpus=spec.gpus,
            )
        host = await self._owner.run(self._t_host)
        security = resolve_launch_security(self.config.disable_cvm, self.config.launch_security, host.arch)
        existing = await self._owner.run(self._t_existing, name, sandbox_id)
        if existing is not None:
            self._log.info("{sandbox_id}: domain {name} exists already; reusing it", sandbox_id=sandbox_id, name=name)
            ips = await self._wait_for_ips(existing, deadline)
            return Instance(existing, name, ips)
        made = _Made()
        try:
            if security in (LaunchSecurity.SEV, LaunchSecurity.SEV_SNP):
                await self._owner.run(self._t_sev)
            data_disks = await self._owner.run(self._t_data_disks, spec.volumes)
            root_path, iso_path = await self._owner.run(self._t_volumes, name, image, user_data, made)
            reservation = await self._reserve(name)
            params = DomainParams(
                name=name,
                vcpus=vcpus,
                memory_mib=memory,
                root_path=root_path,
                iso_path=iso_path,
                network=self.config.network_name,
                cpuset=self.config.cpuset,
                firmware=self.config.firmware,
                domain_type=self.config.domain_type,
                launch_security=security,
                sev=self._sev,
                pod_name=pod_name,
                sandbox_id=sandbox_id,
                data_disks=data_disks,
                mac=reservation.mac if reservation is not None else None,
            )
            domain_xml = build_domain_xml(params, host)
            domain_uuid = await self._owner.run(self._t_define_and_start, domain_xml, vcpus, memory, made)
            if reservation is not None:
                ips = (reservation.ip,)  # dnsmasq hands it to the guest; the adaptor dials while it boots
            else:
                ips = await self._wait_for_ips(domain_uuid, deadline)
        except BaseException as e:
            await self._rollback(name, made, sandbox_id, e)
            if isinstance(e, (ProviderError, CancelledError)):
                raise
            raise TransientError(f"creating domain {name} failed: {e}") from e
        self._log.info(
            "{sandbox_id}: created instance {instance_id} ({name}) at {ips} in {elapsed:.1f}s",
            sandbox_id=sandbox_id,
            instance_id=domain_uuid,
            name=name,
            ips=list(ips),
            elapsed=self._reactor.seconds() - started,
        )
        return Instance(domain_uuid, name, ips)

    async def _reserve(self, name: str) -> DhcpHost | None:
        if not self.config.ip_reservation:
            self._log.info(
                "--ip-reservation is off; {name} waits for its DHCP lease on network {network}",
                name=name, network=self.config.network_name,
            )
            return None
        # (a rollback removes the reservation by the domain's name, as the leftover cleanup does)
        return await self._owner.run(self._t_reserve, name)

    async def _rollback(self, name: str, made: _Made, sandbox_id: str, cause: BaseException) -> None:
        self._log.warn(
            "{sandbox_id}: creating {name} failed ({cause}); removing what was made",
            sandbox_id=sandbox_id,
            name=name,
            cause=str(cause) or type(cause).__name__,
        )
        try:
            await self._owner.run(self._t_remove_by_name, name)
        except Exception:
            self._log.failure("{sandbox_id}: rollback of {name} failed", sandbox_id=sandbox_id, name=name)
            if isinstance(cause, ProviderError) and made.domain_defined:
                cause.instance_id = name

    async def _wait_for_ips(self, domain_uuid: str, deadline: float) -> tuple[str, ...]:
        delay = 0.1
        while True:
            ips = await self._owner.run(self._t_addresses, domain_uuid)
            if ips:
                return ips
            remaining = deadline - self._reactor.seconds()
            if remaining <= 0:
                raise TransientError(f"Domain (uuid={domain_uuid}) IP addresses not found")
            await deferLater(self._reactor, min(delay, remaining), lambda: None)
            delay = min(delay * 2, 1.0)

    async def _delete(self, instance_id: str) -> None:
        if not instance_id:
            raise InvalidConfig("DeleteInstance called with empty instanceID")
        removed = await self._owner.run(self._t_delete, instance_id)
        if removed:
            self._log.info("deleted instance {instance_id}", instance_id=instance_id)
        else:
            self._log.info("instance {instance_id} does not exist; nothing to delete", instance_id=instance_id)

    # -- steps on the owner thread (each takes the connection first) -----------------------------------

    def _pool(self, conn: libvirt.virConnect) -> libvirt.virStoragePool:
        try:
            return conn.storagePoolLookupByName(self.config.pool_name)
        except libvirt.libvirtError as e:
            raise InvalidConfig(f'can\'t find storage pool "{self.config.pool_name}": {e}') from None

    def _refresh(self, pool: libvirt.virStoragePool) -> None:
        # A refresh fails while another refresh or an upload runs; try a few times, briefly.
        for attempt in range(5):
            try:
                pool.refresh(0)
                return
            except libvirt.libvirtError as e:
                if attempt == 4:
                    raise map_libvirt_error(e, f"refreshing storage pool {self.config.pool_name}") from None
                time.sleep(0.2 * (attempt + 1))

    def _t_verify(self, conn: libvirt.virConnect) -> None:
        pool = self._pool(conn)
        if not pool.isActive():
            raise InvalidConfig(f'storage pool "{self.config.pool_name}" is not active')
        try:
            network = conn.networkLookupByName(self.config.network_name)
        except libvirt.libvirtError as e:
            raise InvalidConfig(f'can\'t find network "{self.config.network_name}": {e}') from None
        if not network.isActive():
            raise InvalidConfig(f'network "{self.config.network_name}" is not active')
        self._t_host(conn)
        try:
            pool.storageVolLookupByName(self.config.vol_name)
        except libvirt.libvirtError:
            self._log.warn(
                "base volume {vol} is not in pool {pool} yet; creates fail until it is uploaded",
                vol=self.config.vol_name,
                pool=self.config.pool_name,
            )

    def _t_host(self, conn: libvirt.virConnect) -> HostCapabilities:
        if self._host is None:
            model = conn.getInfo()[0]
            self._host = HostCapabilities.parse(conn.getCapabilities(), model)
        return self._host

    def _t_sev(self, conn: libvirt.virConnect) -> None:
        if self._sev is None:
            try:
                caps = conn.getDomainCapabilities(None, None, None, self.config.domain_type, 0)
            except libvirt.libvirtError as e:
                raise map_libvirt_error(e, "reading domain capabilities for SEV") from None
            self._sev = parse_sev_parameters(caps)

    def _t_existing(self, conn: libvirt.virConnect, name: str, sandbox_id: str) -> str | None:
        try:
            domain = conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if _not_found(e, libvirt.VIR_ERR_NO_DOMAIN):
                return None
            raise map_libvirt_error(e, "Error in checking instance") from None
        owner = _metadata_sandbox(domain.XMLDesc(0))
        if owner != sandbox_id:
            raise InvalidConfig(f"a domain named {name} already exists and does not belong to sandbox {sandbox_id}")
        if not domain.isActive():
            domain.create()
        return str(domain.UUIDString())

    def _t_data_disks(self, conn: libvirt.virConnect, disk_ids: tuple[str, ...]) -> tuple[DataDisk, ...]:
        """The CSI volumes to attach, in order: each disk id is a volume of the pool (by name) or any pool volume
        (by absolute path). Checked before anything is made; they are never created or deleted here."""
        if not disk_ids:
            return ()
        pool = self._pool(conn)
        self._refresh(pool)
        disks = []
        for lun, disk_id in enumerate(disk_ids):
            try:
                if disk_id.startswith("/"):
                    volume = conn.storageVolLookupByPath(disk_id)
                else:
                    volume = pool.storageVolLookupByName(disk_id)
                kind = "block" if volume.info()[0] == libvirt.VIR_STORAGE_VOL_BLOCK else "file"
                disks.append(DataDisk(volume.path(), data_disk_serial(lun), kind, volume_format(volume.XMLDesc(0))))
            except libvirt.libvirtError as e:
                if _not_found(e, libvirt.VIR_ERR_NO_STORAGE_VOL):
                    raise InvalidConfig(
                        f"CSI volume {disk_id}: no such volume (a name in pool {self.config.pool_name} or a volume "
                        f"path)") from None
                raise map_libvirt_error(e, f"looking up CSI volume {disk_id}") from None
        self._log.info("attaching CSI volumes {disks}", disks=[f"{d.source} (serial {d.serial})" for d in disks])
        return tuple(disks)

    def _t_volumes(
        self, conn: libvirt.virConnect, name: str, image: str, user_data: bytes, made: _Made
    ) -> tuple[str, str]:
        pool = self._pool(conn)
        self._refresh(pool)
        try:
            base = pool.storageVolLookupByName(image)
        except libvirt.libvirtError:
            try:
                base = conn.storageVolLookupByKey(image)
            except libvirt.libvirtError:
                raise InvalidConfig(f"Error in creating volume: Can't retrieve volume {image}") from None
        root_name, iso_name = f"{name}-root.qcow2", f"{name}-cloudinit.iso"
        # Leftovers of an interrupted create under the same names would make createXML fail.
        self._delete_volumes(pool, (root_name, iso_name))
        base_capacity = base.info()[1]
        capacity = volume_capacity_bytes(self.config.root_disk_size, base_capacity)
        xml = root_volume_xml(root_name, capacity, base.path(), volume_format(base.XMLDesc(0)))
        try:
            root = pool.createXML(xml, 0)
        except libvirt.libvirtError as e:
            raise map_libvirt_error(e, "Error in creating volume") from None
        made.volumes.append(root_name)
        try:
            iso_data = build_cidata_iso(user_data, name)
        except Exception as e:
            raise InvalidConfig(f"error in creating cloud init ISO file, cause: {e}") from None
        try:
            iso = pool.createXML(iso_volume_xml(iso_name, len(iso_data)), 0)
        except libvirt.libvirtError as e:
            raise map_libvirt_error(e, "Error in creating iso volume") from None
        made.volumes.append(iso_name)
        try:
            self._upload(conn, iso, iso_data)
        except libvirt.libvirtError as e:
            raise map_libvirt_error(e, "Error in uploading iso volume") from None
        return root.path(), iso.path()

    def _upload(self, conn: libvirt.virConnect, volume: libvirt.virStorageVol, data: bytes) -> None:
        stream = conn.newStream(0)
        try:
            volume.upload(stream, 0, len(data), 0)
            sent = 0
            view = memoryview(data)
            while sent < len(data):
                sent += stream.send(bytes(view[sent : sent + 262144]))
            stream.finish()
        except BaseException:
            try:
                stream.abort()
            except libvirt.libvirtError:
                pass
            raise

    def _network(self, conn: libvirt.virConnect) -> libvirt.virNetwork:
        try:
            return conn.networkLookupByName(self.config.network_name)
        except libvirt.libvirtError as e:
            raise map_libvirt_error(e, f'can\'t find network "{self.config.network_name}"') from None

    @staticmethod
    def _update_flags(network: libvirt.virNetwork) -> int:
        flags = 0
        if network.isActive():
            flags |= libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE
        if network.isPersistent():
            flags |= libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        return flags

    def _leased(self, network: libvirt.virNetwork) -> list[str]:
        try:
            leases = network.DHCPLeases() or []
        except libvirt.libvirtError as e:
            if _is_connection_error(e):
                raise
            return []  # a driver without lease reporting: the host entries still keep us apart
        return [str(lease["ipaddr"]) for lease in leases
                if lease.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4 and lease.get("ipaddr")]

    def _t_reserve(self, conn: libvirt.virConnect, name: str) -> DhcpHost | None:
        """Choose a MAC and a free address of the network's DHCP range and add the `<host>` entry, retrying
        with another address when another adaptor took it first. None: the network is not ours to change."""
        network = self._network(conn)
        network_name = self.config.network_name
        # A reservation left by an interrupted create of the same name (its domain gone) would block ours.
        errors = self._remove_reservations(conn, name, [])
        if errors:
            raise TransientError(f"removing the old DHCP reservation of {name}: " + "; ".join(errors))
        scope = dhcp_scope(network.XMLDesc(0))
        flags = self._update_flags(network)
        tried: set[str] = set()
        for _attempt in range(_RESERVE_ATTEMPTS):
            if scope is None:
                self._log.info(
                    "network {network} has no DHCP range we can reserve in; waiting for the DHCP lease",
                    network=network_name,
                )
                return None
            ip = choose_address(scope, self._leased(network), tried)
            if ip is None:
                self._log.warn(
                    "network {network} has no free address in its DHCP range; waiting for the DHCP lease",
                    network=network_name,
                )
                return None
            host = DhcpHost(random_mac(), name, ip)
            try:
                network.update(
                    libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                    host.xml(), flags,
                )
            except libvirt.libvirtError as e:
                if _is_connection_error(e):
                    raise
                if _code(e) != libvirt.VIR_ERR_OPERATION_INVALID:
                    self._log.info(
                        "network {network} refuses DHCP host reservations ({error}); waiting for the DHCP lease",
                        network=network_name, error=e.get_error_message() or str(e),
                    )
                    return None
                # an entry with this address (or MAC) exists already: another adaptor was quicker
                tried.add(ip)
                scope = dhcp_scope(network.XMLDesc(0))
                continue
            self._log.info(
                "reserved {ip} for {mac} on network {network}", ip=ip, mac=host.mac, network=network_name
            )
            return host
        self._log.warn(
            "network {network}: {count} addresses were taken while we reserved them; waiting for the DHCP lease",
            network=network_name, count=_RESERVE_ATTEMPTS,
        )
        return None

    @staticmethod
    def _definitions(network: libvirt.virNetwork) -> list[tuple[int, str]]:
        """(update flags, XML) of the network's live and persistent definitions."""
        live, config = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE, libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        active, persistent = network.isActive(), network.isPersistent()
        if not active:
            return [(config, network.XMLDesc(0))] if persistent else []
        live_xml = network.XMLDesc(0)
        if not persistent:
            return [(live, live_xml)]
        try:
            inactive_xml = network.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE)
        except libvirt.libvirtError as e:
            if _is_connection_error(e):
                raise
            return [(live | config, live_xml)]  # a driver that cannot show them apart keeps them alike
        return [(live, live_xml), (config, inactive_xml)]

    def _remove_reservations(self, conn: libvirt.virConnect, name: str, macs: list[str]) -> list[str]:
        """DELETE exactly the network's host entries named `name` or for one of `macs`, in the live and the
        persistent definition. Returns errors."""
        try:
            network = conn.networkLookupByName(self.config.network_name)
        except libvirt.libvirtError as e:
            if _not_found(e, libvirt.VIR_ERR_NO_NETWORK):
                return []
            return [f"looking up network {self.config.network_name}: {e}"]
        try:
            definitions = self._definitions(network)
        except libvirt.libvirtError as e:
            return [f"reading network {self.config.network_name}: {e}"]
        errors = []
        for flags, xml in definitions:
            for host in hosts_of(xml, name, macs):
                try:
                    network.update(
                        libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1,
                        host.xml(), flags,
                    )
                except libvirt.libvirtError as e:
                    errors.append(f"removing DHCP reservation {host.xml()} from network {self.config.network_name}: "
                                  f"{e.get_error_message() or e}")
                    continue
                if flags & libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE or len(definitions) == 1:
                    self._log.info(
                        "removed the DHCP reservation of {ip} for {mac} ({name}) on network {network}",
                        ip=host.ip, mac=host.mac, name=host.name, network=self.config.network_name,
                    )
        return errors

    def _t_define_and_start(
        self, conn: libvirt.virConnect, domain_xml: str, vcpus: int, memory: int, made: _Made
    ) -> str:
        try:
            domain = conn.defineXML(domain_xml)
        except libvirt.libvirtError as e:
            raise map_libvirt_error(e, "Error in defining domain") from None
        made.domain_defined = True
        try:
            domain.create()
        except libvirt.libvirtError as e:
            raise map_libvirt_error(e, f"Error in starting domain ({vcpus} vCPUs, {memory} MiB)") from None
        return str(domain.UUIDString())

    def _t_addresses(self, conn: libvirt.virConnect, domain_uuid: str) -> tuple[str, ...]:
        try:
            domain = conn.lookupByUUIDString(domain_uuid)
        except libvirt.libvirtError as e:
            if _not_found(e, libvirt.VIR_ERR_NO_DOMAIN):
                raise InvalidConfig(f"Domain (uuid={domain_uuid}) disappeared before it got an IP") from None
            raise
        if not domain.isActive():
            raise InvalidConfig(f"Domain (uuid={domain_uuid}) stopped before it got an IP (see its console log)")
        return self._addresses(conn, domain)

    def _addresses(self, conn: libvirt.virConnect, domain: libvirt.virDomain) -> tuple[str, ...]:
        """The domain's IPv4 address (the one reserved for its MAC, else what the DHCP leases say), then IPv6."""
        macs = interface_macs(domain.XMLDesc(0))
        try:
            network: libvirt.virNetwork | None = conn.networkLookupByName(self.config.network_name)
        except libvirt.libvirtError:
            network = None
        # a reservation is what dnsmasq hands the guest: known before the lease, the same after it
        v4: list[str] = []
        if network is not None and macs:
            try:
                v4 = reserved_ips(network.XMLDesc(0), macs)
            except libvirt.libvirtError as e:
                if _is_connection_error(e):
                    raise
        v6: list[str] = []
        try:
            interfaces = domain.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0) or {}
        except libvirt.libvirtError as e:
            if _code(e) == libvirt.VIR_ERR_OPERATION_INVALID:  # stopped meanwhile
                return ()
            raise map_libvirt_error(e, "Internal error on getting domain IPs") from None
        reserved = bool(v4)
        for interface in interfaces.values():
            for address in interface.get("addrs") or []:
                ipv4 = address.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4
                if ipv4 and reserved:
                    continue
                target = v4 if ipv4 else v6
                if address.get("addr") and address["addr"] not in target:
                    target.append(address["addr"])
        if not v4 and network is not None:
            try:
                leases = network.DHCPLeases()
            except libvirt.libvirtError:
                leases = []
            for lease in leases:
                if str(lease.get("mac", "")).lower() in macs and lease.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    if lease.get("ipaddr") and lease["ipaddr"] not in v4:
                        v4.append(lease["ipaddr"])
        return tuple(v4 + v6)

    def _t_find(self, conn: libvirt.virConnect, name: str) -> Instance | None:
        try:
            domain = conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if _not_found(e, libvirt.VIR_ERR_NO_DOMAIN):
                return None
            raise
        ips = self._addresses(conn, domain) if domain.isActive() else ()
        return Instance(str(domain.UUIDString()), name, ips)

    def _lookup(self, conn: libvirt.virConnect, instance_id: str) -> libvirt.virDomain | None:
        try:
            if _UUID.match(instance_id):
                return conn.lookupByUUIDString(str(uuidlib.UUID(instance_id)))
            return conn.lookupByName(instance_id)
        except libvirt.libvirtError as e:
            if _not_found(e, libvirt.VIR_ERR_NO_DOMAIN):
                return None
            raise

    def _t_delete(self, conn: libvirt.virConnect, instance_id: str) -> bool:
        domain = self._lookup(conn, instance_id)
        if domain is None:
            if not _UUID.match(instance_id):
                errors = self._remove_reservations(conn, instance_id, [])
                if errors:
                    raise TransientError(f"deleting instance {instance_id}: " + "; ".join(errors))
            return False
        errors = self._remove_domain(conn, domain)
        if errors:
            raise TransientError(f"deleting instance {instance_id}: " + "; ".join(errors))
        return True

    def _t_remove_by_name(self, conn: libvirt.virConnect, name: str) -> None:
        errors: list[str] = []
        try:
            domain = conn.lookupByName(name)
        except libvirt.libvirtError as e:
            if not _not_found(e, libvirt.VIR_ERR_NO_DOMAIN):
                raise
        else:
            errors = self._remove_domain(conn, domain)
        errors += self._remove_reservations(conn, name, [])
        pool = self._pool(conn)
        errors += self._delete_volumes(pool, (f"{name}-root.qcow2", f"{name}-cloudinit.iso"))
        if errors:
            raise TransientError(f"removing {name}: " + "; ".join(errors))

    def _remove_domain(self, conn: libvirt.virConnect, domain: libvirt.virDomain) -> list[str]:
        """Power off, delete the domain's own disks (`<name>-*` volumes), undefine, remove its DHCP reservation.
        Returns errors."""
        name = domain.name()
        errors: list[str] = []
        if domain.isActive():
            try:
                domain.destroy()
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_OPERATION_INVALID:
                    return [f"destroying domain {name}: {e}"]
        domain_xml = domain.XMLDesc(0)
        for path in file_disk_paths(domain_xml):
            try:
                volume = conn.storageVolLookupByPath(path)
                if not volume.name().startswith(f"{name}-"):
                    continue  # never a disk we did not make (the base image is only a backing store)
                volume.delete(0)
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    errors.append(f"deleting volume {path}: {e}")
        try:
            try:
                domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError as e:
                if _code(e) not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
                    raise
                domain.undefine()
        except libvirt.libvirtError as e:
            if _code(e) != libvirt.VIR_ERR_NO_DOMAIN:
                errors.append(f"undefining domain {name}: {e}")
        errors += self._remove_reservations(conn, name, interface_macs(domain_xml))
        return errors

    def _delete_volumes(self, pool: libvirt.virStoragePool, names: tuple[str, ...]) -> list[str]:
        errors = []
        for volume_name in names:
            try:
                pool.storageVolLookupByName(volume_name).delete(0)
            except libvirt.libvirtError as e:
                if _code(e) != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    errors.append(f"deleting volume {volume_name}: {e}")
        return errors


def _metadata_sandbox(domain_xml: str) -> str | None:
    element = ET.fromstring(domain_xml).find(f"metadata/{{{METADATA_NS}}}instance")
    return None if element is None else element.get("sandbox")
