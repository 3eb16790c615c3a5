"""
Google OAuth2 access tokens for Compute Engine, requested on treq through `caa.providers.rest`.

A service-account key (--gcp-credentials, else the file GOOGLE_APPLICATION_CREDENTIALS names) is exchanged with
the JWT-bearer grant (RFC 7523, Google's "OAuth 2.0 for server to server applications"): an RS256-signed JWT
`{iss: client_email, scope, aud: https://oauth2.googleapis.com/token, iat, exp}` (header `kid` = private_key_id)
posted to the key's `token_uri` as `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<jwt>`.
The JWT is signed with `cryptography` (already a dependency) rather than google-auth: google-auth's refresh is a
blocking HTTP call that would need a thread, while the signature is a millisecond of CPU and the token request
then gets the REST layer's deadline and retries. Without a key, the GCE metadata server's token of the node's
service account is used (`GET /computeMetadata/v1/instance/service-accounts/default/token`, `Metadata-Flavor: Google`).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from attrs import field, frozen
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from caa.providers.interfaces import InvalidConfig
from caa.providers.rest import RestClient, RestRequest
from caa.providers.token import token_error, token_response

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
#: The JWT's `aud`: always Google's token endpoint, also when the key's token_uri names another host (a private
#: endpoint); Google checks it, as google-auth's service_account credentials send it.
TOKEN_AUDIENCE = DEFAULT_TOKEN_URI
ASSERTION_LIFETIME = 3600


@frozen
class ServiceAccountKey:
    client_email: str
    private_key_id: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    token_uri: str
    project_id: str = ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parse_key(text: str, source: str) -> tuple[ServiceAccountKey, str]:
    """The key of a service-account JSON and its PEM text (a secret to mask); InvalidConfig naming `source`."""
    try:
        data: Any = json.loads(text)
    except ValueError:
        raise InvalidConfig(f"gcp: {source} is not JSON") from None
    if not isinstance(data, dict) or data.get("type") != "service_account":
        raise InvalidConfig(f"gcp: {source} is not a service account key (\"type\": \"service_account\")")
    missing = [name for name in ("client_email", "private_key") if not data.get(name)]
    if missing:
        raise InvalidConfig(f"gcp: {source} lacks {', '.join(missing)}")
    pem = str(data["private_key"])
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise InvalidConfig(f"gcp: {source}: private_key is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InvalidConfig(f"gcp: {source}: private_key is not an RSA key")
    return ServiceAccountKey(str(data["client_email"]), str(data.get("private_key_id", "")), key,
                             str(data.get("token_uri") or DEFAULT_TOKEN_URI), str(data.get("project_id", ""))), pem


def assertion(key: ServiceAccountKey, now: float, scope: str = SCOPE) -> str:
    """The signed JWT of the JWT-bearer grant."""
    header = {"alg": "RS256", "typ": "JWT", "kid": key.private_key_id}
    claims = {"iss": key.client_email, "scope": scope, "aud": TOKEN_AUDIENCE, "iat": int(now),
              "exp": int(now) + ASSERTION_LIFETIME}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = key.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


async def service_account_token(
    rest: RestClient, key: ServiceAccountKey, wall_clock: Callable[[], float] = time.time
) -> tuple[str, float]:
    """An access token for `key` and its lifetime. `wall_clock`: iat/exp are real times (Google checks them)."""
    form = {"grant_type": JWT_BEARER_GRANT, "assertion": assertion(key, wall_clock())}
    request = RestRequest("POST", key.token_uri, {"Content-Type": "application/x-www-form-urlencoded"},
                          urlencode(form).encode())
    what = f"gcp token for {key.client_email}"
    return token_response(await rest.call(request, error_of=token_error, what=what), what)


async def metadata_token(rest: RestClient, metadata_host: str) -> tuple[str, float]:
    """The node's service account token from the GCE metadata server."""
    base = metadata_host if metadata_host.startswith("http") else f"http://{metadata_host}"
    request = RestRequest("GET", f"{base}/computeMetadata/v1/instance/service-accounts/default/token?"
                                 + urlencode({"scopes": SCOPE}), {"Metadata-Flavor": "Google"})
    what = "gcp metadata server token"
    return token_response(await rest.call(request, error_of=token_error, what=what), what)
