"""
A fake of the Google endpoints the gcp provider talks to, for tests (GCP has no emulator): one twisted.web
resource standing for

- Google's OAuth2 token endpoint, `POST /token` with the JWT-bearer grant: the assertion's RS256 signature is
  checked against the test service account's public key, and its `iss`, `aud` (Google's token endpoint, whatever
  URL the request went to), `scope`, `iat`/`exp` (at most an hour, not expired) as Google checks them;
  refusals are `{"error": "invalid_grant", "error_description"}`,
- the GCE metadata server's token, `GET /computeMetadata/v1/instance/service-accounts/default/token`
  (`Metadata-Flavor: Google` required, else 403),
- Compute Engine v1 under `/compute/v1/projects/{project}/`: `zones/{zone}/machineTypes/{type}`,
  `global/images/{image}`, `zones/{zone}/instances` (insert, get, delete) and `zones/{zone}/operations/{op}`;
  bearer tokens required (401 `UNAUTHENTICATED`, reason `required` / `authError`), Google's error bodies
  `{"error": {"code", "message", "errors": [{"message", "domain", "reason"}], "status"}}`, 404 `notFound`,
  409 `alreadyExists`, 400 `invalid` / `parseError` for a malformed body; insert and delete answer a zone
  `compute#operation` that is RUNNING for `operation_polls` GETs and then DONE; an instance is PROVISIONING,
  STAGING, then RUNNING with its `networkIP` (10.128.0.2 onwards; `natIP` 34.0.0.x with an access config),
  STOPPING while it is deleted,
- Compute persistent disks: `zones/{zone}/disks/{disk}` (get) for the disks `add_disk` made (in ZONE or
  OTHER_ZONE),
- Resource Manager v3 `GET /v3/tagValues/namespaced?name={project}/{key}/{value}` (403 PERMISSION_DENIED for an
  unknown value, as the real one answers).

It rejects what Compute rejects for these calls: an invalid instance name, an unknown machine type, image, disk
type, network or subnetwork, one given as a bare name instead of a full or partial URL (e.g. `global/networks/x`), a
confidential instance type the machine series cannot run (SEV: n2d/c2d/c3d, SEV_SNP: n2d, TDX: c3), pd-standard on a
series that has none (c3, c3d, c4, n4), CVM or a GPU machine type without onHostMaintenance TERMINATE, user data
that is not base64, `params.resourceManagerTags` not of the form tagKeys/N -> tagValues/N; for `disks[]`: exactly
one boot disk, first, with initializeParams; every other entry an existing disk by `source` (404 notFound
otherwise) in the instance's zone, with a unique valid `deviceName`, not used READ_WRITE by another instance (400
resourceInUseByAnotherResource). Attached disks list the instance in their `users` (`attachments` records
(instance, deviceName, source path) in order); when the instance goes, those with `autoDelete` (default false for
an attached disk) are deleted with it, the others stay with the instance gone from `users`.

`throttle(n, status)` makes the next n Compute requests answer 429 rateLimitExceeded (or 503 backendError);
`fail_insert = code` ends the next insert's operation with that error code; `hang_once(text)` leaves the next
request whose path contains `text` unanswered (its `hung` notifier fires then), `lose_answer_once(method, text)`
carries one out but never answers it (Compute's `requestId` makes the client's retry safe: a repeated id answers
the first one's operation); `revoke_tokens()` makes Compute refuse every token.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from caa.notifier import Notifier

PROJECT = "caa-project"
ZONE = "us-central1-a"
OTHER_ZONE = "us-central1-b"  # holds disks only
CLIENT_EMAIL = f"caa-adaptor@{PROJECT}.iam.gserviceaccount.com"
KEY_ID = "5e7a0000c0ffee0000000000000000000000caa1"
IMAGE = "podvm-image"
NETWORK = "default"
SUBNETWORK = "pods"
MACHINE_TYPES = {  # name -> (guestCpus, memoryMb, accelerators)
    "e2-medium": (2, 4096, 0), "n2d-standard-2": (2, 8192, 0), "n2d-standard-4": (4, 16384, 0),
    "n2d-standard-8": (8, 32768, 0), "c3-standard-4": (4, 16384, 0), "a2-highgpu-1g": (12, 87040, 1),
}
#: Compute's links (selfLink, targetLink, ...) name this host whatever endpoint the request went to (a private
#: endpoint, this fake): a client that follows them as URLs leaves its endpoint.
LINK = "https://www.googleapis.com/compute/v1"
DISK_TYPES = ("pd-standard", "pd-balanced", "pd-ssd", "pd-extreme", "hyperdisk-balanced")
#: Machine series that take no Standard Persistent Disk (third generation and later, e.g. C3: TDX)
NO_PD_STANDARD = ("c3", "c3d", "c4", "n4")
CVM_SERIES = {"SEV": ("n2d", "c2d", "c3d"), "SEV_SNP": ("n2d",), "TDX": ("c3",)}
TAGS = {f"{PROJECT}/env/prod": ("tagKeys/281474976710001", "tagValues/281474976710101")}
_PRIVATE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def service_account_json(token_uri: str, key: rsa.RSAPrivateKey = _PRIVATE_KEY) -> str:
    """A service account key file's JSON for the fake's account (what `gcloud iam service-accounts keys create`
    writes)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return json.dumps({"type": "service_account", "project_id": PROJECT, "private_key_id": KEY_ID,
                       "private_key": pem, "client_email": CLIENT_EMAIL, "client_id": "104000000000000000001",
                       "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": token_uri})


class GoogleError(Exception):
    def __init__(self, code: int, reason: str, message: str, status: str) -> None:
        super().__init__(code, reason, message)
        self.code, self.reason, self.message, self.status = code, reason, message, status


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeGcp(Resource):
    isLeaf = True

    def __init__(self, token_lifetime: int = 3600, operation_polls: int = 1) -> None:
        super().__init__()
        self.base = ""  # http://127.0.0.1:<port>, set by the test once listening
        self.token_lifetime = token_lifetime
        self.operation_polls = operation_polls
        self.tokens: dict[str, float] = {}
        self.token_requests: list[dict[str, str]] = []
        self.instances: dict[str, dict[str, Any]] = {}
        self.inserted: dict[str, Any] = {}  # name -> the insert body
        self.disks: dict[str, dict[str, Any]] = {}  # projects/<p>/zones/<z>/disks/<name> -> disk
        self.attachments: list[tuple[str, str, str]] = []  # (instance, deviceName, disk path) of every attach
        self.operations: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every Compute / Resource Manager request
        self.images = {f"projects/{PROJECT}/global/images/{IMAGE}": 20,
                       "projects/confidential-images/global/images/podvm-tdx": 30}
        self.revoked = False
        self.throttled = 0
        self.throttle_status = 429
        self.hang = ""
        self.lose: tuple[str, str, bool] | None = None
        self.hung: Notifier[str] = Notifier()
        self.request_ids: dict[str, str] = {}  # requestId -> the name of the operation it started
        self.fail_insert = ""  # an operation error code the next insert ends with (the instance is not created)
        self._ips = itertools.count(2)
        self._nat = itertools.count(10)
        self._ids = itertools.count(4000000000000000001)

    # -- test controls ------------------------------------------------------------------------------------
    def throttle(self, count: int, status: int = 429) -> None:
        self.throttled, self.throttle_status = count, status

    def hang_once(self, text: str) -> None:
        self.hang = text

    def add_disk(self, name: str, zone: str = ZONE, size_gb: int = 10, status: str = "READY") -> str:
        """A persistent disk as the PD CSI driver's CreateVolume leaves it (no users); its path (the driver's
        volume handle)."""
        path = f"projects/{PROJECT}/zones/{zone}/disks/{name}"
        self.disks[path] = {
            "kind": "compute#disk", "id": str(next(self._ids)), "name": name, "sizeGb": str(size_gb),
            "zone": f"{LINK}/projects/{PROJECT}/zones/{zone}", "status": status,
            "type": f"{LINK}/projects/{PROJECT}/zones/{zone}/diskTypes/pd-balanced",
            "selfLink": f"{LINK}/{path}", "users": []}
        return path

    def lose_answer_once(self, method: str, text: str, hang: bool = False) -> None:
        """Carry out the next Compute `method` request whose path contains `text`, then drop the connection
        without answering (or, with `hang`, keep it open and never answer; `hung` fires)."""
        self.lose = (method, text, hang)

    def expire_tokens(self) -> None:
        for token in self.tokens:
            self.tokens[token] = 0.0

    def revoke_tokens(self) -> None:
        """The token endpoint still issues tokens, but Compute refuses them all (401)."""
        self.revoked = True

    # -- dispatch -------------------------------------------------------------------------------------------
    def render(self, request: Request) -> bytes:
        path = request.path.decode()
        assert request.content is not None
        raw = request.content.read()
        try:
            if path == "/token":
                return self._token(request, raw)
            if path == "/computeMetadata/v1/instance/service-accounts/default/token":
                return self._metadata_token(request)
            self.requests.append((request.method.decode(), path))
            if self.hang and self.hang in path:
                self.hang = ""
                self.hung.notify(path)
                return NOT_DONE_YET  # type: ignore[return-value]
            self._authorize(request)
            if path == "/v3/tagValues/namespaced":
                return self._json(request, 200, self._tag_value(request))
            if path.startswith("/compute/v1/"):
                answer = self._compute(request, path.removeprefix("/compute/v1/"), raw)
                if self.lose and self.lose[0] == request.method.decode() and self.lose[1] in path:
                    hang, self.lose = self.lose[2], None
                    if hang:  # done, but the answer never comes
                        self.hung.notify(path)
                    else:  # done, then the connection drops before the answer
                        request.transport.abortConnection()  # type: ignore[union-attr]
                    return NOT_DONE_YET  # type: ignore[return-value]
                return self._json(request, 200, answer)
            raise GoogleError(404, "notFound", f"The requested URL {path} was not found on this server.",
                              "NOT_FOUND")
        except GoogleError as e:
            return self._json(request, e.code, {"error": {
                "code": e.code, "message": e.message, "status": e.status,
                "errors": [{"message": e.message, "domain": "global", "reason": e.reason}]}})

    def _json(self, request: Request, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=UTF-8")
        return json.dumps(body).encode()

    # -- tokens ---------------------------------------------------------------------------------------------
    def _issue(self) -> dict[str, Any]:
        token = "ya29.c." + secrets.token_urlsafe(32)
        self.tokens[token] = time.time() + self.token_lifetime
        return {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}

    def _refuse(self, request: Request, description: str) -> bytes:
        return self._json(request, 400, {"error": "invalid_grant", "error_description": description})

    def _token(self, request: Request, raw: bytes) -> bytes:
        form = {k: v[-1] for k, v in parse_qs(raw.decode()).items()}
        self.token_requests.append(form)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return self._json(request, 400, {"error": "unsupported_grant_type",
                                             "error_description": "Invalid grant_type: " + form.get("grant_type", "")})
        parts = form.get("assertion", "").split(".")
        if len(parts) != 3:
            return self._refuse(request, "Invalid JWT: malformed")
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            _PRIVATE_KEY.public_key().verify(_unb64(parts[2]), f"{parts[0]}.{parts[1]}".encode(),
                                             padding.PKCS1v15(), hashes.SHA256())
        except (ValueError, binascii.Error):
            return self._refuse(request, "Invalid JWT: malformed")
        except InvalidSignature:
            return self._refuse(request, "Invalid JWT Signature.")
        now = time.time()
        if header.get("alg") != "RS256" or header.get("kid") != KEY_ID:
            return self._refuse(request, "Invalid JWT Signature.")
        if claims.get("iss") != CLIENT_EMAIL:
            return self._refuse(request, "Invalid grant: account not found")
        if claims.get("aud") != "https://oauth2.googleapis.com/token" or not claims.get("scope"):
            return self._refuse(request, "Invalid JWT: audience or scope")
        iat, exp = claims.get("iat", 0), claims.get("exp", 0)
        if exp - iat > 3600 or iat > now + 300 or exp < now:
            return self._refuse(request, "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                                         "reasonable timeframe. Check your iat and exp values in the JWT claim.")
        return self._json(request, 200, self._issue())

    def _metadata_token(self, request: Request) -> bytes:
        if request.getHeader("metadata-flavor") != "Google":
            request.setResponseCode(403)
            return b"Missing Metadata-Flavor:Google header."
        return self._json(request, 200, self._issue())

    def _authorize(self, request: Request) -> None:
        authorization = request.getHeader("authorization") or ""
        if not authorization:
            raise GoogleError(401, "required", "Request is missing required authentication credential. Expected "
                                               "OAuth 2 access token.", "UNAUTHENTICATED")
        expiry = self.tokens.get(authorization.removeprefix("Bearer "))
        if not authorization.startswith("Bearer ") or expiry is None or expiry < time.time() or self.revoked:
            raise GoogleError(401, "authError", "Request had invalid authentication credentials. Expected OAuth 2 "
                                                "access token.", "UNAUTHENTICATED")
        if self.throttled > 0:
            self.throttled -= 1
            if self.throttle_status == 429:
                raise GoogleError(429, "rateLimitExceeded", "Rate Limit Exceeded", "RESOURCE_EXHAUSTED")
            raise GoogleError(503, "backendError", "Backend Error", "UNAVAILABLE")

    def _tag_value(self, request: Request) -> dict[str, Any]:
        name = request.args.get(b"name", [b""])[-1].decode()
        found = TAGS.get(name)
        if found is None:
            raise GoogleError(403, "forbidden", "Permission denied on resource (or it may not exist).",
                              "PERMISSION_DENIED")
        return {"name": found[1], "parent": found[0], "shortName": name.rsplit("/", 1)[-1],
                "namespacedName": name}

    # -- compute --------------------------------------------------------------------------------------------
    def _not_found(self, what: str) -> GoogleError:
        return GoogleError(404, "notFound", f"The resource '{what}' was not found", "NOT_FOUND")

    def _compute(self, request: Request, path: str, raw: bytes) -> Any:
        method = request.method.decode()
        parts = path.split("/")
        if len(parts) < 2 or parts[0] != "projects":
            raise self._not_found(path)
        project = parts[1]
        rest = parts[2:]
        if rest[:2] == ["global", "images"] and len(rest) == 3 and method == "GET":
            size = self.images.get(path)
            if size is None:
                raise self._not_found(path)
            return {"kind": "compute#image", "name": rest[2], "diskSizeGb": str(size), "status": "READY",
                    "selfLink": f"{LINK}/{path}"}
        if project != PROJECT:
            raise self._not_found(f"projects/{project}")
        if len(rest) < 3 or rest[0] != "zones":
            raise self._not_found(path)
        collection, item = rest[2], rest[3] if len(rest) > 3 else ""
        if rest[1] != ZONE and not (rest[1] == OTHER_ZONE and collection == "disks"):
            raise GoogleError(400, "invalid", f"Invalid value for field 'zone': '{rest[1]}'. Unknown zone.",
                              "INVALID_ARGUMENT")
        if collection == "disks" and item and method == "GET":
            disk = self.disks.get(path)
            if disk is None:
                raise self._not_found(path)
            return disk
        if collection == "machineTypes" and item and method == "GET":
            found = MACHINE_TYPES.get(item)
            if found is None:
                raise self._not_found(path)
            cpus, memory, gpus = found
            answer: dict[str, Any] = {"kind": "compute#machineType", "name": item, "guestCpus": cpus,
                                      "memoryMb": memory, "zone": ZONE}
            if gpus:
                answer["accelerators"] = [{"guestAcceleratorType": "nvidia-tesla-a100", "guestAcceleratorCount": gpus}]
            return answer
        if collection == "operations" and item and method == "GET":
            return self._operation(item)
        if collection == "instances":
            if not item and method == "POST":
                return self._once(request, lambda: self._insert(raw))
            if item and method == "GET":
                return self._get(item)
            if item and method == "DELETE":
                return self._once(request, lambda: self._delete(item))
        raise self._not_found(path)

    def _operation(self, name: str) -> dict[str, Any]:
        operation = self.operations.get(name)
        if operation is None:
            raise self._not_found(f"projects/{PROJECT}/zones/{ZONE}/operations/{name}")
        if operation["status"] != "DONE":
            operation["_polls"] -= 1
            if operation["_polls"] < 0:
                operation["status"] = "DONE"
                target = operation["targetLink"].rsplit("/", 1)[-1]
                if operation["operationType"] == "delete" or operation.get("error"):
                    self._release(self.instances.pop(target, None))
        return {k: v for k, v in operation.items() if not k.startswith("_")}

    def _start(self, kind: str, target: str) -> dict[str, Any]:
        name = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
        operation = {
            "kind": "compute#operation", "id": str(next(self._ids)), "name": name, "zone": ZONE,
            "operationType": kind, "status": "RUNNING", "progress": 0,
            "targetLink": f"{LINK}/projects/{PROJECT}/zones/{ZONE}/instances/{target}",
            "selfLink": f"{LINK}/projects/{PROJECT}/zones/{ZONE}/operations/{name}",
            "_polls": self.operation_polls,
        }
        self.operations[name] = operation
        return {k: v for k, v in operation.items() if not k.startswith("_")}

    def _once(self, request: Request, start: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Compute's `requestId`: a request repeated with the same id is not carried out again; the answer is the
        operation the first one started."""
        request_id = request.args.get(b"requestId", [b""])[-1].decode()
        if request_id and request_id in self.request_ids:
            return self._operation(self.request_ids[request_id])
        operation = start()
        if request_id:
            self.request_ids[request_id] = operation["name"]
        return operation

    def _resolve(self, field: str, link: Any) -> str:
        """`projects/...` of a full or partial resource URL as Compute takes them (an API URL, `projects/...`, or
        `global/...`, `regions/...`, `zones/...` in the request's project); anything else, a bare name too, is
        400 "The URL is malformed"."""
        text = str(link or "")
        for prefix in (f"{self.base}/compute/v1/", "https://www.googleapis.com/compute/v1/",
                       "https://compute.googleapis.com/compute/v1/"):
            text = text.removeprefix(prefix)
        if text.startswith(("global/", "regions/", "zones/")):
            text = f"projects/{PROJECT}/{text}"
        if not text.startswith("projects/") or text.count("/") < 3:
            raise self._invalid(f"Invalid value for field 'resource.{field}': '{link}'. The URL is malformed.")
        return text

    def _invalid(self, message: str) -> GoogleError:
        return GoogleError(400, "invalid", message, "INVALID_ARGUMENT")

    def _insert(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except ValueError:
            raise GoogleError(400, "parseError", "Invalid JSON payload received.", "INVALID_ARGUMENT") from None
        if not isinstance(body, dict):
            raise GoogleError(400, "parseError", "Invalid JSON payload received.", "INVALID_ARGUMENT")
        name = str(body.get("name", ""))
        if not _NAME.match(name):
            raise self._invalid(f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'")
        if name in self.instances:
            raise GoogleError(409, "alreadyExists", f"The resource 'projects/{PROJECT}/zones/{ZONE}/instances/"
                                                    f"{name}' already exists", "ALREADY_EXISTS")
        machine_link = self._resolve("machineType", body.get("machineType"))
        machine = machine_link.rsplit("/", 1)[-1]
        if machine_link != f"projects/{PROJECT}/zones/{ZONE}/machineTypes/{machine}" or machine not in MACHINE_TYPES:
            raise self._invalid(f"Invalid value for field 'resource.machineType': '{body.get('machineType')}'. "
                                "Machine type with name does not exist in zone.")
        disks = body.get("disks") or []
        if not disks or not disks[0].get("boot") or any(d.get("boot") for d in disks[1:]):
            raise self._invalid("Invalid value for field 'resource.disks': one boot disk is required and it must "
                                "be the first disk.")
        attached = self._attached_disks(name, disks[1:])
        params = disks[0].get("initializeParams", {})
        image = str(params.get("sourceImage", ""))
        image_key = self._resolve("disks[0].initializeParams.sourceImage", image)
        if image_key not in self.images:
            raise self._not_found(image)
        disk_type = self._resolve("disks[0].initializeParams.diskType", params.get("diskType"))
        if disk_type not in {f"projects/{PROJECT}/zones/{ZONE}/diskTypes/{t}" for t in DISK_TYPES}:
            raise self._invalid(f"Invalid value for field 'resource.disks[0].initializeParams.diskType': "
                                f"'{params.get('diskType')}'.")
        if disk_type.endswith("/pd-standard") and machine.split("-", 1)[0] in NO_PD_STANDARD:
            raise self._invalid(f"[pd-standard] features are not compatible for creating instance with machine type "
                                f"{machine}.")
        if int(params.get("diskSizeGb") or 0) < self.images[image_key]:
            raise self._invalid(f"Requested disk size cannot be smaller than the image size "
                                f"({self.images[image_key]} GB)")
        interfaces = body.get("networkInterfaces") or []
        if len(interfaces) != 1:
            raise self._invalid("Invalid value for field 'resource.networkInterfaces'.")
        interface = interfaces[0]
        if self._resolve("networkInterfaces[0].network", interface.get("network")) != \
                f"projects/{PROJECT}/global/networks/{NETWORK}":
            raise self._not_found(str(interface.get("network")))
        subnetwork = interface.get("subnetwork")
        if subnetwork is not None and self._resolve("networkInterfaces[0].subnetwork", subnetwork) != \
                f"projects/{PROJECT}/regions/us-central1/subnetworks/{SUBNETWORK}":
            raise self._not_found(str(subnetwork))
        confidential = body.get("confidentialInstanceConfig")
        if confidential is not None:
            kind = confidential.get("confidentialInstanceType")
            if kind not in CVM_SERIES:
                raise self._invalid(f"Invalid value for field 'resource.confidentialInstanceConfig."
                                    f"confidentialInstanceType': '{kind}'.")
            if machine.split("-", 1)[0] not in CVM_SERIES[kind]:
                raise self._invalid(f"Confidential Instance Config of type {kind} is not supported for machine "
                                    f"type {machine}.")
            if body.get("scheduling", {}).get("onHostMaintenance") != "TERMINATE":
                raise self._invalid("Confidential VMs must have onHostMaintenance set to TERMINATE.")
        if MACHINE_TYPES[machine][2] and body.get("scheduling", {}).get("onHostMaintenance") != "TERMINATE":
            raise self._invalid("Instances with guest accelerators do not support live migration.")
        items = {i.get("key"): i.get("value") for i in body.get("metadata", {}).get("items", [])}
        if items.get("user-data-encoding") == "base64":
            try:
                base64.b64decode(str(items.get("user-data", "")), validate=True)
            except binascii.Error:
                raise self._invalid("user-data is not base64") from None
        for key, value in body.get("params", {}).get("resourceManagerTags", {}).items():
            if not re.match(r"^tagKeys/\d+$", key) or not re.match(r"^tagValues/\d+$", str(value)):
                raise self._invalid(f"Invalid resource manager tag {key}={value}.")
        nic: dict[str, Any] = {"name": "nic0", "network": interface["network"],
                               "networkIP": f"10.128.0.{next(self._ips)}", "stackType": "IPV4_ONLY"}
        if subnetwork:
            nic["subnetwork"] = subnetwork
        if interface.get("accessConfigs"):
            nic["accessConfigs"] = [{**a, "natIP": f"34.0.0.{next(self._nat)}"} for a in interface["accessConfigs"]]
        self.inserted[name] = body
        failure, self.fail_insert = self.fail_insert, ""
        link = f"{LINK}/projects/{PROJECT}/zones/{ZONE}/instances/{name}"
        for entry in attached:
            self.disks[entry["_path"]]["users"].append(link)
            self.attachments.append((name, entry["deviceName"], entry["_path"]))
        self.instances[name] = {
            "kind": "compute#instance", "id": str(next(self._ids)), "name": name, "zone": ZONE,
            "machineType": f"{LINK}/projects/{PROJECT}/zones/{ZONE}/machineTypes/{machine}",
            "status": "PROVISIONING", "networkInterfaces": [nic], "metadata": body.get("metadata", {}),
            "disks": [{"boot": True, "autoDelete": bool(disks[0].get("autoDelete")), "index": 0,
                       "deviceName": "persistent-disk-0", "type": "PERSISTENT"},
                      *({k: v for k, v in e.items() if k != "_path"} for e in attached)],
            "selfLink": link, "_gets": 0, "_attached": attached,
        }
        operation = self._start("insert", name)
        if failure:
            self.operations[operation["name"]].update(
                error={"errors": [{"code": failure, "message": f"The zone '{ZONE}' does not have enough resources "
                                                               "available to fulfill the request."}]},
                httpErrorStatusCode=503, httpErrorMessage="SERVICE UNAVAILABLE")
        return operation

    def _attached_disks(self, instance: str, entries: list[Any]) -> list[dict[str, Any]]:
        """The non-boot disks of an insert as the instance lists them, after Compute's checks."""
        out: list[dict[str, Any]] = []
        for index, entry in enumerate(entries, start=1):
            field = f"resource.disks[{index}]"
            source = str(entry.get("source", ""))
            if not source or "initializeParams" in entry:
                raise self._invalid(f"Invalid value for field '{field}': only existing disks (source) are modelled.")
            path = source[source.find("projects/"):] if "projects/" in source else source
            disk = self.disks.get(path)
            if disk is None:
                raise self._not_found(path)
            if path.split("/")[3] != ZONE:
                raise self._invalid(f"Invalid value for field '{field}.source': '{source}'. Disk must be in the "
                                    "same zone as the instance.")
            device = str(entry.get("deviceName") or f"persistent-disk-{index}")
            if not _NAME.match(device) or any(d["deviceName"] == device for d in out):
                raise self._invalid(f"Invalid value for field '{field}.deviceName': '{device}'.")
            mode = str(entry.get("mode", "READ_WRITE"))
            if disk["users"] and mode == "READ_WRITE":
                raise GoogleError(400, "resourceInUseByAnotherResource", f"The disk resource '{path}' is already "
                                                                         f"being used by '{disk['users'][0]}'",
                                  "INVALID_ARGUMENT")
            out.append({"boot": False, "autoDelete": bool(entry.get("autoDelete", False)), "index": index,
                        "deviceName": device, "mode": mode, "type": "PERSISTENT", "source": disk["selfLink"],
                        "_path": path})
        return out

    def _release(self, instance: dict[str, Any] | None) -> None:
        """The instance is gone: its attached disks are deleted with it (autoDelete) or freed."""
        if instance is None:
            return
        for entry in instance["_attached"]:
            disk = self.disks.get(entry["_path"])
            if disk is None:
                continue
            if entry["autoDelete"]:
                del self.disks[entry["_path"]]
            else:
                disk["users"] = [u for u in disk["users"] if u != instance["selfLink"]]

    def _get(self, name: str) -> dict[str, Any]:
        instance = self.instances.get(name)
        if instance is None:
            raise self._not_found(f"projects/{PROJECT}/zones/{ZONE}/instances/{name}")
        if instance["status"] in ("PROVISIONING", "STAGING"):
            instance["_gets"] += 1
            instance["status"] = "STAGING" if instance["_gets"] < 2 else "RUNNING"
        return {k: v for k, v in instance.items() if not k.startswith("_")}

    def _delete(self, name: str) -> dict[str, Any]:
        instance = self.instances.get(name)
        if instance is None:
            raise self._not_found(f"projects/{PROJECT}/zones/{ZONE}/instances/{name}")
        instance["status"] = "STOPPING"
        return self._start("delete", name)
