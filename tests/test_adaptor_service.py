"""Unit tests of the hypervisor service: lifecycle, errors, rollback, journal recovery (fakes, Clock)."""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from caa.adaptor.errors import SandboxError
from caa.adaptor.interfaces import (
    IAgentProxy,
    IAgentProxyFactory,
    IAgentTLS,
    IPodNetworking,
    ISandboxStore,
    SandboxRecord,
    SandboxState,
)
from caa.adaptor.metrics import REGISTRY
from caa.adaptor.rpc import HypervisorHandlers, to_ttrpc
from caa.adaptor.service import CloudService, ServiceConfig
from caa.adaptor.store import SandboxStore
from caa.proto import hypervisor_pb2
from caa.providers.interfaces import InvalidConfig, IProvider, IProviderFactory, TransientError
from caa.ttrpc import CallContext, Code, TTRPCError
from tests.fakes.adaptor import FakeNetworking, FakeProxyFactory, FakeTLS
from tests.fakes.provider import FakeProvider, FakeProviderFactory

SID = "3f2a9c81e0" + "ab" * 27


def ann(pod: str = "nginx-7d9f", ns: str = "default", **extra: str) -> dict[str, str]:
    d = {"io.kubernetes.cri.sandbox-name": pod, "io.kubernetes.cri.sandbox-namespace": ns}
    d.update(extra)
    return d


class FakesAreVerified(SynchronousTestCase):
    def test_fakes(self) -> None:
        proxies = FakeProxyFactory()
        verifyObject(IAgentProxyFactory, proxies)
        verifyObject(IAgentProxy, proxies.new("x", "/tmp/x", ()))
        verifyObject(IPodNetworking, FakeNetworking())
        verifyObject(IAgentTLS, FakeTLS())
        verifyObject(IProvider, FakeProvider(Clock()))
        verifyObject(IProviderFactory, FakeProviderFactory())
        verifyObject(ISandboxStore, SandboxStore(self.mktemp()))


class Harness(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.provider = FakeProvider(self.clock)
        self.proxies = FakeProxyFactory()
        self.net = FakeNetworking()
        self.tls = FakeTLS()
        self.pods_dir = os.path.abspath(self.mktemp())
        self.store = SandboxStore(self.pods_dir)
        self.netns = os.path.abspath(self.mktemp())
        open(self.netns, "w").close()
        self.svc = self.make()

    def make(self, **cfg: Any) -> CloudService:
        return CloudService(self.clock, self.provider, self.proxies, self.store, self.net, self.tls,
                            ServiceConfig(pods_dir=self.pods_dir, **cfg), wallclock=self.clock.seconds)

    def create(self, sid: str = SID, **kw: str) -> str:
        return self.successResultOf(Deferred.fromCoroutine(self.svc.create_vm(sid, ann(**kw), self.netns)))

    def start(self, sid: str = SID) -> Deferred[None]:
        return Deferred.fromCoroutine(self.svc.start_vm(sid, None))

    def stop(self, sid: str = SID) -> Deferred[None]:
        return Deferred.fromCoroutine(self.svc.stop_vm(sid))

    def error(self, d: Deferred[Any]) -> TTRPCError:
        """The ttrpc status the handlers answer for the service's failure."""
        f = self.failureResultOf(d, SandboxError, TTRPCError)
        e = to_ttrpc(f.value)
        assert isinstance(e, TTRPCError)
        return e

    def record(self, sid: str = SID) -> SandboxRecord:
        rec = self.successResultOf(self.store.get(sid))
        assert rec is not None
        return rec

    def records(self) -> list[SandboxRecord]:
        return self.successResultOf(self.store.load_all())

    def assertClean(self, sid: str = SID) -> None:
        self.assertEqual(self.provider.instances, {})
        self.assertNotIn(sid, self.net.tunnels)
        self.assertNotIn(sid, self.net.vnis)
        self.assertFalse(os.path.exists(os.path.join(self.pods_dir, sid)))
        self.assertEqual(self.records(), [])
        self.assertEqual(self.proxies.live(sid), [])


class CreateVMTests(Harness):
    def test_create(self) -> None:
        path = self.create()
        self.assertEqual(path, os.path.join(self.pods_dir, SID, "agent.ttrpc"))
        rec = self.record()
        self.assertEqual((rec.state, rec.pod_name, rec.pod_namespace), (SandboxState.CREATED, "nginx-7d9f", "default"))
        self.assertEqual(rec.server_name, "podvm-nginx-7d9f-3f2a9c81")
        self.assertEqual(rec.vni, 555000)
        d = os.path.join(self.pods_dir, SID)
        self.assertEqual(stat.S_IMODE(os.stat(d).st_mode), 0o700)
        for name in ("apf.json", "user-data", "sandbox.json"):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(d, name)).st_mode), 0o600, name)
        with open(os.path.join(d, "apf.json")) as f:
            apf = json.load(f)
        self.assertEqual(apf["pod-name"], "nginx-7d9f")
        self.assertIn("podvm-nginx-7d9f-3f2a9c81", apf["tls-server-cert"])
        self.assertIn("tls-client-ca", apf)
        self.assertEqual(apf["pod-network"]["vxlan-id"], 555000)
        with open(os.path.join(d, "user-data")) as f:
            self.assertTrue(f.read().startswith("#cloud-config\n\nwrite_files:\n  - path: /run/peerpod/apf.json\n"))

    def test_csi_volumes_in_spec_and_journal(self) -> None:
        from caa.adaptor.directvolumes import encode_name

        uid = "9b1d2c3e-0000-4000-8000-00000000aaaa"
        volumes_dir = os.path.abspath(self.mktemp())
        paths = [f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/pv{i}/mount" for i in range(3)]
        infos: list[dict[str, Any]] = [{"device": "/dev/sdb", "metadata": {"cloud-volume-path": "vol-0aaa0000"}},
                 {"fstype": "ext4"},  # names no disk: skipped, the pod still starts
                 {"device": "disk-two"}]
        for path, info in zip(paths, infos, strict=True):
            os.makedirs(os.path.join(volumes_dir, encode_name(path)))
            with open(os.path.join(volumes_dir, encode_name(path), "mountInfo.json"), "w") as f:
                json.dump(info, f)
        self.svc = self.make(direct_volumes_dir=volumes_dir)
        self.create(**{"io.kubernetes.cri.sandbox-uid": uid})
        order = [info for _, info in sorted(zip(paths, infos, strict=True), key=lambda pi: encode_name(pi[0]))]
        want = tuple(i.get("metadata", {}).get("cloud-volume-path") or i["device"] for i in order if "device" in i)
        self.assertEqual(self.record().spec.volumes, want)
        self.svc = self.make(direct_volumes_dir=volumes_dir)  # a restarted adaptor reads them from the journal
        self.successResultOf(Deferred.fromCoroutine(self.svc.recover()))
        self.successResultOf(self.start())
        [spec] = self.provider.specs.values()
        self.assertEqual(spec.volumes, want)
        # another pod's volumes are not this pod's
        other = "1" + SID[1:]
        self.create(other, pod="other", **{"io.kubernetes.cri.sandbox-uid": "another-uid"})
        self.assertEqual(self.record(other).spec.volumes, ())

    def test_every_proxy_gets_the_journalled_attach_order(self) -> None:
        """CreateVM's proxy, a rolled-back start's fresh one and recovery's rebuilt one all number cloud volumes by
        the record's disks, whatever the directory lists later."""
        from caa.adaptor.directvolumes import encode_name

        uid = "9b1d2c3e-0000-4000-8000-00000000bbbb"
        volumes_dir = os.path.abspath(self.mktemp())

        def volume(pv: str, disk: str) -> None:
            path = f"/var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~csi/{pv}/mount"
            os.makedirs(os.path.join(volumes_dir, encode_name(path)))
            with open(os.path.join(volumes_dir, encode_name(path), "mountInfo.json"), "w") as f:
                json.dump({"device": disk}, f)

        volume("pv-a", "disk-a")
        volume("pv-b", "disk-b")
        self.svc = self.make(direct_volumes_dir=volumes_dir)
        self.create(**{"io.kubernetes.cri.sandbox-uid": uid})
        attached = self.record().spec.volumes
        self.assertEqual(sorted(attached), ["disk-a", "disk-b"])
        self.assertEqual([p.volumes for p in self.proxies.proxies], [attached])
        volume("pv-0", "disk-late")  # the CSI driver adds a volume after CreateVM
        self.proxies.fail_start = "connection refused"
        self.error(self.start())  # rolled back: a fresh proxy for the next StartVM
        self.assertEqual([p.volumes for p in self.proxies.proxies], [attached, attached])
        self.svc = self.make(direct_volumes_dir=volumes_dir)  # a restarted adaptor rebuilds it from the journal
        self.successResultOf(Deferred.fromCoroutine(self.svc.recover()))
        self.assertEqual([p.volumes for p in self.proxies.proxies], [attached] * 3)

    def test_errors(self) -> None:
        cases = [
            ("", ann(), Code.INVALID_ARGUMENT, "empty sandbox id"),
            (SID, {"io.kubernetes.cri.sandbox-namespace": "x"}, Code.INVALID_ARGUMENT,
             "io.kubernetes.cri.sandbox-name"),
            (SID, {"io.kubernetes.cri.sandbox-name": "x"}, Code.INVALID_ARGUMENT,
             "io.kubernetes.cri.sandbox-namespace"),
            ("../x", ann(), Code.INVALID_ARGUMENT, "invalid sandbox id '../x'"),
        ]
        for sid, a, code, text in cases:
            e = self.error(Deferred.fromCoroutine(self.svc.create_vm(sid, a, self.netns)))
            self.assertEqual(e.code, code)
            self.assertIn(text, e.message)
        self.assertEqual(self.records(), [])

    def test_duplicate(self) -> None:
        self.create()
        e = self.error(Deferred.fromCoroutine(self.svc.create_vm(SID, ann(), self.netns)))
        self.assertEqual(e.code, Code.ALREADY_EXISTS)
        self.assertEqual(e.message, f"adding sandbox: sandbox {SID} already exists")

    def test_inspect_fails(self) -> None:
        self.net.fail_inspect = "no such netns"
        e = self.error(Deferred.fromCoroutine(self.svc.create_vm(SID, ann(), "/nope")))
        self.assertEqual(e.message, "failed to inspect netns /nope: no such netns")
        self.assertClean()

    def test_crio_name(self) -> None:
        self.create(pod="k8s_web_ns_uid_0")
        rec = self.record()
        self.assertEqual(rec.pod_name, "web")


class StartStopTests(Harness):
    def gauge(self) -> dict[str, float]:
        return {s.value: REGISTRY.get_sample_value("caa_sandboxes", {"state": s.value}) or 0.0 for s in SandboxState}

    def test_lifecycle(self) -> None:
        self.create()
        self.assertEqual({k: v for k, v in self.gauge().items() if v}, {"created": 1.0})
        self.successResultOf(self.start())
        self.assertEqual({k: v for k, v in self.gauge().items() if v}, {"running": 1.0})
        rec = self.record()
        self.assertEqual(rec.state, SandboxState.RUNNING)
        self.assertEqual(rec.ips, ("192.0.2.1",))
        self.assertEqual(self.net.tunnels[SID], ("192.0.2.1",))
        [proxy] = self.proxies.live(SID)
        assert proxy.started is not None
        self.assertEqual(proxy.started[:2], (("192.0.2.1", 15150), "podvm-nginx-7d9f-3f2a9c81"))
        self.assertEqual(proxy.started[2], 300.0)
        self.assertIn(b"#cloud-config", self.provider.user_data[rec.instance_id])
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            self.svc.get_info("nginx-7d9f", "default", False))), rec.instance_id)
        self.successResultOf(self.start())  # idempotent
        self.successResultOf(self.stop())
        self.assertClean()
        self.assertEqual({k: v for k, v in self.gauge().items() if v}, {})
        e = self.error(self.stop())
        self.assertEqual((e.code, e.message), (Code.NOT_FOUND, f"stopping VM: sandbox {SID} does not exist"))

    def test_unknown(self) -> None:
        e = self.error(self.start("nope"))
        self.assertEqual((e.code, e.message), (Code.NOT_FOUND, "getting sandbox: sandbox nope does not exist"))

    def test_provider_fails(self) -> None:
        self.create()
        self.provider.fail_create = InvalidConfig("Error in creating volume: Can't retrieve volume x")
        e = self.error(self.start())
        self.assertEqual(e.code, Code.INVALID_ARGUMENT)
        self.assertEqual(e.message, "creating an instance : Error in creating volume: Can't retrieve volume x")
        rec = self.record()
        self.assertEqual(rec.state, SandboxState.CREATED)
        self.successResultOf(self.stop())
        self.assertClean()

    def test_provider_leftover_deleted(self) -> None:
        self.create()
        self.provider.fail_create = TransientError("boom", instance_id="i-left")
        self.error(self.start())
        self.assertIn(("delete", "i-left"), self.provider.calls)

    def test_no_ips(self) -> None:
        self.create()
        self.provider.no_ips = True
        e = self.error(self.start())
        self.assertEqual(e.message, "instance IP is not available")
        self.assertEqual(self.provider.instances, {})

    def test_tunnel_fails(self) -> None:
        self.create()
        self.net.fail_setup = "EEXIST"
        e = self.error(self.start())
        self.assertEqual(e.message, f"setting up pod network tunnel on netns {self.netns}: EEXIST")
        self.assertEqual(self.provider.instances, {})
        self.assertIn(("teardown", SID), self.net.calls)
        self.net.fail_setup = None
        self.successResultOf(self.start())  # a retry works
        self.successResultOf(self.stop())
        self.assertClean()

    def test_proxy_fails(self) -> None:
        self.create()
        self.proxies.fail_start = "connection refused"
        e = self.error(self.start())
        self.assertEqual(e.code, Code.UNAVAILABLE)
        self.assertIn("failed to establish agent proxy connection to 192.0.2.1:15150", e.message)
        self.assertEqual(self.provider.instances, {})
        self.assertNotIn(SID, self.net.tunnels)
        self.successResultOf(self.stop())
        self.assertClean()

    def test_deadline_bounds_proxy(self) -> None:
        self.create()
        self.clock.advance(100)
        self.successResultOf(Deferred.fromCoroutine(self.svc.start_vm(SID, 160.0)))
        [proxy] = self.proxies.live(SID)
        assert proxy.started is not None
        self.assertEqual(proxy.started[2], 160.0)

    def test_stop_during_start(self) -> None:
        self.create()
        self.provider.hold_create = True
        d = self.start()
        self.assertNoResult(d)
        s = self.stop()
        self.provider.release_create()
        self.failureResultOf(d)
        self.successResultOf(s)
        self.assertClean()

    def test_stop_while_proxy_dials(self) -> None:
        self.create()
        self.proxies.auto_ready = False
        d = self.start()
        self.assertNoResult(d)
        self.successResultOf(self.stop())
        self.failureResultOf(d)
        self.assertClean()

    def test_delete_failure_retried_by_sweep(self) -> None:
        self.create()
        self.successResultOf(self.start())
        self.provider.fail_delete = TransientError("throttled")
        self.successResultOf(self.stop())
        rec = self.record()
        self.assertEqual(rec.state, SandboxState.ORPHAN)
        self.assertEqual(self.net.tunnels, {})  # everything else is torn down
        # an orphan is gone for the shim; its id stays taken until the VM is deleted
        e = self.error(self.stop())
        self.assertEqual((e.code, e.message), (Code.NOT_FOUND, f"stopping VM: sandbox {SID} does not exist"))
        self.assertEqual(self.error(self.start()).code, Code.NOT_FOUND)
        self.assertEqual(self.error(Deferred.fromCoroutine(self.svc.create_vm(SID, ann(), self.netns))).code,
                         Code.ALREADY_EXISTS)
        self.successResultOf(Deferred.fromCoroutine(self.svc.sweep()))  # still failing: stays an orphan
        self.assertEqual(self.record().state, SandboxState.ORPHAN)
        self.provider.fail_delete = None
        self.successResultOf(Deferred.fromCoroutine(self.svc.sweep()))
        self.assertClean()

    def test_fifty_concurrent(self) -> None:
        sids = [f"{i:02d}" + "c" * 62 for i in range(50)]
        self.provider.hold_create = True
        for i, sid in enumerate(sids):
            self.create(sid, pod=f"pod-{i}")
        starts = [self.start(sid) for sid in sids]
        self.assertEqual(len([c for c in self.provider.calls if c[0] == "create"]), 50)
        self.provider.release_create()
        for d in starts:
            self.successResultOf(d)
        self.assertEqual(len(set(self.net.vnis.values())), 50)
        for d in [self.stop(sid) for sid in sids]:
            self.successResultOf(d)
        self.assertEqual(self.provider.instances, {})
        self.assertEqual(self.records(), [])


class SandboxIdTests(Harness):
    """Bug 7b: ids are checked before anything touches the file system, over the ttrpc handlers."""

    def call(self, method: str, sid: str) -> TTRPCError:
        handlers = HypervisorHandlers(self.svc)
        ctx = CallContext(clock=self.clock, service="hypervisor.Hypervisor", method=method, stream_id=1)
        d: Deferred[Any]
        if method == "CreateVM":
            d = Deferred.fromCoroutine(handlers.create_vm(ctx, hypervisor_pb2.CreateVMRequest(
                id=sid, annotations=ann(), networkNamespacePath=self.netns)))
        elif method == "StartVM":
            d = Deferred.fromCoroutine(handlers.start_vm(ctx, hypervisor_pb2.StartVMRequest(id=sid)))
        else:
            d = Deferred.fromCoroutine(handlers.stop_vm(ctx, hypervisor_pb2.StopVMRequest(id=sid)))
        f = self.failureResultOf(d, TTRPCError)
        assert isinstance(f.value, TTRPCError)
        return f.value

    def test_invalid_ids(self) -> None:
        pattern = "(should match ^[a-zA-Z0-9][a-zA-Z0-9_.-]+$)"
        cases = [
            ("", "empty sandbox id"),
            ("ab\0cd", f"invalid sandbox id 'ab\\x00cd' {pattern}"),
            ("a" * 10240, "invalid sandbox id 'aaaaaaaaaaaaaaaa'... (length 10240): greater than maximum length "
                          "(76 characters)"),
            ("../x", f"invalid sandbox id '../x' {pattern}"),
            ("a/b", f"invalid sandbox id 'a/b' {pattern}"),
            (".", f"invalid sandbox id '.' {pattern}"),
            ("..", f"invalid sandbox id '..' {pattern}"),
            (".hidden", f"invalid sandbox id '.hidden' {pattern}"),
            ("ab\n", f"invalid sandbox id 'ab\\n' {pattern}"),
            ("x", f"invalid sandbox id 'x' {pattern}"),
        ]
        for method in ("CreateVM", "StartVM", "StopVM"):
            for sid, text in cases:
                e = self.call(method, sid)
                self.assertEqual((e.code, e.message), (Code.INVALID_ARGUMENT, text), (method, sid[:20]))
        self.assertEqual(os.listdir(self.pods_dir), [])
        self.assertEqual(self.net.calls, [])

    def test_valid_ids(self) -> None:
        for sid in (SID, "a" * 76, "pod_1.b-c"):
            self.create(sid, pod=f"p{len(sid)}")
        self.assertEqual(len(self.records()), 3)

    def test_vm_name_is_a_dns_label_for_any_valid_id(self) -> None:
        """Bug: an id whose 8-character prefix ends in "-" (or "." / "_") made a name no cloud accepts."""
        label = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
        for sid in ("abcdefg-12345", "abcdef._9", "ABCDEFG_x"):
            self.create(sid, pod="Web_Server-")
            self.successResultOf(self.start(sid))
            rec = self.record(sid)
            self.assertRegex(rec.server_name, label)
            [proxy] = self.proxies.live(sid)
            assert proxy.started is not None
            self.assertEqual(proxy.started[1], rec.server_name)  # the certificate name the proxy verifies


class GetInfoTests(Harness):
    def test_not_found(self) -> None:
        e = self.error(Deferred.fromCoroutine(self.svc.get_info("p", "ns", False)))
        self.assertEqual((e.code, e.message), (Code.NOT_FOUND, "VM ID for ns:p was not found"))

    def test_wait_for_id(self) -> None:
        self.create()
        d = Deferred.fromCoroutine(self.svc.get_info("nginx-7d9f", "default", True))
        self.assertNoResult(d)
        self.provider.hold_create = True
        start = self.start()
        self.assertNoResult(d)
        self.provider.release_create()
        self.successResultOf(start)
        self.assertEqual(self.successResultOf(d), "i-podvm-nginx-7d9f-3f2a9c81")

    def test_wait_cancelled(self) -> None:
        d = Deferred.fromCoroutine(self.svc.get_info("p", "ns", True))
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(len(self.svc.instance_known), 0)


class RecoveryTests(Harness):
    def restart(self) -> None:
        self.proxies = FakeProxyFactory()
        self.svc = self.make()
        self.successResultOf(Deferred.fromCoroutine(self.svc.recover()))

    def test_running_readopted(self) -> None:
        path = self.create()
        self.successResultOf(self.start())
        self.restart()
        [proxy] = self.proxies.live(SID)
        self.assertEqual(proxy.socket_path, path)
        self.assertIn(SID, self.net.tunnels)
        self.assertEqual(len(self.provider.instances), 1)
        self.successResultOf(self.stop())
        self.assertClean()

    def test_created_kept(self) -> None:
        self.create()
        self.restart()
        self.successResultOf(self.start())
        self.successResultOf(self.stop())
        self.assertClean()

    def test_interrupted_create_rolled_back(self) -> None:
        self.create()
        self.provider.hold_create = True
        self.start()
        self.provider.hold_create = False
        self.provider.release_create()  # the VM exists but the old process "died" before journalling it
        rec = self.record()
        self.successResultOf(self.store.put(rec.evolve(state=SandboxState.CREATE_INTENT, instance_id="", ips=())))
        self.restart()
        self.assertIn(("find", "podvm-nginx-7d9f-3f2a9c81"), self.provider.calls)
        self.assertEqual(self.provider.instances, {})
        rec = self.record()
        self.assertEqual(rec.state, SandboxState.CREATED)
        self.successResultOf(self.stop())
        self.assertClean()

    def test_tunnel_intent_rolled_back(self) -> None:
        self.create()
        self.successResultOf(self.start())
        rec = self.record()
        self.successResultOf(self.store.put(rec.evolve(state=SandboxState.TUNNEL_INTENT)))
        self.restart()
        self.assertEqual(self.provider.instances, {})
        self.assertNotIn(SID, self.net.tunnels)
        self.successResultOf(self.stop())
        self.assertClean()

    def test_stop_intent_finished(self) -> None:
        self.create()
        self.successResultOf(self.start())
        rec = self.record()
        self.successResultOf(self.store.put(rec.evolve(state=SandboxState.STOPPING)))
        self.restart()
        self.assertClean()

    def test_pod_gone_cleaned(self) -> None:
        self.create()
        self.successResultOf(self.start())
        os.unlink(self.netns)
        self.restart()
        self.assertClean()


class StrayAndSweepTests(Harness):
    def test_stray_dir_removed(self) -> None:
        os.makedirs(os.path.join(self.pods_dir, "half"))
        open(os.path.join(self.pods_dir, "half", "apf.json"), "w").close()
        self.create()
        self.svc = self.make()
        self.successResultOf(Deferred.fromCoroutine(self.svc.recover()))
        self.assertFalse(os.path.exists(os.path.join(self.pods_dir, "half")))
        self.assertEqual([r.sandbox_id for r in self.records()], [SID])

    def test_pod_gone_swept(self) -> None:
        self.create()
        self.successResultOf(self.start())
        self.successResultOf(Deferred.fromCoroutine(self.svc.sweep()))
        self.assertEqual(len(self.provider.instances), 1)  # pod still there: untouched
        os.unlink(self.netns)
        self.successResultOf(Deferred.fromCoroutine(self.svc.sweep()))
        self.assertClean()


class ReleaseUnownedTests(SynchronousTestCase):
    def test_release(self) -> None:
        from types import SimpleNamespace

        from caa.adaptor.adapters import NodeNetworking
        from caa.network.vni import MemoryVniStore, VniAllocator

        alloc = VniAllocator(MemoryVniStore())
        a, b = alloc.allocate("live"), alloc.allocate("crashed")
        alloc.reconcile([555100])  # found on the system, owner unknown: left to the tunnel sweep
        net = NodeNetworking(SimpleNamespace(allocator=alloc))  # type: ignore[arg-type]
        self.assertEqual(net.release_unowned(["live"]), [b])
        self.assertEqual(set(alloc.allocated()), {a, 555100})
