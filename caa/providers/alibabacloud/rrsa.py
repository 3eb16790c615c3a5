"""
RRSA (RAM Roles for Service Accounts, ACK's OIDC federation): temporary Alibaba Cloud keys for the role
`ALIBABA_CLOUD_ROLE_ARN`, obtained with the pod's projected service-account token
(`ALIBABA_CLOUD_OIDC_TOKEN_FILE`, audience `sts.aliyuncs.com`) from STS `AssumeRoleWithOIDC` (`Version=2015-04-01`,
an anonymous RPC call: no AccessKeyId, no signature) with `OIDCProviderArn`, `OIDCToken`, `RoleSessionName`.
The answer's `Credentials` (`AccessKeyId`, `AccessKeySecret`, `SecurityToken`, `Expiration`) are cached
(`caa.providers.token.TokenCache`) and fetched again once 80 % of their lifetime has passed; the token file is
read at each fetch (the kubelet rotates it).
"""

from __future__ import annotations

import calendar
import time
import uuid
from collections.abc import Mapping
from urllib.parse import urlencode

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from caa.providers.alibabacloud.rpc import Credentials, rpc_error, timestamp
from caa.providers.interfaces import InvalidConfig, TransientError
from caa.providers.rest import RestClient, RestRequest
from caa.providers.token import TokenCache

STS_VERSION = "2015-04-01"
DEFAULT_STS_ENDPOINT = "https://sts.aliyuncs.com"
ROLE_ARN = "ALIBABA_CLOUD_ROLE_ARN"
PROVIDER_ARN = "ALIBABA_CLOUD_OIDC_PROVIDER_ARN"
TOKEN_FILE = "ALIBABA_CLOUD_OIDC_TOKEN_FILE"
SESSION_NAME = "ALIBABA_CLOUD_ROLE_SESSION_NAME"
REFRESH_FRACTION = 0.8


def rrsa_settings(environ: Mapping[str, str]) -> tuple[str, str, str, str]:
    """(role ARN, OIDC provider ARN, token file, session name) from the environment; empty strings when unset."""
    return (environ.get(ROLE_ARN, ""), environ.get(PROVIDER_ARN, ""), environ.get(TOKEN_FILE, ""),
            environ.get(SESSION_NAME, "") or "cloud-api-adaptor")


class OidcRoleCredentials:
    """A credential source for `RpcClient`: temporary keys of the role, refreshed before they expire."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, rest: RestClient, role_arn: str, provider_arn: str, token_file: str,
                 session_name: str = "cloud-api-adaptor", endpoint: str = DEFAULT_STS_ENDPOINT) -> None:
        self.clock = clock
        self.rest = rest
        self.role_arn = role_arn
        self.provider_arn = provider_arn
        self.token_file = token_file
        self.session_name = session_name
        self.endpoint = endpoint
        self._cache = TokenCache(clock, self._fetch, rest.redactor, refresh_fraction=REFRESH_FRACTION)

    @property
    def fetches(self) -> int:
        return self._cache.fetches

    async def __call__(self) -> Credentials:
        return await self._cache.token()

    async def _fetch(self) -> tuple[Credentials, float]:
        try:
            with open(self.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise InvalidConfig(f"alibabacloud RRSA: cannot read {TOKEN_FILE} {self.token_file}: {e.strerror}") \
                from None
        self.rest.redactor.add(token)
        now = self.clock.seconds()
        form = {"Action": "AssumeRoleWithOIDC", "Format": "JSON", "Version": STS_VERSION,
                "Timestamp": timestamp(now), "SignatureNonce": uuid.uuid4().hex, "RoleArn": self.role_arn,
                "OIDCProviderArn": self.provider_arn, "OIDCToken": token, "RoleSessionName": self.session_name,
                "DurationSeconds": "3600"}
        request = RestRequest("POST", f"{self.endpoint.rstrip('/')}/",
                              {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"},
                              urlencode(form).encode())
        answer = (await self.rest.call(request, rpc_error, what="AssumeRoleWithOIDC")).json() or {}
        found = answer.get("Credentials") or {}
        try:
            credentials = Credentials(str(found["AccessKeyId"]), str(found["AccessKeySecret"]),
                                      str(found["SecurityToken"]))
            expires = calendar.timegm(time.strptime(str(found["Expiration"]), "%Y-%m-%dT%H:%M:%SZ"))
        except (KeyError, ValueError):
            raise TransientError("AssumeRoleWithOIDC: the answer has no usable Credentials") from None
        for secret in (credentials.access_key_secret, credentials.security_token):
            self.rest.redactor.add(secret)
        self._log.info("alibabacloud: RRSA keys for {role} until {expiration}", role=self.role_arn,
                       expiration=found["Expiration"])
        return credentials, max(0.0, expires - now)
