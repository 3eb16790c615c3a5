"""The GCP provider against the Compute fake (tests/fakes/gcp_compute.py) on a real socket: the provider contract,
the instance it inserts, machine-type selection, zone operations, Resource Manager tags, throttling (429 and
503), token caching and refresh, bad credentials (the key never in errors or logs), and application-default
credentials (a key file, the metadata server)."""

from __future__ import annotations

import base64
import json
from typing import Any, cast

import attrs
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import TestCase

from caa.providers.gcp.config import GcpConfig, GcpOptions
from caa.providers.gcp.provider import GcpProvider
from caa.providers.interfaces import ErrorKind, InstanceSpec, IProvider, ProviderError
from caa.providers.rest import RetryPolicy
from caa.reactors import as_node_reactor
from tests.fakes import gcp_compute
from tests.fakes.gcp_compute import FakeGcp, service_account_json
from tests.moto_server import serve
from tests.test_providers_contract import ProviderContractMixin, unique_pod

FAST = RetryPolicy(attempts=4, base=0.02, cap=0.1, attempt_timeout=10.0, call_timeout=30.0)
TYPES = ("n2d-standard-2", "n2d-standard-4", "n2d-standard-8", "a2-highgpu-1g")


def fake_config(url: str, **changes: Any) -> GcpConfig:
    config = GcpConfig(
        credentials=service_account_json(f"{url}/token"), project_id=gcp_compute.PROJECT, zone=gcp_compute.ZONE,
        image_name=gcp_compute.IMAGE, machine_type="n2d-standard-2", machine_types=TYPES,
        network=gcp_compute.NETWORK, subnetwork=gcp_compute.SUBNETWORK, confidential_type="SEV_SNP",
        compute_endpoint=f"{url}/compute/v1", resource_manager_endpoint=f"{url}/v3", metadata_host=url,
        poll_interval=0.05, boot_timeout=20.0)
    return attrs.evolve(config, **changes)


class GcpTestMixin:
    fake: FakeGcp
    url: str

    async def start_fake(self, **kwargs: Any) -> FakeGcp:
        self.fake = FakeGcp(**kwargs)
        self.url, port = await serve(self.fake)
        self.fake.base = self.url
        self.addCleanup(port.stopListening)  # type: ignore[attr-defined]
        return self.fake

    def gcp(self, **changes: Any) -> GcpProvider:
        provider = GcpProvider(as_node_reactor(global_reactor), fake_config(self.url, **changes), policy=FAST,
                               token_policy=FAST)
        self.addCleanup(provider.teardown)  # type: ignore[attr-defined]
        return provider


class GcpContractTests(GcpTestMixin, ProviderContractMixin, TestCase):
    async def make_provider(self) -> IProvider:
        await self.start_fake()
        self.provider = self.gcp()
        return self.provider

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(vcpus=512, memory_mib=4 * 1024 * 1024), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        return sorted(n for n in self.fake.instances if n in names)

    async def check_running(self, instance: Any, user_data: bytes) -> None:
        found = self.fake.instances[instance.id]
        # the internal IP is known once the insert is done: create returns while the instance still boots
        self.assertIn(found["status"], ("STAGING", "RUNNING"))
        self.assertEqual(found["networkInterfaces"][0]["networkIP"], instance.ips[0])
        items = {i["key"]: i["value"] for i in found["metadata"]["items"]}
        self.assertEqual(items["user-data-encoding"], "base64")
        self.assertEqual(base64.b64decode(items["user-data"]), user_data)


class GcpBehaviourTests(GcpTestMixin, TestCase):
    async def test_insert_body_machine_type_and_tags(self) -> None:
        await self.start_fake(operation_polls=2)
        provider = self.gcp(tags=(("env", "prod"),), root_volume_size=12)
        pod, sid = unique_pod("gcp")
        instance = await provider.create_instance(pod, sid, b"#cloud-config\n", InstanceSpec(vcpus=3, memory_mib=9000))
        self.addCleanup(provider.delete_instance, instance.id)
        self.assertEqual(instance.id, instance.name)  # upstream: the instance id is its name
        body = self.fake.inserted[instance.name]
        self.assertEqual(body["machineType"], f"zones/{gcp_compute.ZONE}/machineTypes/n2d-standard-4")
        self.assertEqual(body["confidentialInstanceConfig"],
                         {"confidentialInstanceType": "SEV_SNP", "enableConfidentialCompute": True})
        self.assertEqual(body["scheduling"], {"onHostMaintenance": "TERMINATE"})
        disk = body["disks"][0]["initializeParams"]
        self.assertEqual(disk, {"diskSizeGb": "20",  # the image's 20 GB beats --root-volume-size 12
                                "sourceImage": f"projects/{gcp_compute.PROJECT}/global/images/{gcp_compute.IMAGE}",
                                "diskType": f"zones/{gcp_compute.ZONE}/diskTypes/pd-standard"})
        self.assertEqual(body["networkInterfaces"], [{
            "network": f"projects/{gcp_compute.PROJECT}/global/networks/default", "stackType": "IPV4_ONLY",
            "subnetwork": f"projects/{gcp_compute.PROJECT}/regions/us-central1/subnetworks/pods"}])
        self.assertEqual(body["params"], {"resourceManagerTags": {"tagKeys/281474976710001":
                                                                  "tagValues/281474976710101"}})
        operations = [p for m, p in self.fake.requests if "/operations/" in p]
        self.assertGreaterEqual(len(operations), 3)  # RUNNING twice, then DONE
        plain = self.gcp(disable_cvm=True)  # no GPU machine runs SEV-SNP
        gpu = await plain.create_instance(*unique_pod("gcp"), b"", InstanceSpec(gpus=1))
        self.addCleanup(plain.delete_instance, gpu.id)
        self.assertTrue(self.fake.inserted[gpu.name]["machineType"].endswith("/a2-highgpu-1g"))
        self.assertEqual(self.fake.inserted[gpu.name]["scheduling"], {"onHostMaintenance": "TERMINATE"})
        # a GPU machine type as the default: no live migration even when the pod asks for no GPU
        a2 = self.gcp(disable_cvm=True, machine_type="a2-highgpu-1g", machine_types=())
        gpu = await a2.create_instance(*unique_pod("gcp"), b"", InstanceSpec())
        self.addCleanup(a2.delete_instance, gpu.id)
        self.assertEqual(self.fake.inserted[gpu.name]["scheduling"], {"onHostMaintenance": "TERMINATE"})
        try:
            await provider.create_instance(*unique_pod("gcp"), b"", InstanceSpec(instance_type="e2-medium"))
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("is not part of supported instance types list", str(e))
        else:
            self.fail("a machine type outside --machine-types was created")

    async def test_internal_ip_returned_while_staging(self) -> None:
        await self.start_fake()
        provider = self.gcp()
        instance = await provider.create_instance(*unique_pod("gcpe"), b"", InstanceSpec())
        self.addCleanup(provider.delete_instance, instance.id)
        found = self.fake.instances[instance.name]
        self.assertEqual(found["status"], "STAGING")  # not waited for RUNNING
        self.assertEqual(instance.ips, (found["networkInterfaces"][0]["networkIP"],))
        gets = [p for m, p in self.fake.requests if m == "GET" and p.endswith(f"/instances/{instance.name}")]
        self.assertEqual(len(gets), 1)

    async def test_unknown_tag_aborts(self) -> None:
        await self.start_fake()
        try:
            await self.gcp(tags=(("env", "nope"),)).verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("Aborting: Tag env=nope not found", str(e))
        else:
            self.fail("an unknown tag value was accepted")

    async def test_public_ip_disable_cvm_and_image_annotation(self) -> None:
        await self.start_fake()
        provider = self.gcp(use_public_ip=True, disable_cvm=True, subnetwork="", disk_type="pd-ssd")
        image = "projects/confidential-images/global/images/podvm-tdx"
        instance = await provider.create_instance(*unique_pod("gcpp"), b"", InstanceSpec(image=image))
        body = self.fake.inserted[instance.name]
        self.assertNotIn("confidentialInstanceConfig", body)
        self.assertNotIn("scheduling", body)
        self.assertEqual(body["disks"][0]["initializeParams"]["sourceImage"], image)
        self.assertEqual(body["networkInterfaces"][0]["accessConfigs"],
                         [{"name": "External NAT", "type": "ONE_TO_ONE_NAT", "networkTier": "STANDARD"}])
        self.assertTrue(instance.ips[0].startswith("34.0.0."), instance.ips)  # the NAT IP
        self.assertEqual(self.fake.instances[instance.name]["status"], "RUNNING")  # a NAT IP waits for RUNNING
        await provider.delete_instance(instance.id)
        self.assertEqual(self.fake.instances, {})

    async def test_partial_urls_and_a_bare_image_annotation(self) -> None:
        await self.start_fake()
        provider = self.gcp(image_name=f"global/images/{gcp_compute.IMAGE}", network="global/networks/default",
                            subnetwork="regions/us-central1/subnetworks/pods")
        await provider.verify_config()  # images.get of the project's image, not of "global/images/..."
        instance = await provider.create_instance(*unique_pod("gcpu"), b"", InstanceSpec(image=gcp_compute.IMAGE))
        self.addCleanup(provider.delete_instance, instance.id)
        body = self.fake.inserted[instance.name]
        self.assertEqual(body["disks"][0]["initializeParams"]["sourceImage"],
                         f"projects/{gcp_compute.PROJECT}/global/images/{gcp_compute.IMAGE}")  # the bare annotation
        self.assertEqual((body["networkInterfaces"][0]["network"], body["networkInterfaces"][0]["subnetwork"]),
                         ("global/networks/default", "regions/us-central1/subnetworks/pods"))
        # Compute takes full or partial URLs only: a bare network name is malformed
        body = dict(body, name="podvm-bare-12345678", networkInterfaces=[{"network": "default"}])
        try:
            await provider.compute.call("POST", f"projects/{gcp_compute.PROJECT}/zones/{gcp_compute.ZONE}/instances",
                                        body)
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("The URL is malformed", str(e))
        else:
            self.fail("a bare network name was taken")

    async def test_rejected_insert_is_invalid_config_and_leaves_nothing(self) -> None:
        await self.start_fake()
        provider = self.gcp(confidential_type="TDX")  # n2d machines cannot run TDX
        try:
            await provider.create_instance(*unique_pod("gcpr"), b"", InstanceSpec())
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("not supported for machine type n2d-standard-2", str(e))
        else:
            self.fail("TDX on n2d was created")
        self.assertEqual(self.fake.instances, {})
        # TDX runs on C3, which has no pd-standard (the default --disk-type): pd-balanced it is
        tdx = self.gcp(confidential_type="TDX", machine_type="c3-standard-4", machine_types=())
        try:
            await tdx.create_instance(*unique_pod("gcpr"), b"", InstanceSpec())
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("[pd-standard] features are not compatible", str(e))
        else:
            self.fail("pd-standard on c3 was created")
        tdx = self.gcp(confidential_type="TDX", machine_type="c3-standard-4", machine_types=(), disk_type="pd-balanced")
        instance = await tdx.create_instance(*unique_pod("gcpr"), b"", InstanceSpec())
        self.assertEqual(self.fake.inserted[instance.name]["confidentialInstanceConfig"]["confidentialInstanceType"],
                         "TDX")
        await tdx.delete_instance(instance.id)
        self.assertEqual(self.fake.instances, {})

    async def test_exhausted_zone_is_quota(self) -> None:
        await self.start_fake()
        provider = self.gcp()
        pod, sid = unique_pod("gcpq")
        self.fake.fail_insert = "ZONE_RESOURCE_POOL_EXHAUSTED"
        try:
            await provider.create_instance(pod, sid, b"", InstanceSpec())
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.QUOTA)
            self.assertIn("ZONE_RESOURCE_POOL_EXHAUSTED: The zone", str(e))
            self.assertIsNone(e.instance_id)
        else:
            self.fail("an exhausted zone created an instance")
        self.assertEqual(self.fake.instances, {})

    async def test_cancelled_create_rolls_back(self) -> None:
        await self.start_fake()
        provider = self.gcp()
        pod, sid = unique_pod("gcpc")
        name = provider.instance_name(pod, sid)
        self.fake.hang_once("/operations/")  # the insert's operation poll never answers
        hung = self.fake.hung.wait()
        creating = provider.create_instance(pod, sid, b"", InstanceSpec())
        await hung
        self.assertIn(name, self.fake.instances)
        creating.cancel()
        error = await creating.addErrback(lambda f: f.value)
        self.assertIsInstance(error, CancelledError)
        self.assertIn(("DELETE", f"/compute/v1/{provider.instance_path(name)}"), self.fake.requests)  # rolled back
        self.assertEqual(self.fake.instances, {})

    async def test_lost_insert_answer_is_retried_with_the_same_request_id(self) -> None:
        await self.start_fake()
        provider = self.gcp()
        pod, sid = unique_pod("gcpl")
        name = provider.instance_name(pod, sid)
        self.fake.lose_answer_once("POST", "/instances")  # inserted, then the connection drops
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec())
        self.assertEqual(instance.name, name)
        inserts = [p for m, p in self.fake.requests if m == "POST"]
        self.assertEqual(len(inserts), 2)  # retried ...
        self.assertEqual(len(self.fake.request_ids), 1)  # ... with the first one's requestId: no 409
        await provider.delete_instance(instance.id)
        self.assertEqual(self.fake.instances, {})

    async def test_cancel_during_an_insert_that_was_carried_out_rolls_back(self) -> None:
        await self.start_fake()
        provider = self.gcp()
        pod, sid = unique_pod("gcpi")
        name = provider.instance_name(pod, sid)
        self.fake.lose_answer_once("POST", "/instances", hang=True)  # inserted, the answer never comes
        hung = self.fake.hung.wait()
        creating = provider.create_instance(pod, sid, b"", InstanceSpec())
        await hung
        self.assertIn(name, self.fake.instances)
        creating.cancel()
        error = await creating.addErrback(lambda f: f.value)
        self.assertIsInstance(error, CancelledError)
        self.assertEqual(self.fake.instances, {})  # the instance the unanswered insert made is gone again

    async def test_throttling_429_and_503_are_retried(self) -> None:
        await self.start_fake()
        provider = self.gcp()
        await provider.verify_config()
        for status in (429, 503):
            self.fake.throttle(2, status)
            before = len(self.fake.requests)
            self.assertIsNone(await provider.find_instance("podvm-x-12345678"))
            self.assertEqual(len(self.fake.requests) - before, 3)
        self.fake.throttle(100)
        try:
            await provider.find_instance("podvm-x-12345678")
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.TRANSIENT)
            self.assertIn("rateLimitExceeded", str(e))
        else:
            self.fail("a throttled call succeeded")

    async def test_token_is_cached_and_refreshed(self) -> None:
        await self.start_fake()
        provider = self.gcp()
        await provider.verify_config()
        await provider.find_instance("podvm-x-12345678")
        self.assertEqual(len(self.fake.token_requests), 1)
        # the JWT names Google's token endpoint as its audience although the key's token_uri is the fake's
        claims = json.loads(base64.urlsafe_b64decode(self.fake.token_requests[0]["assertion"].split(".")[1] + "=="))
        self.assertEqual((claims["aud"], claims["iss"], claims["scope"]),
                         ("https://oauth2.googleapis.com/token", gcp_compute.CLIENT_EMAIL,
                          "https://www.googleapis.com/auth/cloud-platform"))
        self.assertEqual(claims["exp"] - claims["iat"], 3600)
        self.fake.expire_tokens()  # the cloud refuses it (401): a new one is fetched and the call retried
        self.assertIsNone(await provider.find_instance("podvm-x-12345678"))
        self.assertEqual(len(self.fake.token_requests), 2)
        self.fake.revoke_tokens()  # a fresh token refused as well: one retry, then a configuration error
        before = len(self.fake.requests)
        try:
            await provider.find_instance("podvm-x-12345678")
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn("HTTP 401 authError", str(e))
        else:
            self.fail("a refused token was accepted")
        self.assertEqual(len(self.fake.requests) - before, 2)
        self.assertEqual(len(self.fake.token_requests), 3)

    async def test_bad_key_names_the_problem_and_never_the_key(self) -> None:
        await self.start_fake()
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)  # a plain callable is a log observer
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        credentials = service_account_json(f"{self.url}/token", other)
        pem = json.loads(credentials)["private_key"]
        provider = self.gcp(credentials=credentials)
        try:
            await provider.verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)  # never retried
            self.assertIn("invalid_grant: Invalid JWT Signature.", str(e))
            self.assertNotIn(pem.splitlines()[1], str(e))
        else:
            self.fail("a key Google does not know was accepted")
        self.assertEqual(len(self.fake.token_requests), 1)
        logged = "\n".join(formatEvent(e) + repr(e) for e in events)
        self.assertNotIn(pem.splitlines()[1], logged)
        for text, message in (("{not json", "is not JSON"), ('{"type": "authorized_user"}', "service_account"),
                              (json.dumps({"type": "service_account", "client_email": "a@b",
                                           "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n"}), "PEM")):
            try:
                await self.gcp(credentials=text).find_instance("podvm-x-12345678")
            except ProviderError as e:
                self.assertIs(e.kind, ErrorKind.INVALID_CONFIG)
                self.assertIn(message, str(e))
                self.assertIn("--gcp-credentials", str(e))
            else:
                self.fail(f"credentials {text!r} were accepted")

    async def test_application_default_credentials(self) -> None:
        await self.start_fake()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(service_account_json(f"{self.url}/token"))
        from_file = self.gcp(credentials="", credentials_file=path)
        self.assertIsNone(await from_file.find_instance("podvm-x-12345678"))
        self.assertEqual(len(self.fake.token_requests), 1)  # the JWT-bearer grant of the file's key
        metadata = self.gcp(credentials="")
        self.assertIsNone(await metadata.find_instance("podvm-x-12345678"))
        self.assertEqual(len(self.fake.token_requests), 1)  # the metadata server answered this one
        self.assertEqual(metadata.tokens.fetches, 1)
        # off GCE the metadata server's name does not resolve: a TRANSIENT ProviderError naming the call
        try:
            await self.gcp(credentials="", metadata_host="metadata.google.invalid").verify_config()
        except ProviderError as e:
            self.assertIs(e.kind, ErrorKind.TRANSIENT)
            self.assertIn("gcp metadata server token", str(e))
        else:
            self.fail("a token came from a metadata server that does not exist")

    async def test_delete_of_unknown_or_malformed_names(self) -> None:
        await self.start_fake()
        provider = self.gcp()
        await provider.delete_instance("0b5e-not-a-name")
        self.assertEqual(self.fake.requests, [])
        await provider.delete_instance("podvm-gone-12345678")
        self.assertEqual(self.fake.requests[-1][0], "DELETE")


class GcpFakeRejectsTests(GcpTestMixin, TestCase):
    """The fake refuses what Compute refuses, with Google's reasons, and the client takes each as INVALID_CONFIG
    (never retried): no bearer token, an insert body that is not JSON, a bad instance name."""

    async def test_rejections(self) -> None:
        from caa.providers.rest import RestRequest

        await self.start_fake()
        provider = self.gcp()
        compute = provider.compute
        instances = f"{self.url}/compute/v1/projects/{gcp_compute.PROJECT}/zones/{gcp_compute.ZONE}/instances"
        json_type = {"Content-Type": "application/json"}
        cases = [
            (RestRequest("GET", f"{instances}/podvm-x-12345678"), False, "HTTP 401 required"),
            (RestRequest("POST", instances, json_type, b"{not json"), True, "HTTP 400 parseError"),
            (RestRequest("POST", instances, json_type, b'{"name": "Not_A_Name"}'), True, "HTTP 400 invalid"),
        ]
        for request, signed, text in cases:
            before = len(self.fake.requests)
            try:
                await compute.rest.call(request, error_of=compute.google_error, sign=compute.sign if signed else None)
            except ProviderError as e:
                self.assertIs(e.kind, ErrorKind.INVALID_CONFIG, str(e))
                self.assertIn(text, str(e))
            else:
                self.fail(f"{request.method} {request.url} was accepted")
            self.assertEqual(len(self.fake.requests) - before, 1)  # not retried


class TokenCacheTests(TestCase):
    """caa.providers.token.TokenCache on a Clock: one fetch shared by concurrent callers, a refresh `margin`
    before expiry (half the life of a short-lived token), and every token added to the redactor."""

    def test_refresh_before_expiry(self) -> None:
        from twisted.internet.task import Clock

        from caa.providers.redact import Redactor
        from caa.providers.token import TokenCache

        clock = Clock()
        pending: list[Deferred[tuple[str, float]]] = []

        def fetch() -> Deferred[tuple[str, float]]:
            pending.append(Deferred())
            return pending[-1]

        redactor = Redactor()
        cache = TokenCache(clock, fetch, redactor, margin=300)
        first, second = Deferred.fromCoroutine(cache.token()), Deferred.fromCoroutine(cache.token())
        self.assertEqual(len(pending), 1)  # one fetch for both
        pending[0].callback(("token-one", 3600.0))
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("token-one", "token-one"))
        self.assertEqual(redactor.redact("Bearer token-one"), "Bearer **********")
        clock.advance(3600 - 300 - 1)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(cache.token())), "token-one")
        clock.advance(2)  # within the margin: refreshed
        third = Deferred.fromCoroutine(cache.token())
        self.assertEqual(len(pending), 2)
        pending[1].callback(("token-two", 60.0))
        self.assertEqual(self.successResultOf(third), "token-two")
        clock.advance(29)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(cache.token())), "token-two")
        clock.advance(2)  # past half of its 60 s
        Deferred.fromCoroutine(cache.token())
        self.assertEqual(len(pending), 3)

    def test_refresh_fraction_and_structured_tokens(self) -> None:
        """IBM IAM and Alibaba RRSA refresh once 80 % of the lifetime has passed since the fetch began; a token that
        is not a string (RRSA's key triple) is returned as it is and redacted by its own fetch."""
        from twisted.internet.task import Clock

        from caa.providers.redact import Redactor
        from caa.providers.token import TokenCache

        clock = Clock()
        pending: list[Deferred[tuple[tuple[str, str], float]]] = []

        def fetch() -> Deferred[tuple[tuple[str, str], float]]:
            pending.append(Deferred())
            return pending[-1]

        redactor = Redactor()
        cache = TokenCache(clock, fetch, redactor, refresh_fraction=0.8)
        first = Deferred.fromCoroutine(cache.token())
        clock.advance(10)  # the fetch takes 10 s: the lifetime still counts from its start
        pending[0].callback((("AK", "secret"), 1000.0))
        self.assertEqual(self.successResultOf(first), ("AK", "secret"))
        self.assertEqual(redactor.redact("secret"), "secret")  # not a string token: the fetch redacts it
        clock.advance(789)  # 799 s after the fetch began
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(cache.token())), ("AK", "secret"))
        self.assertEqual(len(pending), 1)
        clock.advance(1)  # 800 s = 80 %
        Deferred.fromCoroutine(cache.token())
        self.assertEqual(len(pending), 2)


class GcpOptionsTests(TestCase):
    def environ(self) -> dict[str, str]:
        return {"GCP_PROJECT_ID": "p", "GCP_ZONE": "europe-west4-a", "PODVM_IMAGE_NAME": "podvm",
                "GCP_NETWORK": "default", "GCP_CONFIDENTIAL_TYPE": "TDX", "GCP_CREDENTIALS": '{"secret": "k3y-text"}',
                "GCP_INSTANCE_TYPES": "c3-standard-4, c3-standard-8"}

    def test_env_and_defaults(self) -> None:
        options = GcpOptions(self.environ())
        options.parseOptions(["--disk-type", "pd-balanced"])
        config = GcpConfig.from_options(options)
        self.assertEqual((config.machine_type, config.machine_types, config.disk_type, config.root_volume_size,
                          config.region, config.confidential_type),
                         ("e2-medium", ("c3-standard-4", "c3-standard-8"), "pd-balanced", 10, "europe-west4", "TDX"))
        self.assertEqual(options.redacted()["gcp-credentials"], "**********")
        self.assertNotIn("k3y-text", repr(config))
        self.assertEqual(config.metadata_host, "metadata.google.internal")
        for variables, host in (({"GCE_METADATA_ROOT": "169.254.169.254"}, "169.254.169.254"),
                                ({"GCE_METADATA_ROOT": "old:1", "GCE_METADATA_HOST": "new:2"}, "new:2")):
            options = GcpOptions(dict(self.environ(), **variables))
            options.parseOptions([])
            self.assertEqual(GcpConfig.from_options(options).metadata_host, host)  # google-auth's variables

    def test_missing_required_option_is_named(self) -> None:
        for variable, flag in (("GCP_PROJECT_ID", "--gcp-project-id"), ("GCP_ZONE", "--zone"),
                               ("GCP_NETWORK", "--network"), ("PODVM_IMAGE_NAME", "--image-name"),
                               ("GCP_CONFIDENTIAL_TYPE", "--confidential-type")):
            environ = self.environ()
            del environ[variable]
            with self.assertRaises(usage.UsageError) as raised:
                GcpOptions(environ).parseOptions([])
            self.assertIn(flag, str(raised.exception))
            self.assertIn(variable, str(raised.exception))
        GcpOptions(dict(self.environ(), GCP_CONFIDENTIAL_TYPE="")).parseOptions(["--disable-cvm=true"])
