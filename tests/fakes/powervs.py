"""
`FakePowerVS` stands for the IBM Cloud services the PowerVS provider calls, on one twisted.web resource, following
their documented REST shapes (no emulator exists): IAM (`POST /identity/token`, from `FakeIbmCloud`), IAM Identity
`GET /v1/apikeys/details` (header `IAM-ApiKey`) -> `{"account_id", ...}`, and the PowerVS API under
`/pcloud/v1/cloud-instances/<workspace>/`: `pvm-instances` (POST -> a list of one `PVMInstance`, GET list
`{"pvmInstances": [...]}`, GET/DELETE one), `services/dhcp` and `services/dhcp/<id>` (leases). Every PowerVS call
needs a live bearer token and the `CRN` header of the workspace
(`crn:v1:bluemix:public:power-iaas:<zone>:a/<account>:<workspace>::`); errors are `{"code", "description",
"error"}`. An instance is `BUILD` for `build_polls` GETs, then `ACTIVE` (or `ERROR` with a `fault` when its name
is in `fail_names`); networks of `dhcp_network` get no fixed IP, only a lease. Requests are refused as the real
API does: unknown image or network, a name over 47 characters, processors/memory out of range, a bad procType.
"""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

from twisted.web.server import Request

from tests.fakes.ibmcloud import API_KEY, FakeIbmCloud

ACCOUNT = "a1b2c3d4e5f60718293a4b5c6d7e8f90"
WORKSPACE = "6f1e4b0a-fake-4c3d-9e2f-powervs0001"
ZONE = "dal12"
IMAGE = "c1d2e3f4-fake-image"
NETWORK = "net-fixed-0001"
DHCP_NETWORK = "net-dhcp-0002"


class FakePowerVS(FakeIbmCloud):
    def __init__(self, build_polls: int = 2, **kw: Any) -> None:
        super().__init__(**kw)
        self.build_polls = build_polls
        self.pvm: dict[str, dict[str, Any]] = {}
        self.bodies: dict[str, dict[str, Any]] = {}
        self.fail_names: set[str] = set()
        self.leases: list[dict[str, str]] = []
        self._n = itertools.count(10)

    def render(self, request: Request) -> bytes:
        path = request.path.decode()
        if path == "/v1/apikeys/details":
            request.setHeader(b"content-type", b"application/json")
            if request.getHeader("iam-apikey") != API_KEY:
                return self._json(request, 400, {"errorCode": "BXNIM0415E",
                                                 "errorMessage": "Provided API key could not be found."})
            return self._json(request, 200, {"id": "ApiKey-1", "account_id": ACCOUNT, "iam_id": "IBMid-1"})
        prefix = f"/pcloud/v1/cloud-instances/{WORKSPACE}"
        if not path.startswith("/pcloud/"):
            return super().render(request)
        assert request.content is not None
        body = request.content.read()
        method = request.method.decode()
        self.calls.append((method, path))
        request.setHeader(b"content-type", b"application/json")
        if self.throttle > 0:
            self.throttle -= 1
            return self._pi_error(request, 429, "too many requests")
        auth = request.getHeader("authorization") or ""
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if token not in self.tokens or self.tokens[token] <= self.clock.seconds():
            return self._pi_error(request, 401, "unauthorized: invalid or expired token")
        if request.getHeader("crn") != f"crn:v1:bluemix:public:power-iaas:{ZONE}:a/{ACCOUNT}:{WORKSPACE}::":
            return self._pi_error(request, 403, "forbidden: the CRN header does not name this workspace")
        if not path.startswith(prefix + "/"):
            return self._pi_error(request, 404, "cloud instance not found")
        return self._pi(request, method, path[len(prefix):].strip("/").split("/"), body)

    def _pi_error(self, request: Request, status: int, text: str) -> bytes:
        return self._json(request, status, {"code": status, "description": text, "error": text.split(":")[0]})

    def _pi(self, request: Request, method: str, parts: list[str], body: bytes) -> bytes:
        if parts == ["pvm-instances"] and method == "POST":
            return self._create_pvm(request, json.loads(body))
        if parts == ["pvm-instances"] and method == "GET":
            return self._json(request, 200, {"pvmInstances": list(self.pvm.values())})
        if parts[0] == "pvm-instances" and len(parts) == 2:
            item = self.pvm.get(parts[1])
            if item is None:
                return self._pi_error(request, 404, f"pvm-instance not found: {parts[1]}")
            if method == "DELETE":
                del self.pvm[parts[1]]
                return self._json(request, 200, {})
            self._advance(item)
            return self._json(request, 200, item)
        if parts == ["services", "dhcp"]:
            return self._json(request, 200, [{"id": "dhcp-1", "network": {"id": DHCP_NETWORK, "name": "dhcp"},
                                              "status": "ACTIVE"}])
        if parts[:2] == ["services", "dhcp"] and len(parts) == 3:
            return self._json(request, 200, {"id": parts[2], "leases": self.leases, "status": "ACTIVE"})
        return self._pi_error(request, 405, "method not allowed")

    def _create_pvm(self, request: Request, doc: dict[str, Any]) -> bytes:
        name = str(doc.get("serverName") or "")
        problems = []
        if not name or len(name) > 47:
            problems.append(f"bad request: serverName {name!r} must be 1..47 characters")
        if doc.get("imageID") != IMAGE:
            problems.append(f"bad request: image {doc.get('imageID')} not found")
        networks = [n.get("networkID") for n in doc.get("networks") or []]
        if not networks or any(n not in (NETWORK, DHCP_NETWORK) for n in networks):
            problems.append(f"bad request: networks {networks}")
        if doc.get("procType") not in ("dedicated", "shared", "capped"):
            problems.append("bad request: procType")
        processors, memory = doc.get("processors"), doc.get("memory")
        if not isinstance(processors, (int, float)) or not 0.25 <= processors <= 64:
            problems.append("bad request: processors must be 0.25..64")
        if not isinstance(memory, (int, float)) or not 2 <= memory <= 934:
            problems.append("bad request: memory must be 2..934 GB")
        if problems:
            return self._pi_error(request, 400, problems[0])
        instance_id = str(uuid.uuid4())
        n = next(self._n)
        item = {"pvmInstanceID": instance_id, "serverName": name, "status": "BUILD", "imageID": doc["imageID"],
                "processors": processors, "memory": memory, "procType": doc["procType"], "sysType": doc.get("sysType"),
                "networks": [{"networkID": net, "type": "fixed" if net == NETWORK else "dynamic",
                              "ipAddress": "", "externalIP": "", "macAddress": f"fa:16:3e:00:00:{n:02x}"}
                             for net in networks]}
        self.pvm[instance_id] = item
        self.bodies[instance_id] = doc
        self.polls[instance_id] = 0
        return self._json(request, 201, [item])

    def _advance(self, item: dict[str, Any]) -> None:
        self.polls[item["pvmInstanceID"]] += 1
        if item["status"] != "BUILD" or self.polls[item["pvmInstanceID"]] < self.build_polls:
            return
        if item["serverName"] in self.fail_names:
            item["status"] = "ERROR"
            item["fault"] = {"code": 500, "message": "No valid host was found", "created": "2026-01-01T00:00:00Z"}
            return
        item["status"] = "ACTIVE"
        n = next(self._n)
        for net in item["networks"]:
            if net["type"] == "fixed":
                net["ipAddress"], net["externalIP"] = f"192.168.10.{n}", f"52.116.0.{n}"
            else:
                self.leases.append({"instanceIP": f"192.168.20.{n}", "instanceMacAddress": net["macAddress"]})
