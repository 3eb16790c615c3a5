"""Unit tests of the AWS provider's pure parts and of the shared REST layer and redaction (synchronous: the REST
layer runs on treq's in-memory `RequestTraversalAgent` and a `Clock`)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from importlib.metadata import EntryPoint
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogBeginner, Logger, LogPublisher, formatEvent, textFileLogObserver
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from caa.providers.aws import AwsProviderFactory
from caa.providers.aws.config import AwsConfig, AwsOptions, parse_tags
from caa.providers.aws.ec2 import ec2_error
from caa.providers.aws.provider import run_instances_params
from caa.providers.interfaces import ErrorKind, InvalidConfig, IProviderFactory, ProviderError, TransientError
from caa.providers.redact import MASK, RedactingObserver, Redactor, ScrubbingObserver
from caa.providers.registry import ProviderRegistry
from caa.providers.rest import RestClient, RestRequest, RestResponse, RetryPolicy, http_error, poll

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

UPSTREAM = {  # spec-adaptor §7.3 / spec-providers §3.1: flag -> (env, default)
    "aws-access-key-id": ("AWS_ACCESS_KEY_ID", ""),
    "aws-secret-key": ("AWS_SECRET_ACCESS_KEY", ""),
    "aws-session-token": ("AWS_SESSION_TOKEN", ""),
    "aws-region": ("AWS_REGION", ""),
    "aws-profile": (None, ""),
    "instance-type": ("PODVM_INSTANCE_TYPE", "m6a.large"),
    "instance-types": ("PODVM_INSTANCE_TYPES", ""),
    "aws-lt-name": ("PODVM_LAUNCHTEMPLATE_NAME", "kata"),
    "use-lt": ("USE_PODVM_LAUNCHTEMPLATE", False),
    "imageid": ("PODVM_AMI_ID", ""),
    "keyname": ("SSH_KP_NAME", ""),
    "subnetid": ("AWS_SUBNET_ID", ""),
    "securitygroupids": ("AWS_SG_IDS", ""),
    "use-public-ip": ("USE_PUBLIC_IP", False),
    "root-volume-size": ("ROOT_VOLUME_SIZE", 30),
    "disable-cvm": ("DISABLECVM", False),
    "tags": ("TAGS", ""),
}


def parsed(argv: list[str], environ: dict[str, str] | None = None) -> AwsOptions:
    options = AwsOptions(environ or {})
    options.parseOptions(argv)
    return options


class OptionsTests(SynchronousTestCase):
    def test_upstream_names_env_vars_and_defaults(self) -> None:
        table = {row["flag"][2:]: (row["env"], row["default"]) for row in AwsOptions.optionTable()}
        self.assertEqual(table, UPSTREAM)
        self.assertEqual({r["flag"] for r in AwsOptions.optionTable() if r["secret"]},
                         {"--aws-access-key-id", "--aws-secret-key", "--aws-session-token"})

    def test_env_then_flags(self) -> None:
        options = parsed(["--instance-types", "m6a.large, m6a.xlarge", "--tags", "a=1,b=2", "--use-public-ip=true"],
                         {"PODVM_AMI_ID": "ami-1", "AWS_SG_IDS": "sg-1,sg-2", "ROOT_VOLUME_SIZE": "0",
                          "AWS_ENDPOINT_URL_EC2": "http://127.0.0.1:5000"})
        config = AwsConfig.from_options(options)
        self.assertEqual((config.image_id, config.instance_types, config.security_group_ids, config.tags),
                         ("ami-1", ("m6a.large", "m6a.xlarge"), ("sg-1", "sg-2"), (("a", "1"), ("b", "2"))))
        self.assertEqual((config.use_public_ip, config.root_volume_size, config.endpoint, config.imds_endpoint),
                         (True, 0, "http://127.0.0.1:5000", "http://169.254.169.254"))
        off = AwsConfig.from_options(parsed(["--imageid", "ami-1"], {"AWS_EC2_METADATA_DISABLED": "true"}))
        self.assertEqual(off.imds_endpoint, "")

    def test_missing_image_is_a_startup_error_naming_it(self) -> None:
        e = self.assertRaises(usage.UsageError, parsed, [])
        self.assertIn("--imageid (PODVM_AMI_ID) is required", str(e))
        parsed(["--use-lt=true"])  # the launch template names the AMI
        e = self.assertRaises(usage.UsageError, parsed, ["--imageid", "ami-1", "--tags", "novalue"])
        self.assertIn("--tags", str(e))
        e = self.assertRaises(usage.UsageError, parsed, ["--imageid", "ami-1", "--aws-secret-key", SECRET])
        self.assertIn("go together", str(e))
        self.assertNotIn(SECRET, str(e))

    def test_secrets_never_in_help_or_redacted_values(self) -> None:
        options = AwsOptions({"AWS_SECRET_ACCESS_KEY": SECRET, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE1",
                              "PODVM_AMI_ID": "ami-1"})
        chunks = "".join(usage.docMakeChunks(options.usage_rows(), 200))
        self.assertIn("AWS_SECRET_ACCESS_KEY", chunks)
        self.assertNotIn(SECRET, chunks + options.getUsage(200))
        options.parseOptions([])
        self.assertEqual(options.redacted()["aws-secret-key"], MASK)
        config = AwsConfig.from_options(options)
        self.assertNotIn(SECRET, repr(config) + repr(config.redacted()))
        self.assertEqual(Redactor.from_options(options).redact(f"key {SECRET}!"), f"key {MASK}!")

    def test_registered_as_aws(self) -> None:
        registry = ProviderRegistry(
            entry_points_=[EntryPoint("aws", "caa.providers.aws:AwsProviderFactory", "caa.providers")])
        factory = registry.get("aws")
        verifyObject(IProviderFactory, factory)
        self.assertIsInstance(factory, AwsProviderFactory)
        self.assertIn("aws", registry.names())
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.cfg")) as f:
            self.assertIn("aws = caa.providers.aws:AwsProviderFactory", f.read())

    @given(st.lists(st.tuples(st.from_regex(r"[A-Za-z][A-Za-z0-9_.:/-]{0,20}", fullmatch=True),
                              st.from_regex(r"[A-Za-z0-9_.:/-]{0,20}", fullmatch=True)), max_size=6))
    def test_tags_round_trip(self, pairs: list[tuple[str, str]]) -> None:
        self.assertEqual(parse_tags(",".join(f"{k}={v}" for k, v in pairs)), tuple(pairs))


class RunInstancesTests(SynchronousTestCase):
    base = AwsConfig(image_id="ami-1", subnet_id="subnet-1", security_group_ids=("sg-1", "sg-2"), key_name="kp",
                     tags=(("team", "caa"),))

    def params(self, **changes: Any) -> dict[str, str]:
        import attrs

        config = attrs.evolve(self.base, **changes)
        return run_instances_params(config, "podvm-web-12345678", b"#cloud-config\n", "m6a.large", "ami-1",
                                    "/dev/xvda", config.root_volume_size, "tok")

    def test_normal_mode(self) -> None:
        p = self.params()
        self.assertEqual(p["UserData"], "I2Nsb3VkLWNvbmZpZwo=")
        self.assertEqual((p["ImageId"], p["InstanceType"], p["KeyName"], p["SubnetId"]),
                         ("ami-1", "m6a.large", "kp", "subnet-1"))
        self.assertEqual((p["SecurityGroupId.1"], p["SecurityGroupId.2"]), ("sg-1", "sg-2"))
        self.assertEqual(p["CpuOptions.AmdSevSnp"], "enabled")
        self.assertEqual((p["BlockDeviceMapping.1.DeviceName"], p["BlockDeviceMapping.1.Ebs.VolumeSize"]),
                         ("/dev/xvda", "30"))
        self.assertEqual([(p[f"TagSpecification.1.Tag.{i}.Key"], p[f"TagSpecification.1.Tag.{i}.Value"])
                          for i in (1, 2)], [("Name", "podvm-web-12345678"), ("team", "caa")])
        self.assertEqual(p["TagSpecification.1.ResourceType"], "instance")

    def test_public_ip_moves_network_to_the_interface(self) -> None:
        p = self.params(use_public_ip=True, disable_cvm=True, root_volume_size=0)
        self.assertNotIn("SubnetId", p)
        self.assertNotIn("SecurityGroupId.1", p)
        self.assertNotIn("CpuOptions.AmdSevSnp", p)
        self.assertNotIn("BlockDeviceMapping.1.DeviceName", p)
        self.assertEqual((p["NetworkInterface.1.AssociatePublicIpAddress"], p["NetworkInterface.1.SubnetId"],
                          p["NetworkInterface.1.SecurityGroupId.2"]), ("true", "subnet-1", "sg-2"))

    def test_launch_template_mode_leaves_the_rest_to_the_template(self) -> None:
        p = self.params(use_lt=True)
        self.assertEqual(p["LaunchTemplate.LaunchTemplateName"], "kata")
        for key in ("ImageId", "InstanceType", "SubnetId", "KeyName", "CpuOptions.AmdSevSnp"):
            self.assertNotIn(key, p)
        self.assertIn("UserData", p)
        self.assertIn("BlockDeviceMapping.1.Ebs.VolumeSize", p)


def ec2_body(code: str) -> bytes:
    return (f"<Response><Errors><Error><Code>{code}</Code><Message>m</Message></Error></Errors>"
            "<RequestID>r</RequestID></Response>").encode()


class ErrorMappingTests(SynchronousTestCase):
    def test_ec2_codes(self) -> None:
        cases = {
            (503, "RequestLimitExceeded"): ErrorKind.TRANSIENT,
            (400, "Throttling"): ErrorKind.TRANSIENT,
            (500, "InternalError"): ErrorKind.TRANSIENT,
            (500, "InsufficientInstanceCapacity"): ErrorKind.TRANSIENT,  # 5xx first
            (400, "InsufficientInstanceCapacity"): ErrorKind.QUOTA,
            (400, "VcpuLimitExceeded"): ErrorKind.QUOTA,
            (400, "InvalidInstanceID.NotFound"): ErrorKind.NOT_FOUND,
            (400, "InvalidInstanceID.Malformed"): ErrorKind.NOT_FOUND,
            (400, "InvalidAMIID.NotFound"): ErrorKind.INVALID_CONFIG,
            (401, "AuthFailure"): ErrorKind.INVALID_CONFIG,
            (400, "InvalidParameterValue"): ErrorKind.INVALID_CONFIG,
        }
        for (status, code), kind in cases.items():
            error = ec2_error(RestResponse(status, {}, ec2_body(code)))
            assert error is not None
            self.assertIs(error.kind, kind, code)
            self.assertEqual(error.message, f"{code}: m")
        self.assertIsNone(ec2_error(RestResponse(200, {}, b"<ok/>")))

    def test_status_only(self) -> None:
        kinds = {code: (e.kind if (e := http_error(RestResponse(code, {}, b""))) else None)
                 for code in (200, 204, 400, 401, 403, 404, 409, 429, 500, 503)}
        self.assertEqual(kinds, {200: None, 204: None, 400: ErrorKind.INVALID_CONFIG, 401: ErrorKind.INVALID_CONFIG,
                                 403: ErrorKind.INVALID_CONFIG, 404: ErrorKind.NOT_FOUND,
                                 409: ErrorKind.INVALID_CONFIG, 429: ErrorKind.TRANSIENT,
                                 500: ErrorKind.TRANSIENT, 503: ErrorKind.TRANSIENT})


class Scripted(Resource):
    """Answers each request with the next (status, body, headers) of `script` (the last one repeats);
    `None` leaves the request unanswered."""

    isLeaf = True

    def __init__(self, script: Sequence[tuple[int, bytes, dict[str, str]] | None]) -> None:
        super().__init__()
        self.script = script
        self.requests: list[dict[str, Any]] = []

    def render(self, request: Request) -> Any:
        self.requests.append({"auth": request.getHeader("x-auth"), "method": request.method})
        step = self.script[min(len(self.requests), len(self.script)) - 1]
        if step is None:
            return NOT_DONE_YET
        status, body, headers = step
        request.setResponseCode(status)
        for name, value in headers.items():
            request.setHeader(name, value)
        return body


class RestClientTests(SynchronousTestCase):
    policy = RetryPolicy(attempts=4, base=1.0, cap=8.0, attempt_timeout=5.0, call_timeout=100.0)

    def client(self, script: Sequence[tuple[int, bytes, dict[str, str]] | None]) -> tuple[RestClient, Scripted, Clock]:
        resource = Scripted(script)
        clock = Clock()
        agent = RequestTraversalAgent(resource)
        return RestClient(clock, HTTPClient(agent), self.policy, Redactor([SECRET]), rand=lambda: 1.0), resource, clock

    def run_call(self, client: RestClient, clock: Clock, **kwargs: Any) -> Deferred[RestResponse]:
        signed = iter(range(100))

        def sign(request: RestRequest) -> RestRequest:
            return request.with_headers({"x-auth": f"sig{next(signed)}"})

        d = Deferred.fromCoroutine(client.call(RestRequest("POST", "http://cloud.test/", {}, b"x"), sign=sign,
                                               **kwargs))
        for _ in range(60):
            clock.advance(1.0)
        return d

    def test_throttling_retried_with_backoff_and_fresh_signatures(self) -> None:
        client, resource, clock = self.client([(503, ec2_body("RequestLimitExceeded"), {})] * 2 + [(200, b"ok", {})])
        d = Deferred.fromCoroutine(client.call(RestRequest("POST", "http://cloud.test/", {}, b"x"), error_of=ec2_error,
                                               sign=lambda r: r.with_headers({"x-auth": str(clock.seconds())})))
        self.assertNoResult(d)
        self.assertEqual(len(resource.requests), 1)
        clock.advance(0.99)  # back-off 1: rand() * min(8, 1 * 2**0) = 1.0
        self.assertEqual(len(resource.requests), 1)
        clock.advance(0.01)
        self.assertEqual(len(resource.requests), 2)
        clock.advance(2.0)  # back-off 2: 2.0
        self.assertEqual(self.successResultOf(d).body, b"ok")
        self.assertEqual([r["auth"] for r in resource.requests], ["0.0", "1.0", "3.0"])

    def test_other_4xx_never_retried(self) -> None:
        client, resource, clock = self.client([(400, ec2_body("InvalidParameterValue"), {})])
        failure = self.failureResultOf(self.run_call(client, clock, error_of=ec2_error), ProviderError)
        self.assertIs(failure.value.kind, ErrorKind.INVALID_CONFIG)
        self.assertEqual(len(resource.requests), 1)

    def test_5xx_retried_up_to_the_attempts(self) -> None:
        client, resource, clock = self.client([(500, b"boom", {})])
        failure = self.failureResultOf(self.run_call(client, clock), ProviderError)
        self.assertIs(failure.value.kind, ErrorKind.TRANSIENT)
        self.assertEqual(str(failure.value), "POST http://cloud.test/: HTTP 500: boom")
        self.assertEqual(len(resource.requests), 4)

    def test_retry_after_is_honoured(self) -> None:
        client, resource, clock = self.client([(429, b"", {"Retry-After": "7"}), (204, b"", {})])
        d = Deferred.fromCoroutine(client.call(RestRequest("GET", "http://cloud.test/")))
        clock.advance(6.9)
        self.assertEqual(len(resource.requests), 1)
        clock.advance(0.1)
        self.assertEqual(self.successResultOf(d).status, 204)

    def test_each_attempt_has_a_deadline(self) -> None:
        client, resource, clock = self.client([None, None, (200, b"late", {})])
        d = Deferred.fromCoroutine(client.call(RestRequest("GET", "http://cloud.test/")))
        clock.advance(5.0)  # attempt 1 times out, back-off 1 s
        clock.advance(1.0)
        self.assertEqual(len(resource.requests), 2)
        clock.advance(5.0)
        clock.advance(2.0)
        self.assertEqual(self.successResultOf(d).body, b"late")

    def test_deadline_failure_and_overall_deadline(self) -> None:
        client, resource, clock = self.client([None])
        client.policy = RetryPolicy(attempts=10, base=1.0, cap=1.0, attempt_timeout=5.0, call_timeout=12.0)
        d = Deferred.fromCoroutine(client.call(RestRequest("GET", "http://cloud.test/"), what="GetThing"))
        for _ in range(20):
            clock.advance(1.0)
        failure = self.failureResultOf(d, ProviderError)
        self.assertIs(failure.value.kind, ErrorKind.TRANSIENT)
        self.assertIn("GetThing: no answer within", str(failure.value))
        self.assertEqual(len(resource.requests), 2)  # a third try would end after the 12 s deadline

    def test_cancel_propagates(self) -> None:
        client, resource, clock = self.client([None])
        d = Deferred.fromCoroutine(client.call(RestRequest("GET", "http://cloud.test/")))
        d.cancel()
        self.failureResultOf(d).trap("twisted.internet.defer.CancelledError")
        clock.advance(100)
        self.assertEqual(len(resource.requests), 1)

    def test_a_failed_signing_is_an_attempt(self) -> None:
        client, resource, clock = self.client([(200, b"ok", {})])
        failures: list[ProviderError] = [TransientError("sts busy"), InvalidConfig("role refused")]

        def sign(request: RestRequest) -> RestRequest:
            if failures:
                raise failures.pop(0)
            return request

        d = Deferred.fromCoroutine(client.call(RestRequest("GET", "http://cloud.test/"), sign=sign))
        clock.advance(1.0)
        self.assertIn("role refused", str(self.failureResultOf(d, ProviderError).value))  # not retried
        self.assertEqual(resource.requests, [])
        d = Deferred.fromCoroutine(client.call(RestRequest("GET", "http://cloud.test/"), sign=sign))
        self.assertEqual(self.successResultOf(d).body, b"ok")

    def test_secrets_masked_in_errors(self) -> None:
        client, _resource, clock = self.client([(403, f"bad key {SECRET}".encode(), {})])
        failure = self.failureResultOf(self.run_call(client, clock), ProviderError)
        self.assertNotIn(SECRET, str(failure.value))
        self.assertIn(MASK, str(failure.value))


class PollTests(SynchronousTestCase):
    def test_until_a_result_or_the_deadline(self) -> None:
        clock = Clock()
        answers: list[str | None] = [None, None, "done"]
        calls: list[float] = []

        async def probe() -> str | None:
            calls.append(clock.seconds())
            return answers.pop(0)

        d = Deferred.fromCoroutine(poll(clock, probe, 2.0, 10.0, "op"))
        clock.pump([2.0, 2.0])
        self.assertEqual(self.successResultOf(d), "done")
        self.assertEqual(calls, [0.0, 2.0, 4.0])

        async def never() -> str | None:
            return None

        d = Deferred.fromCoroutine(poll(clock, never, 3.0, 10.0, "operation op-1 not done"))
        clock.pump([3.0] * 4)
        failure = self.failureResultOf(d, ProviderError)
        self.assertEqual((failure.value.kind, str(failure.value)),
                         (ErrorKind.TRANSIENT, "operation op-1 not done after 10s"))

    def test_json_bodies(self) -> None:
        self.assertEqual(RestResponse(200, {}, b'{"a": [1]}').json(), {"a": [1]})
        self.assertIsNone(RestResponse(204, {}, b"").json())
        error = self.assertRaises(ProviderError, RestResponse(502, {}, b"<html>").json)
        self.assertIs(error.kind, ErrorKind.TRANSIENT)


class RedactionTests(SynchronousTestCase):
    def test_no_secret_reaches_the_log(self) -> None:
        out = io.StringIO()
        publisher = LogPublisher()
        events: list[Any] = []
        redacting = RedactingObserver(textFileLogObserver(out), Redactor([SECRET, "x"]))
        publisher.addObserver(redacting)
        publisher.addObserver(RedactingObserver(cast(ILogObserver, events.append), Redactor([SECRET])))
        log = Logger(observer=publisher)

        class Holder:
            def __str__(self) -> str:
                return f"holder({SECRET})"

        log.info("key {key} in {where}", key=SECRET, where=["url", f"https://u:{SECRET}@host"])
        log.info("object {obj}", obj=Holder())
        try:
            raise ValueError(f"signing with {SECRET} failed")
        except ValueError:
            log.failure("call failed")
        log.info("plain {n} x", n=1)
        text = out.getvalue()
        self.assertNotIn(SECRET, text)
        self.assertEqual(text.count(MASK), 4, text)
        self.assertIn("plain 1 x", text)  # short "secrets" are ignored
        for event in events:
            self.assertNotIn(SECRET, formatEvent(event) + repr(event))
        self.assertIn("ValueError: signing with **********", events[2]["log_redacted_traceback"])

    def test_scrubbing_observer_masks_in_place_for_later_observers(self) -> None:
        publisher = LogPublisher()
        publisher.addObserver(ScrubbingObserver(Redactor([SECRET])))
        seen: list[Any] = []
        publisher.addObserver(cast(ILogObserver, seen.append))
        Logger(observer=publisher).info("token={token}", token=SECRET)
        self.assertEqual(formatEvent(seen[0]), f"token={MASK}")
        self.assertNotIn(SECRET, repr(seen[0]))

    def test_twistd_wiring_scrubs_buffered_and_later_events(self) -> None:
        """The recipe of caa.providers.redact for twistd: makeService adds the scrubber to the global publisher
        before twistd begins logging to its file; events buffered before and logged after are both clean."""
        import types
        import warnings

        publisher = LogPublisher()
        beginner = LogBeginner(publisher, io.StringIO(), types.SimpleNamespace(stdout=None, stderr=None), warnings)
        log = Logger(observer=publisher)
        log.info("before makeService {key}", key=SECRET)  # buffered by the beginner
        publisher.addObserver(ScrubbingObserver(Redactor([SECRET])))  # makeService
        log.info("in makeService {key}", key=SECRET)
        out = io.StringIO()
        beginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)  # twistd starts logging
        log.info("running {key}", key=SECRET)
        text = out.getvalue()
        self.assertEqual(text.count(MASK), 3, text)
        self.assertNotIn(SECRET, text)

    def test_redactor_longest_first_and_bytes(self) -> None:
        redactor = Redactor(["abcd", "abcdefgh"])
        self.assertEqual(redactor.redact("abcdefgh abcd"), f"{MASK} {MASK}")
        self.assertEqual(redactor.redact_value({"k": (b"xabcdx", 3)}), {"k": (f"x{MASK}x".encode(), 3)})
        self.assertFalse(Redactor([""]))


class EbsDeviceNameTests(SynchronousTestCase):
    """upstream's EBS device naming: /dev/xvdb..xvdz for the first 25 volumes, then two letters."""

    def test_names(self) -> None:
        from caa.providers.aws.volumes import device_name

        self.assertEqual([device_name(i) for i in (0, 1, 24, 25, 26, 50, 51)],
                         ["/dev/xvdb", "/dev/xvdc", "/dev/xvdz", "/dev/xvdba", "/dev/xvdbb", "/dev/xvdbz",
                          "/dev/xvdca"])
        self.assertEqual(len({device_name(i) for i in range(600)}), 600)
        for bad in (-1, 25 + 25 * 26):
            self.assertRaises(ValueError, device_name, bad)

    def test_only_our_devices_are_detached(self) -> None:
        from caa.providers.aws.volumes import device_name, is_data_device

        self.assertTrue(all(is_data_device(device_name(i)) for i in range(600)))
        for root in ("/dev/xvda", "/dev/sda1", "/dev/sda", "/dev/nvme0n1", "/dev/xvdb1", "xvdb"):
            self.assertFalse(is_data_device(root), root)
