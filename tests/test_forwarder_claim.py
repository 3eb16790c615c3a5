"""The unclaimed forwarder of a warm-pool VM on real sockets: one Claim from the adaptor, then the pod's
network and certificate; every refusal of issue 16 (second claim, reused or wrong token, another VM's name,
no adaptor certificate, agent calls before the claim)."""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXClientEndpoint

from caa import tls
from caa.forwarder.claim import ClaimState
from caa.forwarder.config import ForwarderConfig
from caa.forwarder.daemon import ForwarderService, StartupError, TLSSettings, build_server_tls
from caa.podvm_api import claim as claim_format
from caa.podvm_api.apf import APFConfig
from caa.proto import podvm_pb2
from caa.ttrpc import Code, TTRPCError
from tests.test_forwarder_relay import NETNS, POD_NETWORK, FakePodNetwork, ForwarderTestBase, reactor


class ClaimTestBase(ForwarderTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.vm = f"pool-vm-{os.getpid()}"
        self.pool_pair = self.ca.issue_server_certificate(self.vm)
        self.token = claim_format.new_token()
        # The pod's certificate comes from another CA, so a client tells which one the forwarder serves.
        self.pod_ca = tls.CertificateAuthority.create()
        self.pod_pair = self.pod_ca.issue_server_certificate(self.vm)
        self.network = FakePodNetwork()

    def bootstrap(self) -> ForwarderConfig:
        return claim_format.bootstrap_apf(self.vm, self.pool_pair.cert_pem.decode(),
                                          self.pool_pair.key_pem.decode(), self.client_pair.cert_pem.decode(),
                                          self.token)

    def pod_apf(self, **extra: Any) -> str:
        fields: dict[str, Any] = {"pod_name": "web", "pod_namespace": "default",
                                  "tls_server_cert": self.pod_pair.cert_pem.decode(),
                                  "tls_server_key": self.pod_pair.key_pem.decode(),
                                  "pod_network": dict(POD_NETWORK), **extra}
        return APFConfig(**fields).to_json()

    async def start_pool_forwarder(self, use_tls: bool = True) -> ForwarderService:
        config = self.bootstrap()
        opts = build_server_tls(TLSSettings(), config) if use_tls else None
        svc = ForwarderService(
            reactor, config, TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            UNIXClientEndpoint(reactor, self.agent_path, timeout=2), NETNS,
            tls_options=(lambda: opts) if opts is not None else None, pod_network=self.network,
            environ={}, peerpod_dir=self.dir)
        svc.agent.wait_timeout = 5
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await svc.when_ready()
        return svc

    async def dial_pool(self, svc: ForwarderService, **kw: Any) -> Any:
        return await self.dial(svc, server_name=self.vm, **kw)

    def request(self, **kw: Any) -> podvm_pb2.ClaimRequest:
        fields: dict[str, Any] = {"vm_name": self.vm, "token": self.token, "apf_json": self.pod_apf(),
                                  "auth_json": "", "initdata_digest": "", **kw}
        return podvm_pb2.ClaimRequest(**fields)

    async def claim(self, client: Any, req: podvm_pb2.ClaimRequest | None = None) -> podvm_pb2.ClaimResponse:
        resp: podvm_pb2.ClaimResponse = await client.call(
            claim_format.SERVICE, claim_format.METHOD, req or self.request(), podvm_pb2.ClaimResponse, timeout=5)
        return resp

    async def refused(self, client: Any, req: podvm_pb2.ClaimRequest, code: Code) -> TTRPCError:
        try:
            await self.claim(client, req)
        except TTRPCError as e:
            self.assertEqual(e.code, code, str(e))
            return e
        self.fail("the claim was accepted")


class ClaimTests(ClaimTestBase):
    async def test_claim_sets_up_network_switches_certificate_and_relays(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        client = await self.dial_pool(svc)
        self.assertEqual(self.network.calls, [])  # no pod network before the claim
        auth = '{"auths":{"quay.io":{"auth":"dXNlcjpwYXNz"}}}'
        resp = await self.claim(client, self.request(auth_json=auth))
        self.assertEqual(resp.initdata_digest, "")
        self.assertEqual(self.network.calls, [("setup", NETNS)])
        assert svc.claim_gate is not None
        self.assertIs(svc.claim_gate.state, ClaimState.CLAIMED)
        auth_path = os.path.join(self.dir, "auth.json")
        with open(auth_path) as f:
            self.assertEqual(f.read(), auth)
        self.assertEqual(stat.S_IMODE(os.stat(auth_path).st_mode), 0o600)
        # New connections get the pod's certificate: a client trusting only the pool CA is refused now,
        # one trusting the pod's CA is relayed to the agent.
        try:
            stale = await self.dial_pool(svc)
            await self.check(stale, timeout=3)
        except Exception:
            pass
        else:
            self.fail("the pool certificate is still served after the claim")
        pod_client = await self.dial_pool(svc, ca_pem=self.pod_ca.cert_pem)
        await self.check(pod_client)
        self.assertIn("Check", self.agent.methods())
        await svc.stopService()
        self.assertEqual(self.network.calls, [("setup", NETNS), ("teardown", NETNS)])

    async def test_before_claim_the_pod_certificate_is_not_served(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        try:
            client = await self.dial_pool(svc, ca_pem=self.pod_ca.cert_pem)
            await self.claim(client)
        except Exception:
            pass
        else:
            self.fail("the pod certificate was served before the claim")

    async def test_initdata_digest_returned_and_checked(self) -> None:
        await self.start_agent()
        with open(os.path.join(self.dir, "initdata.digest"), "w") as f:
            f.write("ab" * 32)
        svc = await self.start_pool_forwarder()
        client = await self.dial_pool(svc)
        e = await self.refused(client, self.request(initdata_digest="cd" * 32), Code.FAILED_PRECONDITION)
        self.assertIn("booted with", e.message)
        resp = await self.claim(client, self.request(initdata_digest="ab" * 32))
        self.assertEqual(resp.initdata_digest, "ab" * 32)


class RefusalTests(ClaimTestBase):
    async def test_second_claim_refused(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        client = await self.dial_pool(svc)
        await self.claim(client)
        e = await self.refused(client, self.request(), Code.FAILED_PRECONDITION)
        self.assertIn("claimed once", e.message)
        self.assertEqual(self.network.calls, [("setup", NETNS)])

    async def test_reused_token_on_a_new_connection_refused(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        await self.claim(await self.dial_pool(svc))
        again = await self.dial_pool(svc, ca_pem=self.pod_ca.cert_pem)
        await self.refused(again, self.request(apf_json=self.pod_apf(pod_name="other")), Code.FAILED_PRECONDITION)

    async def test_wrong_token_refused_and_changes_nothing(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        client = await self.dial_pool(svc)
        await self.refused(client, self.request(token=claim_format.new_token()), Code.PERMISSION_DENIED)
        await self.refused(client, self.request(token=b""), Code.PERMISSION_DENIED)
        # the digest itself (what the user data holds) is no token either
        digest = claim_format.token_digest(self.token).encode()
        await self.refused(client, self.request(token=digest), Code.PERMISSION_DENIED)
        assert svc.claim_gate is not None
        self.assertIs(svc.claim_gate.state, ClaimState.UNCLAIMED)
        self.assertEqual(self.network.calls, [])
        await self.claim(client)  # the adaptor's own claim still works

    async def test_other_vms_name_refused(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        client = await self.dial_pool(svc)
        e = await self.refused(client, self.request(vm_name="pool-vm-other"), Code.PERMISSION_DENIED)
        self.assertIn("pool-vm-other", e.message)

    async def test_claim_without_the_adaptor_certificate_refused(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        for pair in (None, tls.make_client_certificate()):
            try:
                client = await self.dial_pool(svc, client_pair=pair)
                await self.claim(client)
            except TTRPCError as e:
                self.assertNotEqual(e.code, Code.OK)
            except Exception:
                pass
            else:
                self.fail(f"a claim without the adaptor's certificate was accepted ({pair!r})")
        assert svc.claim_gate is not None
        self.assertIs(svc.claim_gate.state, ClaimState.UNCLAIMED)

    async def test_agent_calls_before_claim_refused(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        client = await self.dial_pool(svc)
        try:
            await self.check(client)
        except TTRPCError as e:
            self.assertEqual(e.code, Code.FAILED_PRECONDITION)
            self.assertIn("before the claim", e.message)
        else:
            self.fail("an agent call was relayed before the claim")
        self.assertEqual(self.agent.methods(), [])

    async def test_bad_pod_apf_refused(self) -> None:
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        client = await self.dial_pool(svc)
        await self.refused(client, self.request(apf_json="{"), Code.INVALID_ARGUMENT)
        await self.refused(client, self.request(apf_json=self.pod_apf(tls_server_key="")), Code.INVALID_ARGUMENT)
        await self.refused(client, self.request(apf_json=self.bootstrap().to_json()), Code.INVALID_ARGUMENT)
        await self.refused(client, self.request(apf_json=self.pod_apf(tls_server_key="junk")), Code.INVALID_ARGUMENT)
        assert svc.claim_gate is not None
        self.assertIs(svc.claim_gate.state, ClaimState.UNCLAIMED)

    async def test_failed_network_leaves_the_vm_refusing_everything(self) -> None:
        self.network = FakePodNetwork(fail=True)
        await self.start_agent()
        svc = await self.start_pool_forwarder()
        client = await self.dial_pool(svc)
        await self.refused(client, self.request(), Code.INTERNAL)
        await self.refused(client, self.request(), Code.FAILED_PRECONDITION)
        try:
            await self.check(client)
        except TTRPCError as e:
            self.assertEqual(e.code, Code.FAILED_PRECONDITION)
        else:
            self.fail("an agent call was relayed by a VM whose claim failed")

    async def test_pool_vm_without_tls_does_not_start(self) -> None:
        await self.start_agent()
        with self.assertRaises(StartupError):
            await self.start_pool_forwarder(use_tls=False)


class TokenFormatTests(ClaimTestBase):
    def test_bootstrap_apf_round_trip_carries_no_token_and_no_pod(self) -> None:
        text = self.bootstrap().to_json()
        self.assertNotIn(self.token.hex(), text)
        back = APFConfig.from_json(text)
        self.assertTrue(claim_format.is_bootstrap(back))
        self.assertEqual(back.pool_vm_name, self.vm)
        self.assertIsNone(back.pod_network)
        self.assertEqual(back.pod_name, "")
        self.assertTrue(claim_format.token_matches(self.token, back.claim_token_sha256))

    def test_bootstrap_needs_its_material(self) -> None:
        with self.assertRaises(ValueError):
            claim_format.bootstrap_apf("", "c", "k", "ca", self.token)
        with self.assertRaises(ValueError):
            claim_format.bootstrap_apf(self.vm, "c", "", "ca", self.token)
