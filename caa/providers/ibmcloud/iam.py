"""
IBM Cloud IAM access tokens (shared by the `ibmcloud` and `ibmcloud-powervs` providers): `POST <iam>/identity/token`
with a form body, `grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=...` for an API key, or
`grant_type=urn:ibm:params:oauth:grant-type:cr-token&cr_token=<projected token>&profile_id=...` for a trusted
profile (the compute-resource token is read from its file at each fetch: the kubelet rotates it). The answer is
`{"access_token", "refresh_token", "token_type": "Bearer", "expires_in", "expiration"}`.

The token is cached (`caa.providers.token.TokenCache`) and fetched again once 80 % of its lifetime has passed (as
IBM's SDKs do), so a call never goes out with a token about to expire; concurrent callers share one fetch.
Tokens and the API key are added to the client's `Redactor`. Errors: IAM's `{"errorCode", "errorMessage"}` body;
400/401/403 (a wrong key, an unknown profile) are INVALID_CONFIG, 429 and 5xx TRANSIENT (retried by the REST
layer).
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from caa.providers.interfaces import InvalidConfig, ProviderError, TransientError
from caa.providers.rest import RestClient, RestRequest, RestResponse
from caa.providers.token import TokenCache

DEFAULT_IAM_URL = "https://iam.cloud.ibm.com/identity/token"
APIKEY_GRANT = "urn:ibm:params:oauth:grant-type:apikey"
CR_TOKEN_GRANT = "urn:ibm:params:oauth:grant-type:cr-token"
REFRESH_FRACTION = 0.8


def iam_error(response: RestResponse) -> ProviderError | None:
    status = response.status
    if 200 <= status < 300:
        return None
    try:
        body = json.loads(response.body or b"{}")
    except ValueError:
        body = {}
    detail = ""
    if isinstance(body, dict):
        detail = " ".join(str(body.get(k) or "") for k in ("errorCode", "errorMessage")).strip()
    message = f"IAM token: HTTP {status}" + (f": {detail}" if detail else "")
    if status == 429 or status >= 500:
        return TransientError(message)
    return InvalidConfig(message)


class IamTokenSource:
    """Bearer tokens for `rest`'s calls; `sign` is the REST layer's signer."""

    _log = Logger()

    def __init__(self, clock: IReactorTime, rest: RestClient, url: str = DEFAULT_IAM_URL, api_key: str = "",
                 profile_id: str = "", cr_token_file: str = "") -> None:
        self.clock = clock
        self.rest = rest
        self.url = url
        self.api_key = api_key
        self.profile_id = profile_id
        self.cr_token_file = cr_token_file
        self._cache = TokenCache(clock, self._fetch, rest.redactor, refresh_fraction=REFRESH_FRACTION)
        if api_key:
            rest.redactor.add(api_key)

    def _form(self) -> dict[str, str]:
        if self.api_key:
            return {"grant_type": APIKEY_GRANT, "apikey": self.api_key}
        try:
            with open(self.cr_token_file) as f:
                cr_token = f.read().strip()
        except OSError as e:
            raise InvalidConfig(f"IAM trusted profile: cannot read the token file {self.cr_token_file}: "
                                f"{e.strerror}") from None
        self.rest.redactor.add(cr_token)
        return {"grant_type": CR_TOKEN_GRANT, "cr_token": cr_token, "profile_id": self.profile_id}

    @property
    def fetches(self) -> int:
        return self._cache.fetches

    async def token(self) -> str:
        return await self._cache.token()

    async def _fetch(self) -> tuple[str, float]:
        request = RestRequest("POST", self.url, {"Content-Type": "application/x-www-form-urlencoded",
                                                 "Accept": "application/json"}, urlencode(self._form()).encode())
        response = await self.rest.call(request, iam_error, what="IAM token")
        try:
            body = json.loads(response.body)
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in") or 0)
        except (ValueError, KeyError, TypeError):
            raise TransientError("IAM token: the answer has no access_token") from None
        if not token or lifetime <= 0:
            raise TransientError("IAM token: the answer has no usable access_token / expires_in")
        self._log.debug("IAM token fetched, valid {lifetime:.0f}s", lifetime=lifetime)
        return token, lifetime

    async def sign(self, request: RestRequest) -> RestRequest:
        return request.with_headers({"Authorization": f"Bearer {await self.token()}"})
