"""
moto's EC2 in server mode for the AWS tests: one `ThreadedMotoServer` on 127.0.0.1 (a free port) per test
process, started on first use and stopped at exit; plus `ThrottlingProxy`, a twisted.web front that answers
EC2's `RequestLimitExceeded` (HTTP 503) to its first requests and then relays to moto.
"""

from __future__ import annotations

import atexit
import logging
import urllib.request
from typing import Any

import treq
from twisted.internet import reactor as global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from caa.notifier import Notifier
from caa.reactors import as_node_reactor

REGION = "us-east-1"
KEY_ID = "AKIAMOTOTESTKEY00001"
SECRET = "moto-secret-key-0123456789abcdefTOPSECRET"
_endpoint: str | None = None

THROTTLED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>RequestLimitExceeded</Code>'
             b"<Message>Request limit exceeded.</Message></Error></Errors><RequestID>t</RequestID></Response>")


def moto_endpoint() -> str:
    """http://127.0.0.1:<port> of this process's moto server."""
    global _endpoint
    if _endpoint is None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        atexit.register(server.stop)
        host, port = server.get_host_and_port()
        _endpoint = f"http://{host}:{port}"
    return _endpoint


def set_auth(enforced: bool) -> None:
    """Make moto check every request's credentials (IAM users it knows), or none (its default)."""
    request = urllib.request.Request(f"{moto_endpoint()}/moto-api/reset-auth",
                                     data=b"0" if enforced else b"inf", method="POST",
                                     headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        answer.read()


async def serve(resource: Resource) -> tuple[str, IListeningPort]:
    """`resource` on http://127.0.0.1:<free port>; stop the port at the end of the test."""
    endpoint = TCP4ServerEndpoint(as_node_reactor(global_reactor), 0, interface="127.0.0.1")
    port: IListeningPort = await endpoint.listen(Site(resource))
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return f"http://127.0.0.1:{address.port}", port


class ThrottlingProxy(Resource):
    """Answers RequestLimitExceeded to the first `failures` requests, never answers the action `hang` (its
    `hung` notifier fires then), relays the rest to `upstream`."""

    isLeaf = True

    def __init__(self, upstream: str, failures: int = 2, hang: bytes = b"") -> None:
        super().__init__()
        self.upstream = upstream
        self.failures = failures
        self.hang = hang
        self.hung: Notifier[None] = Notifier()
        self.seen: list[bytes] = []  # the Action= of each request
        self.credentials: list[str] = []  # the access key id of each request's SigV4 Authorization

    def render(self, request: Request) -> Any:
        assert request.content is not None
        body = request.content.read()
        action = [part for part in body.split(b"&") if part.startswith(b"Action=")]
        self.seen.append(action[0][7:] if action else b"")
        authorization = (request.getHeader("authorization") or "").split("Credential=", 1)[-1]
        self.credentials.append(authorization.split("/", 1)[0])
        if len(self.seen) <= self.failures:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/xml")
            return THROTTLED
        if self.hang and self.seen[-1] == self.hang:
            self.hung.notify(None)
            return NOT_DONE_YET
        Deferred.fromCoroutine(self._relay(request, body))
        return NOT_DONE_YET

    async def _relay(self, request: Request, body: bytes) -> None:
        headers = Headers({name: values for name, values in request.requestHeaders.getAllRawHeaders()
                           if name.lower() not in (b"host", b"content-length")})
        answer = await treq.request(request.method.decode(), self.upstream + request.uri.decode(),
                                    headers=headers, data=body, persistent=False)
        content = await treq.content(answer)
        request.setResponseCode(answer.code)
        for name, values in answer.headers.getAllRawHeaders():
            if name.lower() not in (b"content-length", b"connection", b"transfer-encoding", b"server", b"date"):
                request.responseHeaders.setRawHeaders(name, values)
        request.write(content)
        request.finish()


class FakeImds(Resource):
    """The instance metadata service of a worker node, IMDSv2 only (a GET without the session token is 401)."""

    isLeaf = True
    TOKEN = b"imds-session-token"

    def __init__(self, values: dict[str, str]) -> None:
        super().__init__()
        self.values = values  # meta-data path -> answer

    def render(self, request: Request) -> bytes:
        path = request.path.decode()
        if request.method == b"PUT" and path == "/latest/api/token":
            if not request.getHeader("x-aws-ec2-metadata-token-ttl-seconds"):
                request.setResponseCode(400)
                return b""
            return self.TOKEN
        if request.getHeader("x-aws-ec2-metadata-token") != self.TOKEN.decode():
            request.setResponseCode(401)
            return b""
        answer = self.values.get(path.removeprefix("/latest/meta-data/"))
        if answer is None:
            request.setResponseCode(404)
            return b"Not Found"
        return answer.encode()
