"""Fake cloud metadata services (twisted.web) for caa-process-user-data tests.

Each stands in for one real service and follows its documented paths and headers, rejecting what the
real one rejects:

- Azure IMDS: `GET /metadata/instance/compute/userData?api-version=...&format=text` needs header
  `Metadata: true` (else 400) and an `api-version`; answers the base64 of the user data.
- AWS IMDS: `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` (1..21600, else 400) gives a
  token; `GET /latest/user-data` answers the raw user data, with a valid `X-aws-ec2-metadata-token`
  (401 for an unknown token; without a token 401 when IMDSv2 is required, else served as IMDSv1).
- GCP metadata server: `GET /computeMetadata/v1/instance` and `.../instance/attributes/user-data` need
  `Metadata-Flavor: Google` (else 403); requests carrying `X-Forwarded-For` are refused (403).
- Alibaba Cloud: `GET /latest/user-data` answers the raw user data.
Every service answers 404 when no user data is set, and counts requests so tests can assert retries.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

from twisted.web import resource, server
from twisted.web.iweb import IRequest


class _Base(resource.Resource):
    isLeaf = True

    def __init__(self, user_data: bytes | None) -> None:
        super().__init__()
        self.user_data = user_data
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        #: fail the next N user-data requests with 500 (retry tests)
        self.fail_next = 0

    def _record(self, request: Any) -> tuple[str, str]:
        method = request.method.decode()
        path = request.path.decode()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((method, request.uri.decode(), headers))
        return method, path

    def _error(self, request: IRequest, code: int, text: str = "") -> bytes:
        request.setResponseCode(code)
        return text.encode()

    def _user_data_or_error(self, request: IRequest) -> bytes | None:
        if self.fail_next:
            self.fail_next -= 1
            request.setResponseCode(500)
            return b"internal error"
        if self.user_data is None:
            request.setResponseCode(404)
            return b"not found"
        return None


class AzureIMDS(_Base):
    #: serve the user data as plain text (a misconfigured VM): the client must reject it
    plain = False

    def render(self, request: Any) -> bytes:
        method, path = self._record(request)
        if request.getHeader("metadata") != "true":
            return self._error(request, 400, '{"error": "Bad request. Required metadata header not specified"}')
        if b"api-version" not in request.args:
            return self._error(request, 400, '{"error": "Bad request. api-version was not specified"}')
        if method != "GET" or path != "/metadata/instance/compute/userData":
            return self._error(request, 404)
        err = self._user_data_or_error(request)
        if err is not None:
            return err
        assert self.user_data is not None
        request.setHeader("content-type", "text/plain; charset=utf-8")
        return self.user_data if self.plain else base64.b64encode(self.user_data)


class AWSIMDS(_Base):
    def __init__(self, user_data: bytes | None, require_v2: bool = False, token_enabled: bool = True) -> None:
        super().__init__(user_data)
        self.require_v2 = require_v2
        self.token_enabled = token_enabled
        self.tokens: set[str] = set()

    def render(self, request: Any) -> bytes:
        method, path = self._record(request)
        if path == "/latest/api/token":
            if method != "PUT":
                return self._error(request, 405)
            if not self.token_enabled:
                return self._error(request, 403)
            ttl = request.getHeader("x-aws-ec2-metadata-token-ttl-seconds")
            if ttl is None or not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return self._error(request, 400)
            token = secrets.token_urlsafe(24)
            self.tokens.add(token)
            request.setHeader("x-aws-ec2-metadata-token-ttl-seconds", ttl)
            return token.encode()
        if path != "/latest/user-data" or method != "GET":
            return self._error(request, 404)
        token = request.getHeader("x-aws-ec2-metadata-token")
        if token is not None and token not in self.tokens:
            return self._error(request, 401)
        if token is None and self.require_v2:
            return self._error(request, 401)
        err = self._user_data_or_error(request)
        if err is not None:
            return err
        assert self.user_data is not None
        return self.user_data


class GCPMetadata(_Base):
    def render(self, request: Any) -> bytes:
        method, path = self._record(request)
        if request.getHeader("x-forwarded-for") is not None:
            return self._error(request, 403)
        if request.getHeader("metadata-flavor") != "Google":
            return self._error(request, 403, "Missing Metadata-Flavor:Google header.")
        request.setHeader("metadata-flavor", "Google")
        if method != "GET":
            return self._error(request, 405)
        if path in ("/computeMetadata/v1/instance", "/computeMetadata/v1/instance/"):
            return b"attributes/\nhostname\nid\n"
        if path != "/computeMetadata/v1/instance/attributes/user-data":
            return self._error(request, 404)
        err = self._user_data_or_error(request)
        if err is not None:
            return err
        assert self.user_data is not None
        # The adaptor stores GCP user data base64-encoded (user-data-encoding: base64).
        return base64.b64encode(self.user_data)


class AlibabaMetadata(_Base):
    def render(self, request: Any) -> bytes:
        method, path = self._record(request)
        if method != "GET" or path != "/latest/user-data":
            return self._error(request, 404)
        err = self._user_data_or_error(request)
        if err is not None:
            return err
        assert self.user_data is not None
        return self.user_data


def site(res: resource.Resource) -> server.Site:
    s = server.Site(res)
    s.displayTracebacks = False
    s.noisy = False
    return s
