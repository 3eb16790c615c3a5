"""
The EC2 Query API on `caa.providers.rest`: form-encoded POSTs signed with botocore's SigV4 signer, XML answers,
EC2 error codes mapped to `ProviderError` kinds (throttling and 5xx TRANSIENT, so retried; capacity QUOTA;
unknown ids NOT_FOUND; other 4xx INVALID_CONFIG).

Credentials come from botocore's chain (static keys, a shared profile, env, web identity / IRSA, container
and instance roles). Resolving the chain reads files and may call STS or IMDS, so it runs in a worker thread;
so does every refresh of refreshable credentials (`get_frozen_credentials` may call STS).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

from attrs import frozen
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from botocore.session import Session
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from caa.once import Once
from caa.providers.aws.config import DEFAULT_ENDPOINT
from caa.providers.interfaces import ErrorKind, InvalidConfig, ProviderError, QuotaExceeded, TransientError
from caa.providers.rest import RestClient, RestRequest, RestResponse
from caa.reactors import INodeReactor

API_VERSION = "2016-11-15"

THROTTLING_CODES = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "RequestThrottled", "RequestThrottledException",
    "TooManyRequestsException", "SlowDown", "PriorRequestNotComplete", "EC2ThrottledException",
})
SERVER_CODES = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable"})
QUOTA_CODES = frozenset({
    "InsufficientInstanceCapacity", "InstanceLimitExceeded", "VcpuLimitExceeded", "InsufficientCapacity",
    "InsufficientAddressCapacity", "InsufficientFreeAddressesInSubnet", "AddressLimitExceeded",
    "VolumeLimitExceeded", "MaxSpotInstanceCountExceeded",
})


@frozen
class AwsTarget:
    """Where and as whom: the endpoint URL, the region (SigV4 scope) and the credentials."""

    endpoint: str
    region: str
    credentials: Credentials


def strip_namespaces(element: ElementTree.Element) -> ElementTree.Element:
    for node in element.iter():
        if isinstance(node.tag, str) and "}" in node.tag:
            node.tag = node.tag.split("}", 1)[1]
    return element


def parse_xml(body: bytes) -> ElementTree.Element | None:
    try:
        return strip_namespaces(ElementTree.fromstring(body))
    except ElementTree.ParseError:
        return None


def error_code(response: RestResponse) -> tuple[str, str]:
    """(code, message) of an EC2 error body (`<Response><Errors><Error>`), or ("", text)."""
    root = parse_xml(response.body)
    if root is not None:
        error = root.find(".//Error")
        if error is not None:
            return error.findtext("Code", ""), error.findtext("Message", "")
    return "", response.body[:300].decode("utf-8", "replace").strip()


def ec2_error(response: RestResponse) -> ProviderError | None:
    """None for 2xx; else the ProviderError of the EC2 error code (see the module docstring)."""
    if 200 <= response.status < 300:
        return None
    code, message = error_code(response)
    text = f"{code}: {message}" if code else f"HTTP {response.status}: {message}"
    if code in THROTTLING_CODES or code in SERVER_CODES or response.status == 429 or response.status >= 500:
        return TransientError(text)
    if code in QUOTA_CODES:
        return QuotaExceeded(text)
    if code.startswith("InvalidInstanceID.") or (code.endswith(".NotFound") and not code.startswith("InvalidAMIID")):
        return ProviderError(ErrorKind.NOT_FOUND, text)  # a malformed instance id names no instance either
    return InvalidConfig(text)


def query_params(prefix: str, values: Sequence[str]) -> dict[str, str]:
    """EC2's list encoding: `Prefix.1=a&Prefix.2=b`."""
    return {f"{prefix}.{i}": value for i, value in enumerate(values, 1)}


def resolve_target(
    region: str, profile: str, endpoint: str, static: tuple[str, str, str] | None
) -> AwsTarget:
    """Blocking (files, STS, IMDS): run in a thread. `static` = (key id, secret, token) when given."""
    try:
        return _resolve_chain(region, profile, endpoint, static)
    except InvalidConfig:
        raise
    except Exception as e:  # botocore raises many types here (profile not found, unreadable file, STS)
        raise InvalidConfig(f"aws: loading credentials: {e}") from None


def _resolve_chain(region: str, profile: str, endpoint: str, static: tuple[str, str, str] | None) -> AwsTarget:
    session = Session(profile=profile or None)
    region = region or session.get_config_variable("region") or ""
    if not region:
        raise InvalidConfig("aws: no region: set --aws-region (AWS_REGION) or the profile's region")
    if static is not None:
        credentials: Credentials | None = Credentials(*static)
    else:
        credentials = session.get_credentials()
    if credentials is None:
        raise InvalidConfig("aws: no credentials: set --aws-access-key-id/--aws-secret-key, --aws-profile, "
                            "or AWS_ROLE_ARN and AWS_WEB_IDENTITY_TOKEN_FILE")
    return AwsTarget(endpoint or DEFAULT_ENDPOINT.format(region=region), region, credentials)


class Ec2Client:
    """EC2 actions (`call`) on a `RestClient`; the target is resolved once, in `threadpool`, on first use
    (after `prepare`, when given)."""

    def __init__(
        self,
        reactor: INodeReactor,
        rest: RestClient,
        resolve: Callable[[], AwsTarget],
        threadpool: ThreadPool | None = None,
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self.rest = rest
        self.resolve = resolve
        self._prepare = prepare  # runs once before the first resolve (the provider's IMDS fill-in)
        self._threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        self._target = Once(self._resolve_target)

    async def target(self) -> AwsTarget:
        return await self._target.get()

    async def _resolve_target(self) -> AwsTarget:
        if self._prepare is not None:
            await self._prepare()
            self._prepare = None
        return await deferToThreadPool(self._reactor, self._threadpool, self.resolve)

    async def _frozen(self, credentials: Credentials) -> ReadOnlyCredentials:
        if isinstance(credentials, RefreshableCredentials):  # a refresh may call STS: off the reactor thread
            frozen_: ReadOnlyCredentials = await deferToThreadPool(
                self._reactor, self._threadpool, credentials.get_frozen_credentials)
            return frozen_
        return credentials.get_frozen_credentials()

    async def sign(self, request: RestRequest) -> RestRequest:
        target = await self.target()
        try:
            credentials = await self._frozen(target.credentials)
        except Exception as e:  # STS unreachable or refusing: botocore raises many types
            raise TransientError(f"aws: refreshing credentials: {e}") from None
        aws = AWSRequest(method=request.method, url=request.url, data=request.body, headers=dict(request.headers))
        SigV4Auth(credentials, "ec2", target.region).add_auth(aws)
        return request.with_headers({name: str(value) for name, value in aws.headers.items()})

    async def call(self, action: str, params: Mapping[str, str] | None = None) -> ElementTree.Element:
        """The parsed answer of `action` (namespaces stripped), or a `ProviderError` naming the action."""
        target = await self.target()
        form: dict[str, Any] = {"Action": action, "Version": API_VERSION, **(params or {})}
        request = RestRequest(
            "POST", target.endpoint.rstrip("/") + "/",
            {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}, urlencode(form).encode())
        response = await self.rest.call(request, error_of=ec2_error, sign=self.sign, what=action)
        root = parse_xml(response.body)
        if root is None:
            raise TransientError(f"{action}: the answer is not XML")
        return root
