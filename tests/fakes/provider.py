"""A test-only cloud provider (`--provider tests.fakes.provider:FakeProviderFactory`, name "fake").

Stands for a real IProvider (libvirt, aws, ...) in adaptor tests. Two modes:

- in memory (unit tests): instances are records in a dict; `hold_create` makes create_instance wait for
  the test (`release_create()`), `fail_create` makes it fail with a ProviderError.
- process mode (`--fake-state-dir DIR`, env FAKE_STATE_DIR): each instance is a real "VM" process
  (`python -m tests.fakes.vm`) serving a forwarder-compatible ttrpc endpoint (grpc.Health and an echo
  fallback, no TLS) on its own loopback address 127.77.x.y at the adaptor's forwarder port; instances
  are persisted as JSON files in DIR so they outlive a killed adaptor, and can be found by name.
  `--fake-create-delay` / `--fake-delete-delay` (env FAKE_CREATE_DELAY / FAKE_DELETE_DELAY, Go
  durations) slow the calls down so tests can kill the adaptor in the middle of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any, ClassVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from zope.interface import implementer

from caa.podvm_api.naming import instance_name
from caa.providers.interfaces import (
    Instance,
    InstanceSpec,
    InvalidConfig,
    IProvider,
    IProviderFactory,
    TransientError,
)
from caa.providers.options import ProviderOptions, parse_duration
from caa.reactors import INodeReactor


class FakeOptions(ProviderOptions):
    optParameters: ClassVar[list[list[Any]]] = [
        ["fake-state-dir", None, "", "Process mode: directory of instance records (VMs are processes)."],
        ["fake-create-delay", None, 0.0, "Delay of create_instance (Go duration).", parse_duration],
        ["fake-delete-delay", None, 0.0, "Delay of delete_instance (Go duration).", parse_duration],
        ["fake-forwarder-port", None, "15150", "Port the fake VMs listen on (the adaptor's forwarder port)."],
        ["fake-fail-image", None, "", "Image name whose creates fail with INVALID_CONFIG."],
        ["fake-verify-error", None, "", "verify_config fails with this message."],
        ["fake-create-delay-after", None, 0.0, "Delay after the VM exists, before create returns.", parse_duration],
        ["fake-delete-delay-after", None, 0.0, "Delay after the VM is gone, before delete returns.", parse_duration],
        ["fake-vm-boot-delay", None, 0.0, "Seconds a process VM waits before its forwarder listens.", parse_duration],
    ]
    envVars: ClassVar[dict[str, str]] = {
        "fake-state-dir": "FAKE_STATE_DIR", "fake-create-delay": "FAKE_CREATE_DELAY",
        "fake-delete-delay": "FAKE_DELETE_DELAY", "fake-forwarder-port": "FORWARDER_PORT",
        "fake-fail-image": "FAKE_FAIL_IMAGE", "fake-create-delay-after": "FAKE_CREATE_DELAY_AFTER",
        "fake-delete-delay-after": "FAKE_DELETE_DELAY_AFTER", "fake-vm-boot-delay": "FAKE_VM_BOOT_DELAY",
    }


@implementer(IProvider)
class FakeProvider:
    def __init__(self, clock: IReactorTime, state_dir: str = "", create_delay: float = 0.0,
                 delete_delay: float = 0.0, forwarder_port: int = 15150, fail_image: str = "",
                 create_delay_after: float = 0.0, delete_delay_after: float = 0.0, vm_boot_delay: float = 0.0
                 ) -> None:
        self.verify_error = ""
        self.create_delay_after = create_delay_after
        self.delete_delay_after = delete_delay_after
        self.vm_boot_delay = vm_boot_delay
        self.clock = clock
        self.state_dir = state_dir
        self.create_delay = create_delay
        self.delete_delay = delete_delay
        self.forwarder_port = forwarder_port
        self.fail_image = fail_image
        self.instances: dict[str, Instance] = {}
        self.user_data: dict[str, bytes] = {}
        #: the InstanceSpec of each created instance
        self.specs: dict[str, InstanceSpec] = {}
        self.calls: list[tuple[str, str]] = []
        self.hold_create = False
        self.fail_create: Exception | None = None
        self.fail_delete: Exception | None = None
        self.no_ips = False
        self._held: list[Deferred[None]] = []
        self._next = 1
        if state_dir:
            os.makedirs(state_dir, exist_ok=True)

    def instance_name(self, pod_name: str, sandbox_id: str) -> str:
        return instance_name(pod_name, sandbox_id)

    def release_create(self) -> None:
        held, self._held = self._held, []
        for d in held:
            d.callback(None)

    async def _create(self, pod_name: str, sandbox_id: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        name = self.instance_name(pod_name, sandbox_id)
        self.calls.append(("create", name))
        if self.hold_create:
            d: Deferred[None] = Deferred()
            self._held.append(d)
            await d
        if self.create_delay:
            await deferLater(self.clock, self.create_delay)
        if self.fail_create is not None:
            raise self.fail_create
        if self.fail_image and spec.image == self.fail_image:
            raise InvalidConfig(f"Error in creating volume: Can't retrieve volume {spec.image}")
        if self.state_dir:
            inst = self._spawn(name, user_data)
        else:
            ip = f"192.0.2.{self._next}"
            self._next += 1
            inst = Instance(id=f"i-{name}", name=name, ips=() if self.no_ips else (ip,))
        self.instances[inst.id] = inst
        self.user_data[inst.id] = user_data
        self.specs[inst.id] = spec
        if self.create_delay_after:
            await deferLater(self.clock, self.create_delay_after)
        return inst

    def create_instance(self, pod_name: str, sandbox_id: str, user_data: bytes,
                        spec: InstanceSpec) -> Deferred[Instance]:
        return Deferred.fromCoroutine(self._create(pod_name, sandbox_id, user_data, spec))

    # -- process mode --------------------------------------------------------------------------

    def _record_path(self, name: str) -> str:
        return os.path.join(self.state_dir, name + ".json")

    def _spawn(self, name: str, user_data: bytes) -> Instance:
        used = set()
        for f in os.listdir(self.state_dir):
            if f.endswith(".json"):
                with open(os.path.join(self.state_dir, f)) as fh:
                    used.add(json.load(fh)["ip"])
        n = 1
        while f"127.77.{n // 250}.{n % 250 + 1}" in used:
            n += 1
        ip = f"127.77.{n // 250}.{n % 250 + 1}"
        # Record the intent first so a killed adaptor still finds (and deletes) the VM by name.
        rec: dict[str, Any] = {"id": f"fake-{name}", "name": name, "ip": ip, "pid": 0}
        self._write(name, rec)
        ud_path = os.path.join(self.state_dir, name + ".user-data")
        with open(ud_path, "wb") as out:
            out.write(user_data)
        log = open(os.path.join(self.state_dir, name + ".log"), "wb")
        proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.vm", ip, str(self.forwarder_port),
                                 str(self.vm_boot_delay), ud_path],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        log.close()
        rec["pid"] = proc.pid
        self._write(name, rec)
        return Instance(id=rec["id"], name=name, ips=(ip,))

    def _write(self, name: str, rec: dict[str, Any]) -> None:
        tmp = self._record_path(name) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f)
        os.replace(tmp, self._record_path(name))

    def _records(self) -> list[dict[str, Any]]:
        out = []
        for f in sorted(os.listdir(self.state_dir)):
            if f.endswith(".json"):
                with open(os.path.join(self.state_dir, f)) as fh:
                    out.append(json.load(fh))
        return out

    # -- the rest of IProvider -----------------------------------------------------------------

    async def _delete(self, instance_id: str) -> None:
        self.calls.append(("delete", instance_id))
        if self.delete_delay:
            await deferLater(self.clock, self.delete_delay)
        if self.fail_delete is not None:
            raise self.fail_delete
        self.instances.pop(instance_id, None)
        if self.state_dir:
            for rec in self._records():
                if rec["id"] == instance_id:
                    if rec["pid"]:
                        try:
                            os.kill(rec["pid"], signal.SIGKILL)
                            os.waitpid(rec["pid"], os.WNOHANG)
                        except (ProcessLookupError, ChildProcessError):
                            pass
                    os.unlink(self._record_path(rec["name"]))
                    for suffix in (".user-data", ".log"):
                        try:
                            os.unlink(os.path.join(self.state_dir, rec["name"] + suffix))
                        except FileNotFoundError:
                            pass
        if self.delete_delay_after:
            await deferLater(self.clock, self.delete_delay_after)

    def delete_instance(self, instance_id: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._delete(instance_id))

    def find_instance(self, name: str) -> Deferred[Instance | None]:
        self.calls.append(("find", name))
        if self.state_dir:
            for rec in self._records():
                if rec["name"] == name:
                    return succeed(Instance(id=rec["id"], name=name, ips=(rec["ip"],)))
            return succeed(None)
        for inst in self.instances.values():
            if inst.name == name:
                return succeed(inst)
        return succeed(None)

    def verify_config(self) -> Deferred[None]:
        if self.verify_error:
            return Deferred.fromCoroutine(self._fail(self.verify_error))
        if self.state_dir and not os.path.isdir(self.state_dir):
            return Deferred.fromCoroutine(self._fail(f"state dir {self.state_dir} missing"))
        return succeed(None)

    async def _fail(self, msg: str) -> None:
        raise TransientError(msg)

    def teardown(self) -> Deferred[None]:
        return succeed(None)


@implementer(IProviderFactory)
class FakeProviderFactory:
    name = "fake"
    description = "Test-only provider: in-memory or process 'VMs' (tests/fakes/provider.py)."

    def options(self) -> FakeOptions:
        return FakeOptions()

    def create(self, reactor: INodeReactor, options: Any) -> IProvider:
        p = FakeProvider(reactor, state_dir=options["fake-state-dir"],
                            create_delay=options["fake-create-delay"], delete_delay=options["fake-delete-delay"],
                            forwarder_port=int(options["fake-forwarder-port"]),
                            fail_image=options["fake-fail-image"],
                            create_delay_after=options["fake-create-delay-after"],
                            delete_delay_after=options["fake-delete-delay-after"],
                            vm_boot_delay=options["fake-vm-boot-delay"])
        p.verify_error = options["fake-verify-error"]
        return p
