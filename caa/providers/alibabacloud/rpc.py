"""
Alibaba Cloud's RPC-style API (ECS `2014-05-26`, VPC `2016-04-28`) on the shared REST layer: form-encoded POSTs
signed with signature version 1.0 (HMAC-SHA1), JSON answers.

Signing (Alibaba's documented algorithm): add the common parameters (`Format=JSON`, `Version`, `AccessKeyId`,
`SignatureMethod=HMAC-SHA1`, `SignatureVersion=1.0`, a fresh `SignatureNonce`, `Timestamp` in UTC
`YYYY-MM-DDThh:mm:ssZ`, and `SecurityToken` with STS credentials); percent-encode every name and value by RFC 3986
(only `A-Z a-z 0-9 - _ . ~` left as is, UTF-8); sort by name; join as `k=v&...` (the canonicalised query);
`StringToSign = METHOD & %2F & percent(canonicalised query)`; `Signature = base64(HMAC-SHA1(secret + "&",
StringToSign))`. Each attempt is signed afresh (nonce and timestamp), so a retry is never refused as a replay.

Errors are `{"Code", "Message", "RequestId"}`: throttling codes and 5xx are TRANSIENT, stock and quota codes
QUOTA, a missing instance, ENI or EIP NOT_FOUND, the rest (a bad signature or key, a bad parameter) INVALID_CONFIG.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

from attrs import frozen
from twisted.internet.interfaces import IReactorTime

from caa.providers.interfaces import ErrorKind, InvalidConfig, ProviderError, QuotaExceeded, TransientError
from caa.providers.rest import RestClient, RestRequest, RestResponse

ECS_VERSION = "2014-05-26"
VPC_VERSION = "2016-04-28"
TRANSIENT_CODES = ("Throttling", "ServiceUnavailable", "InternalError", "UnknownError", "IncorrectInstanceStatus")
QUOTA_CODES = ("QuotaExceed", "OperationDenied.NoStock", "Zone.NotOnSale", "InvalidResourceType.NotSupported")
NOT_FOUND_CODES = ("InvalidInstanceId.NotFound", "InvalidEniId.NotFound", "InvalidAllocationId.NotFound")


def percent(text: str) -> str:
    """RFC 3986 percent-encoding of UTF-8 text: only A-Z a-z 0-9 - _ . ~ stay as they are."""
    return quote(text, safe="-_.~")


def canonical_query(params: Mapping[str, str]) -> str:
    return "&".join(f"{percent(k)}={percent(v)}" for k, v in sorted(params.items()))


def signature(method: str, params: Mapping[str, str], secret: str) -> str:
    string_to_sign = f"{method}&{percent('/')}&{percent(canonical_query(params))}"
    digest = hmac.new(f"{secret}&".encode(), string_to_sign.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@frozen
class Credentials:
    access_key_id: str
    access_key_secret: str
    security_token: str = ""


def signed_form(method: str, action: str, version: str, params: Mapping[str, str], credentials: Credentials,
                now: float, nonce: str) -> dict[str, str]:
    """The full parameter set of one call, `Signature` included."""
    form = {
        **params,
        "Action": action, "Format": "JSON", "Version": version, "AccessKeyId": credentials.access_key_id,
        "SignatureMethod": "HMAC-SHA1", "SignatureVersion": "1.0", "SignatureNonce": nonce,
        "Timestamp": timestamp(now),
    }
    if credentials.security_token:
        form["SecurityToken"] = credentials.security_token
    form["Signature"] = signature(method, form, credentials.access_key_secret)
    return form


def rpc_error(response: RestResponse) -> ProviderError | None:
    status = response.status
    try:
        body = json.loads(response.body or b"{}")
    except ValueError:
        body = {}
    code = str(body.get("Code") or "") if isinstance(body, dict) else ""
    if 200 <= status < 300 and not code:
        return None
    message = f"{code}: {body.get('Message', '')}" if code else f"HTTP {status}"
    if status >= 500 or status == 429 or code.startswith(TRANSIENT_CODES):
        return TransientError(message)
    if code.startswith(QUOTA_CODES):
        return QuotaExceeded(message)
    if code in NOT_FOUND_CODES:
        return ProviderError(ErrorKind.NOT_FOUND, message)
    return InvalidConfig(message)


def timestamp(now: float) -> str:
    return datetime.datetime.fromtimestamp(int(now), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


CredentialSource = Callable[[], Awaitable[Credentials]]


class RpcClient:
    """Calls `action` on `endpoint` (e.g. https://ecs.cn-beijing.aliyuncs.com) with `credentials` (static keys, or
    a source of temporary ones such as RRSA's, asked before each attempt)."""

    def __init__(self, clock: IReactorTime, rest: RestClient, credentials: Credentials | CredentialSource,
                 nonce: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        self.clock = clock
        self.rest = rest
        self._nonce = nonce
        if isinstance(credentials, Credentials):
            static = credentials

            async def fixed() -> Credentials:
                return static

            self._credentials: CredentialSource = fixed
            for secret in (credentials.access_key_secret, credentials.security_token):
                if secret:
                    rest.redactor.add(secret)
        else:
            self._credentials = credentials

    async def call(self, endpoint: str, version: str, action: str, params: Mapping[str, str]) -> Any:
        async def sign(request: RestRequest) -> RestRequest:
            credentials = await self._credentials()
            form = signed_form("POST", action, version, params, credentials, self.clock.seconds(), self._nonce())
            return RestRequest(request.method, request.url, request.headers, canonical_query(form).encode())

        request = RestRequest("POST", f"{endpoint.rstrip('/')}/",
                              {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
        response = await self.rest.call(request, rpc_error, sign, what=action)
        return response.json()
