"""
Contracts between the adaptor and the clouds: `IProvider`, `IProviderFactory`, the values they exchange
(`InstanceSpec`, `Instance`) and the one error type they raise (`ProviderError`).

A provider creates and deletes one pod VM ("instance") at a time. It receives an `InstanceSpec` and the
user data bytes (the cloud-config text built by the adaptor) and never sees Kata or ttrpc. Every method
returns a `Deferred`; blocking cloud libraries run off the reactor thread inside the provider.

Error contract (spec-providers §1.8, fixed where upstream is weak):

- Every failure is a `ProviderError` whose `kind` says what the caller may do:
  `TRANSIENT` -> retry later (throttling, a busy pool, a lost connection);
  `QUOTA` -> the cloud has no room now (may succeed later; do not spin);
  `INVALID_CONFIG` -> the operator's configuration or the pod's request can never work (bad image,
  impossible size, type not allowed); never retry;
  `NOT_FOUND` -> the named object does not exist (only from lookups; `delete_instance` of a missing
  instance is a success).
- A failed `create_instance` removes whatever it made before failing (volumes, disks, domains, ISO). If
  that rollback itself fails, the error carries `instance_id` of the leftover so the caller can
  `delete_instance` it; otherwise `instance_id` is None.
- `delete_instance` is idempotent: deleting an unknown or already-deleted id succeeds.
- Instance names come from `caa.podvm_api.naming.instance_name` via `IProvider.instance_name`, so after
  a restart the adaptor can compute the name it journalled and call `find_instance(name)` to find a VM
  whose create was interrupted.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TYPE_CHECKING

from attrs import field, frozen
from zope.interface import Attribute, Interface

from caa.reactors import INodeReactor

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.python import usage


def string_tuple(values: Iterable[str]) -> tuple[str, ...]:
    """attrs converter: any iterable of strings as the tuple a frozen record keeps."""
    return tuple(values)


@frozen
class InstanceSpec:
    """
    What the pod asks for (spec-adaptor §5.3). Zero / empty means "not set, use the provider's default".

    instance_type: annotation io.katacontainers.config.hypervisor.machine_type.
    vcpus, memory_mib, gpus: annotations default_vcpus, default_memory (MiB), default_gpus.
    image: annotation io.katacontainers.config.hypervisor.image (provider-specific meaning: libvirt
        volume name, AMI id, ...).
    multi_nic: the adaptor's --ext-network-via-podvm.
    volumes: CSI block volume disk ids to attach at creation.
    arch: CPU architecture, when known (never set by the adaptor).
    """

    instance_type: str = ""
    vcpus: int = 0
    memory_mib: int = 0
    gpus: int = 0
    image: str = ""
    multi_nic: bool = False
    volumes: tuple[str, ...] = field(default=(), converter=string_tuple)
    arch: str = ""


@frozen
class Instance:
    """
    One pod VM as the provider knows it.

    id: the provider's stable identifier, what `delete_instance` takes (libvirt: domain UUID; local:
        the instance name).
    name: the instance name (`podvm-<pod>-<sid8>`).
    ips: addresses in order; ips[0] is the one the adaptor dials (forwarder port) and the VXLAN remote;
        ips[1] only in dedicated-interface mode. Empty only from `find_instance` of a VM still booting.
    """

    id: str
    name: str
    ips: tuple[str, ...] = field(default=(), converter=string_tuple)


class ErrorKind(enum.Enum):
    """What a caller may do about a `ProviderError`; see the module docstring."""

    NOT_FOUND = "not-found"
    QUOTA = "quota"
    INVALID_CONFIG = "invalid-config"
    TRANSIENT = "transient"


class ProviderError(Exception):
    """
    The only exception a provider's Deferreds fail with. `kind` is an `ErrorKind`; `message` names what
    failed (it reaches the pod's events, so keep upstream's wording where e2e tests match on it).
    `instance_id` is set only when a failed create left an instance behind that the caller must delete.
    """

    def __init__(self, kind: ErrorKind, message: str, instance_id: str | None = None) -> None:
        super().__init__(kind, message)
        self.kind = kind
        self.message = message
        self.instance_id = instance_id

    @property
    def retryable(self) -> bool:
        """True only for transient errors: the one kind the adaptor retries."""
        return self.kind is ErrorKind.TRANSIENT

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind.name}, {self.message!r}, instance_id={self.instance_id!r})"


class InstanceNotFound(ProviderError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.NOT_FOUND, message)


class QuotaExceeded(ProviderError):
    def __init__(self, message: str, instance_id: str | None = None) -> None:
        super().__init__(ErrorKind.QUOTA, message, instance_id)


class InvalidConfig(ProviderError):
    def __init__(self, message: str, instance_id: str | None = None) -> None:
        super().__init__(ErrorKind.INVALID_CONFIG, message, instance_id)


class TransientError(ProviderError):
    def __init__(self, message: str, instance_id: str | None = None) -> None:
        super().__init__(ErrorKind.TRANSIENT, message, instance_id)


class IProvider(Interface):
    """
    A live provider: creates and deletes pod VMs. Built by `IProviderFactory.create`. Safe to call
    concurrently for different instances.
    """

    def instance_name(pod_name: str, sandbox_id: str) -> str:
        """
        The name `create_instance(pod_name, sandbox_id, ...)` gives its VM (`podvm-<pod>-<sid8>`,
        sanitised, cut to the provider's limit). Pure; no I/O.
        """

    def create_instance(
        pod_name: str, sandbox_id: str, user_data: bytes, spec: InstanceSpec
    ) -> Deferred[Instance]:
        """
        Create and boot one VM named `instance_name(pod_name, sandbox_id)` that receives `user_data`
        (cloud-config text) through the provider's user-data channel, and wait until it has its IPs.
        Fires with an `Instance` whose `ips` is non-empty, or fails with `ProviderError` after removing
        what it made (see the module docstring). Has its own overall deadline; cancelling the Deferred
        stops waiting and rolls back.
        """

    def delete_instance(instance_id: str) -> Deferred[None]:
        """
        Stop and remove the instance and everything created for it (disks, user-data media). Succeeds
        when the instance does not exist. Fails with `ProviderError` (usually TRANSIENT) otherwise.
        """

    def find_instance(name: str) -> Deferred[Instance | None]:
        """
        Look up an instance by its name: fires with the `Instance` (ips possibly empty while it boots)
        or None when no instance has that name. Used by the adaptor's recovery after a restart.
        """

    def verify_config() -> Deferred[None]:
        """
        Check the configuration and reach the cloud cheaply (open the connection, find the pool, the
        network, the base image...). Fails with `ProviderError(INVALID_CONFIG or TRANSIENT)` and a
        one-line message. The adaptor calls it at start and refuses to start on failure.
        """

    def teardown() -> Deferred[None]:
        """Release long-lived resources (connections, threads). Instances are left running."""


class IProviderFactory(Interface):
    """
    One per provider kind, found by name in the registry (`caa.providers.registry`). Cheap to build;
    building does no I/O.
    """

    name = Attribute("The provider's name as given to --provider / CLOUD_PROVIDER, e.g. 'libvirt'.")
    description = Attribute("One line for --help.")

    def options() -> usage.Options:
        """
        A fresh `caa.providers.options.ProviderOptions` instance holding this provider's flags under
        upstream's names with their env vars (default < env < flag). Env values are read when the
        instance is built; parse the command line with `parseOptions(argv)`.
        """

    def create(reactor: INodeReactor, options: usage.Options) -> IProvider:
        """
        Build the provider from parsed options. No I/O here (call `verify_config()` for that);
        raises `InvalidConfig` for options that can never work.
        """
