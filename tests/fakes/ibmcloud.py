"""
`FakeIbmCloud` stands for three IBM Cloud services on one twisted.web resource, following their documented REST
shapes field for field (no emulator exists for them):

- IAM: `POST /identity/token` (form body; `grant_type=urn:ibm:params:oauth:grant-type:apikey` with `apikey`, or
  `...:cr-token` with `cr_token` and `profile_id`) -> `{"access_token", "refresh_token", "token_type": "Bearer",
  "expires_in", "expiration"}`; an unknown key -> 400 `{"errorCode": "BXNIM0415E", "errorMessage": ...}`.
- VPC (`/v1/...`): every call needs `version=YYYY-MM-DD` and `generation=2` query parameters and a live bearer
  token (else 400 / 401), errors are `{"errors": [{"code", "message", "more_info"}], "trace"}`. Instances
  (`POST/GET /v1/instances`, `GET/DELETE /v1/instances/{id}`) go `pending` -> `running` after `boot_polls` GETs,
  the primary IP `0.0.0.0` until then; profiles, images, subnets and dedicated hosts/groups are read-only tables. A
  prototype with an unknown image/profile/subnet/zone/VPC, a bad name or a duplicate name is refused (400).
- Global Tagging: `POST /v3/tags/attach?tag_type=user` with `{"resources": [{"resource_id"}], "tag_names"}`.
- Kubernetes Service: `GET /global/network/v2/security-group/getSecurityGroups?cluster=<id>&type=cluster` (with
  `X-Request-Id`) -> a list of `{"id", "type", "name", "userProvided", "shared", "workerPoolID"}`.

`throttle` answers that many next API calls with 429 `too_many_requests`. Token expiry uses `clock` (a test may
pass a `task.Clock` shared with the provider's token source).
"""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

API_KEY = "fake-ibm-api-key-0123456789"
PROFILE_ID = "Profile-0000-fake"
CR_TOKEN = "fake-projected-sa-token"
NAME = re.compile(r"^([a-z]|[a-z][-a-z0-9]*[a-z0-9])$")
VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _profile(name: str, vcpus: int, memory_gib: int, arch: str) -> dict[str, Any]:
    return {"name": name, "vcpu_count": {"type": "fixed", "value": vcpus},
            "memory": {"type": "fixed", "value": memory_gib}, "vcpu_architecture": {"type": "fixed", "value": arch}}


class _WallClock:
    def seconds(self) -> float:
        return time.time()


class FakeIbmCloud(Resource):
    isLeaf = True

    def __init__(self, clock: IReactorTime | None = None, token_lifetime: int = 3600, boot_polls: int = 1,
                 zone: str = "us-south-1") -> None:
        super().__init__()
        self.clock: Any = clock or _WallClock()
        self.token_lifetime = token_lifetime
        self.boot_polls = boot_polls
        self.zone = zone
        self.tokens: dict[str, float] = {}  # token -> expiry
        self.token_requests = 0
        self.throttle = 0
        self.calls: list[tuple[str, str]] = []
        self.rejected_tokens = 0
        self.profiles = {name: _profile(name, cpus, gib, arch) for name, cpus, gib, arch in (
            ("bx2-2x8", 2, 8, "amd64"), ("bx2-4x16", 4, 16, "amd64"), ("bz2-2x8", 2, 8, "s390x"))}
        self.images = {
            "r006-image-amd64": {"id": "r006-image-amd64", "name": "podvm-amd64", "status": "available",
                                 "operating_system": {"architecture": "amd64"}},
            "r006-image-s390x": {"id": "r006-image-s390x", "name": "podvm-s390x", "status": "available",
                                 "operating_system": {"architecture": "s390x"}},
        }
        self.subnets = {"0717-subnet-1", "0717-subnet-2"}
        self.vpcs = {"r006-vpc-1"}
        self.dedicated_hosts = {"0717-dh-other": {"id": "0717-dh-other", "zone": {"name": "us-south-2"}},
                                "0717-dh-ours": {"id": "0717-dh-ours", "zone": {"name": zone}}}
        self.host_groups = {"0717-dhg-ours": {"id": "0717-dhg-ours", "zone": {"name": zone}}}
        self.instances: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.prototypes: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, list[str]] = {}
        self.clusters = {"c123", "cl-iks-42"}
        self._ips = itertools.count(4)

    # -- plumbing -----------------------------------------------------------------------------------------
    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        path = request.path.decode()
        method = request.method.decode()
        self.calls.append((method, path))
        request.setHeader(b"content-type", b"application/json")
        if path == "/identity/token":
            return self._iam(request, body)
        if self.throttle > 0:
            self.throttle -= 1
            return self._error(request, 429, "too_many_requests", "Too many requests")
        auth = (request.getHeader("authorization") or "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        if token not in self.tokens or self.tokens[token] <= self.clock.seconds():
            self.rejected_tokens += 1
            return self._error(request, 401, "not_authorized", "The token is missing, invalid or expired")
        if path == "/v3/tags/attach":
            return self._attach(request, body)
        if path == "/global/network/v2/security-group/getSecurityGroups":
            return self._cluster_groups(request)
        if not path.startswith("/v1/"):
            return self._error(request, 404, "not_found", f"no route {path}")
        args = {k.decode(): v[-1].decode() for k, v in (request.args or {}).items()}
        if not VERSION.match(args.get("version", "")):
            return self._error(request, 400, "missing_version", "The version query parameter is required "
                                                                  "(YYYY-MM-DD)")
        if args.get("generation") != "2":
            return self._error(request, 400, "bad_request", "The generation query parameter must be 2")
        return self._vpc(request, method, path[3:], args, body)

    def _json(self, request: Request, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        return json.dumps(doc).encode()

    def _error(self, request: Request, status: int, code: str, message: str) -> bytes:
        return self._json(request, status, {"errors": [{"code": code, "message": message,
                                                        "more_info": "https://cloud.ibm.com/docs/vpc"}],
                                            "trace": uuid.uuid4().hex})

    # -- IAM ------------------------------------------------------------------------------------------------
    def _iam(self, request: Request, body: bytes) -> bytes:
        self.token_requests += 1
        form = {k: v[-1] for k, v in parse_qs(body.decode()).items()}
        grant = form.get("grant_type", "")
        ok = (grant == "urn:ibm:params:oauth:grant-type:apikey" and form.get("apikey") == API_KEY) or (
            grant == "urn:ibm:params:oauth:grant-type:cr-token" and form.get("cr_token") == CR_TOKEN
            and form.get("profile_id") == PROFILE_ID)
        if request.method != b"POST" or not ok:
            return self._json(request, 400, {"errorCode": "BXNIM0415E",
                                             "errorMessage": "Provided API key could not be found.",
                                             "context": {"requestId": uuid.uuid4().hex}})
        token = "eyJ" + uuid.uuid4().hex
        now = self.clock.seconds()
        self.tokens[token] = now + self.token_lifetime
        return self._json(request, 200, {"access_token": token, "refresh_token": "not-supported",
                                         "token_type": "Bearer", "expires_in": self.token_lifetime,
                                         "expiration": int(now) + self.token_lifetime, "scope": "ibm openid"})

    # -- VPC ------------------------------------------------------------------------------------------------
    def _vpc(self, request: Request, method: str, path: str, args: dict[str, str], body: bytes) -> bytes:
        parts = path.strip("/").split("/")
        if parts[:2] == ["instance", "profiles"] and len(parts) == 3 and method == "GET":
            found = self.profiles.get(parts[2])
            return self._json(request, 200, found) if found else self._error(
                request, 404, "instance_profile_not_found", f"Instance profile {parts[2]} not found")
        if parts[0] == "images" and len(parts) == 2 and method == "GET":
            image = self.images.get(parts[1])
            return self._json(request, 200, image) if image else self._error(
                request, 404, "image_id_not_found", f"Image {parts[1]} not found")
        if parts[0] == "subnets" and len(parts) == 2 and method == "GET":
            if parts[1] not in self.subnets:
                return self._error(request, 404, "subnet_not_found", f"Subnet not found: {parts[1]}")
            return self._json(request, 200, {"id": parts[1], "name": f"subnet-{parts[1][-1]}",
                                             "vpc": {"id": "r006-vpc-1", "name": "vpc-1"},
                                             "resource_group": {"id": "rg-0001", "name": "default"},
                                             "zone": {"name": self.zone}, "ipv4_cidr_block": "10.240.0.0/24"})
        if parts[0] == "dedicated_hosts" and len(parts) == 2 and method == "GET":
            host = self.dedicated_hosts.get(parts[1])
            return self._json(request, 200, host) if host else self._error(request, 404, "not_found", "no host")
        if parts[:2] == ["dedicated_host", "groups"] and len(parts) == 3 and method == "GET":
            group = self.host_groups.get(parts[2])
            return self._json(request, 200, group) if group else self._error(request, 404, "not_found", "no group")
        if parts == ["instances"] and method == "POST":
            return self._create(request, body)
        if parts == ["instances"] and method == "GET":
            listed = [i for i in self.instances.values() if "name" not in args or i["name"] == args["name"]]
            return self._json(request, 200, {"instances": listed, "limit": 50, "total_count": len(listed)})
        if parts[0] == "instances" and len(parts) == 2:
            instance = self.instances.get(parts[1])
            if instance is None:
                return self._error(request, 404, "not_found", f"Instance not found: {parts[1]}")
            if method == "DELETE":
                del self.instances[parts[1]]
                request.setResponseCode(204)
                return b""
            if method == "GET":
                self._advance(instance)
                return self._json(request, 200, instance)
        return self._error(request, 405, "method_not_allowed", f"{method} {path}")

    def _create(self, request: Request, body: bytes) -> bytes:
        try:
            proto = json.loads(body)
        except ValueError:
            return self._error(request, 400, "bad_request", "invalid JSON")
        problems = []
        name = str(proto.get("name") or "")
        if not NAME.match(name) or len(name) > 63:
            problems.append(("validation_invalid_name", f"name {name!r} is invalid"))
        if any(i["name"] == name for i in self.instances.values()):
            problems.append(("validation_unique_failed", f"an instance named {name} exists"))
        if (proto.get("image") or {}).get("id") not in self.images:
            problems.append(("image_id_not_found", "image not found"))
        if (proto.get("profile") or {}).get("name") not in self.profiles:
            problems.append(("instance_profile_not_found", "profile not found"))
        if (proto.get("zone") or {}).get("name") != self.zone:
            problems.append(("zone_not_found", "zone not found"))
        if (proto.get("vpc") or {}).get("id") not in self.vpcs:
            problems.append(("vpc_not_found", "VPC not found"))
        nic = proto.get("primary_network_interface") or {}
        if (nic.get("subnet") or {}).get("id") not in self.subnets:
            problems.append(("subnet_not_found", "primary_network_interface.subnet not found"))
        if proto.get("confidential_compute_mode", "disabled") not in ("disabled", "sgx", "tdx"):
            problems.append(("validation_invalid_argument", "confidential_compute_mode"))
        if not isinstance(proto.get("user_data", ""), str):
            problems.append(("validation_invalid_argument", "user_data must be a string"))
        target = (proto.get("placement_target") or {}).get("id")
        if target and target not in self.dedicated_hosts and target not in self.host_groups:
            problems.append(("placement_target_not_found", "placement target not found"))
        if problems:
            code, message = problems[0]
            return self._error(request, 400, code, message)
        instance_id = f"0717_{uuid.uuid4()}"
        nics = [{"id": f"0717-nic-{uuid.uuid4().hex[:8]}", "primary_ip": {"address": "0.0.0.0"}}]
        for _extra in proto.get("network_interfaces") or []:
            nics.append({"id": f"0717-nic-{uuid.uuid4().hex[:8]}", "primary_ip": {"address": "0.0.0.0"}})
        instance = {"id": instance_id, "crn": f"crn:v1:bluemix:public:is:{self.zone}:a/fake::instance:{instance_id}",
                    "name": name, "status": "pending", "status_reasons": [], "zone": {"name": self.zone},
                    "profile": {"name": proto["profile"]["name"]}, "image": {"id": proto["image"]["id"]},
                    "primary_network_interface": nics[0], "network_interfaces": nics}
        self.instances[instance_id] = instance
        self.polls[instance_id] = 0
        self.prototypes[instance_id] = proto
        return self._json(request, 201, instance)

    def _advance(self, instance: dict[str, Any]) -> None:
        self.polls[instance["id"]] += 1
        if instance["status"] == "pending" and self.polls[instance["id"]] >= self.boot_polls:
            instance["status"] = "running"
            for nic in instance["network_interfaces"]:
                n = next(self._ips)
                nic["primary_ip"] = {"address": f"10.240.{n // 250}.{n % 250 + 4}"}

    # -- Kubernetes Service ------------------------------------------------------------------------------------
    def _cluster_groups(self, request: Request) -> bytes:
        args = {k.decode(): v[-1].decode() for k, v in (request.args or {}).items()}
        cluster = args.get("cluster", "")
        if args.get("type") != "cluster" or not request.getHeader("x-request-id"):
            return self._error(request, 400, "bad_request", "type=cluster and X-Request-Id are required")
        if cluster not in self.clusters:
            return self._error(request, 404, "cluster_not_found", f"The cluster {cluster} could not be found")
        return self._json(request, 200, [
            {"id": f"r006-sg-kube-{cluster}", "type": "cluster", "name": f"kube-{cluster}", "userProvided": False,
             "shared": False, "workerPoolID": ""},
            {"id": "r006-sg-kube-vpc", "type": "vpc", "name": "kube-r006-vpc-1", "userProvided": False,
             "shared": True, "workerPoolID": ""}])

    # -- Global Tagging ---------------------------------------------------------------------------------------
    def _attach(self, request: Request, body: bytes) -> bytes:
        if (request.args or {}).get(b"tag_type", [b"user"])[-1] != b"user" or request.method != b"POST":
            return self._error(request, 400, "bad_request", "tag_type")
        doc = json.loads(body)
        results = []
        for resource in doc.get("resources") or []:
            crn = resource.get("resource_id", "")
            known = any(i["crn"] == crn for i in self.instances.values())
            if known:
                self.tags.setdefault(crn, []).extend(doc.get("tag_names") or [])
            results.append({"resource_id": crn, "is_error": not known})
        return self._json(request, 200, {"results": results})
