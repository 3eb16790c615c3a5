"""
A fake of the Azure endpoints the azure provider talks to, for tests (Azure has no emulator): one twisted.web
resource standing for

- the Microsoft identity platform's token endpoint, `POST /{tenant}/oauth2/v2.0/token` (client credentials with
  a client secret or a federated client assertion; OAuth2 error bodies `{"error", "error_description"}` with
  AADSTS codes),
- the instance metadata service's managed identity endpoint, `GET /metadata/identity/oauth2/token`
  (`Metadata: true` required; `expires_in` as a string, as IMDS sends it),
- Azure Resource Manager for one subscription: Microsoft.Compute `virtualMachines`, `disks`, `locations/{region}/
  vmSizes` (one unpaged list) and Microsoft.Network `networkInterfaces`, `publicIPAddresses`,
  `virtualNetworks/{vnet}/subnets`, with `api-version` required on every request, bearer tokens checked
  (missing → AuthenticationFailed, unknown → InvalidAuthenticationToken, expired → ExpiredAuthenticationToken),
  ARM error bodies `{"error": {"code", "message"}}`, 404 ResourceNotFound / ResourceGroupNotFound, a malformed
  body → 400 InvalidRequestContent, and ARM's long-running operations: PUT answers 201 (DELETE 202) with an
  `Azure-AsyncOperation` URL (DELETE also `Location`) and `Retry-After`, the operation reports `InProgress`
  for `operation_polls` GETs, then `Succeeded`; a DELETE of a missing resource answers 204.

It enforces what ARM enforces for these calls: the NIC a VM names must exist and be free, a NIC cannot be deleted
while a VM uses it, a public IP cannot be deleted while a NIC uses it, a reserved admin user name (root, admin, ...)
is refused, the subnet, NSG, image (404 NotFound; a gallery image GalleryImageNotFound) and VM size must exist, a
ConfidentialVM security profile needs the OS disk's `securityEncryptionType` and a vTPM (and that encryption type
needs the ConfidentialVM profile), and `userData` must be base64. VMs get their NIC's private IP (10.1.0.4 onwards);
the OS disk and a NIC with deleteOption Delete go with the VM.

Managed data disks (`add_disk` makes one, `Unattached`): a VM's `storageProfile.dataDisks` must name existing
disks (404 NotFound otherwise), in the VM's region, each once at a distinct LUN 0-63, no more than the size's
`maxDataDiskCount` (4 here; 409 OperationNotAllowed), none held by another VM (409 ConflictingUserInput, ARM's
"already attached" text); only createOption Attach is modelled. The VM holds them (`managedBy`, diskState
`Attached`; `attachments` records (vm, lun, disk id) in order); when the VM goes a data disk with deleteOption
Delete goes too, any other (Detach, ARM's default for an attached disk) becomes `Unattached`. A disk held by a
VM cannot be deleted (409 OperationNotAllowed).

`throttle(n)` makes the next n ARM requests answer 429 with `Retry-After: 1`; `fail_vm = (code, message)` makes
the next VM create's operation end Failed with that error; `hang_once(text)` leaves the next ARM request whose
path contains `text` unanswered (its `hung` notifier fires then).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import secrets
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from caa.notifier import Notifier

TENANT = "72f988bf-0000-4000-8000-00000000c0ca"
CLIENT_ID = "0c1e0000-aaaa-4bbb-8ccc-000000c11e47"
CLIENT_SECRET = "azure-client-secret~0123456789TOPSECRET"
SUBSCRIPTION = "5ab5c41b-0000-4000-8000-00000000005b"
GROUP = "caa-rg"
REGION = "eastus"
FEDERATED_TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6Y2FhIn0.c2ln"
API_VERSIONS = {
    "Microsoft.Compute": {"2023-09-01", "2024-03-01", "2024-07-01"},
    "Microsoft.Compute/disks": {"2023-04-02", "2023-10-02"},
    "Microsoft.Network": {"2023-05-01", "2023-09-01", "2024-01-01"},
}
SIZES = [  # name, cores, MiB
    ("Standard_DC2as_v5", 2, 8192), ("Standard_DC4as_v5", 4, 16384), ("Standard_DC8as_v5", 8, 32768),
    ("Standard_D2s_v5", 2, 8192), ("Standard_DC16as_v5", 16, 65536), ("Standard_DC32as_v5", 32, 131072),
]


#: OSProfile.adminUsername's disallowed values (Compute's API reference)
RESERVED_ADMIN_NAMES = frozenset({
    "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123", "a", "actuser",
    "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner", "root", "server", "sql",
    "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5",
})


def group_path(subscription: str = SUBSCRIPTION, group: str = GROUP) -> str:
    return f"/subscriptions/{subscription}/resourceGroups/{group}"


SUBNET_ID = f"{group_path()}/providers/Microsoft.Network/virtualNetworks/caa-vnet/subnets/pods"
NSG_ID = f"{group_path()}/providers/Microsoft.Network/networkSecurityGroups/caa-nsg"
IMAGE_ID = f"{group_path()}/providers/Microsoft.Compute/images/podvm-image"


class ArmError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status, self.code, self.message = status, code, message


class FakeAzure(Resource):
    isLeaf = True

    def __init__(self, token_lifetime: int = 3600, operation_polls: int = 1) -> None:
        super().__init__()
        self.base = ""  # http://127.0.0.1:<port>, set by the test once listening (operation URLs are absolute)
        self.token_lifetime = token_lifetime
        self.operation_polls = operation_polls
        self.tokens: dict[str, float] = {}  # access token -> expiry (time.time())
        self.token_requests: list[dict[str, str]] = []
        self.groups = {GROUP.lower()}
        self.subnets = {SUBNET_ID.lower()}
        self.nsgs = {NSG_ID.lower()}
        self.images = {IMAGE_ID.lower(), "/communitygalleries/caa-gallery/images/podvm/versions/latest"}
        self.resources: dict[str, dict[str, Any]] = {}  # lower-case ARM id -> resource JSON
        self.operations: dict[str, int] = {}  # operation id -> GETs left while InProgress
        self.requests: list[tuple[str, str]] = []  # (method, path) of every ARM request
        self.bodies: dict[str, Any] = {}  # lower-case ARM id -> the last PUT body
        self.attachments: list[tuple[str, int, str]] = []  # (vm name, lun, disk id) of every data disk attached
        self.throttled = 0
        self.hang = ""
        self.hung: Notifier[str] = Notifier()
        self.fail_vm: tuple[str, str] | None = None  # (code, message) the next VM create's operation ends with
        self._failures: dict[str, tuple[str, str]] = {}
        self._ips = itertools.count(4)
        self._public_ips = itertools.count(10)

    # -- test controls ------------------------------------------------------------------------------------
    def throttle(self, count: int) -> None:
        self.throttled = count

    def hang_once(self, text: str) -> None:
        self.hang = text

    def expire_tokens(self) -> None:
        for token in self.tokens:
            self.tokens[token] = 0.0

    def add_disk(self, name: str, group: str = GROUP, location: str = REGION, size_gb: int = 10) -> str:
        """A managed disk as the CSI driver's CreateVolume leaves it (Unattached); its ARM id."""
        self.groups.add(group.lower())
        disk_id = f"{group_path(group=group)}/providers/Microsoft.Compute/disks/{name}"
        self.resources[disk_id.lower()] = {
            "id": disk_id, "name": name, "type": "Microsoft.Compute/disks", "location": location, "managedBy": None,
            "sku": {"name": "Premium_LRS"},
            "properties": {"diskSizeGB": size_gb, "diskState": "Unattached", "provisioningState": "Succeeded"}}
        return disk_id

    def disk(self, disk_id: str) -> dict[str, Any] | None:
        return self.resources.get(disk_id.lower())

    def of_type(self, kind: str) -> dict[str, dict[str, Any]]:
        """Resources whose type is `kind` (e.g. Microsoft.Compute/virtualMachines), by name."""
        return {r["name"]: r for r in self.resources.values() if r["type"] == kind}

    # -- dispatch -------------------------------------------------------------------------------------------
    def render(self, request: Request) -> bytes:
        path = request.path.decode()
        query = {k.decode(): v[-1].decode() for k, v in request.args.items()}
        assert request.content is not None
        raw = request.content.read()
        try:
            if path.endswith("/oauth2/v2.0/token"):
                return self._token(request, path, raw)
            if path == "/metadata/identity/oauth2/token":
                return self._imds_token(request, query)
            if self.hang and self.hang in path:
                self.hang = ""
                self.hung.notify(path)
                return NOT_DONE_YET  # type: ignore[return-value]
            return self._json(request, None, self._arm(request, path, query, raw))  # the code _arm set (200)
        except ArmError as e:
            if e.status == 429:
                request.setHeader(b"retry-after", b"1")
            return self._json(request, e.status, {"error": {"code": e.code, "message": e.message}})

    def _json(self, request: Request, status: int | None, body: Any) -> bytes:
        if status is not None:
            request.setResponseCode(status)
        if body is None:
            return b""
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps(body).encode()

    # -- identity -------------------------------------------------------------------------------------------
    def _issue(self) -> dict[str, Any]:
        token = "eyJ0eXAiOiJKV1QifQ." + secrets.token_urlsafe(24)
        self.tokens[token] = time.time() + self.token_lifetime
        return {"token_type": "Bearer", "expires_in": self.token_lifetime, "ext_expires_in": self.token_lifetime,
                "access_token": token}

    def _oauth_error(self, request: Request, status: int, error: str, description: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return json.dumps({"error": error, "error_description": description,
                           "error_codes": [int(description[6:].split(":", 1)[0])]}
                          ).encode()

    def _token(self, request: Request, path: str, raw: bytes) -> bytes:
        if request.method != b"POST":
            return self._oauth_error(request, 405, "invalid_request", "AADSTS900561: The endpoint only accepts POST")
        if not (request.getHeader("content-type") or "").startswith("application/x-www-form-urlencoded"):
            return self._oauth_error(request, 400, "invalid_request", "AADSTS900144: The request body must contain "
                                     "the following parameter: 'grant_type'.")
        form = {k: v[-1] for k, v in parse_qs(raw.decode()).items()}
        self.token_requests.append(form)
        tenant = path.split("/")[1]
        if tenant != TENANT:
            return self._oauth_error(request, 400, "invalid_request", f"AADSTS90002: Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return self._oauth_error(request, 400, "unsupported_grant_type", "AADSTS70003: unsupported grant type")
        if form.get("client_id") != CLIENT_ID:
            return self._oauth_error(request, 400, "unauthorized_client", "AADSTS700016: Application with "
                                     f"identifier '{form.get('client_id')}' was not found in the directory.")
        if form.get("scope") != "https://management.azure.com/.default":
            return self._oauth_error(request, 400, "invalid_scope", "AADSTS70011: The provided value for the "
                                     "input parameter 'scope' is not valid.")
        if "client_secret" in form:
            if form["client_secret"] != CLIENT_SECRET:
                return self._oauth_error(request, 401, "invalid_client", "AADSTS7000215: Invalid client secret "
                                         "provided. Ensure the secret being sent in the request is the client "
                                         "secret value, not the client secret ID.")
        elif form.get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
            if form.get("client_assertion") != FEDERATED_TOKEN:
                return self._oauth_error(request, 400, "invalid_client", "AADSTS700211: No matching federated "
                                         "identity record found for presented assertion issuer.")
        else:
            return self._oauth_error(request, 401, "invalid_client", "AADSTS7000218: The request body must contain "
                                     "the following parameter: 'client_assertion' or 'client_secret'.")
        return self._json(request, 200, self._issue())

    def _imds_token(self, request: Request, query: dict[str, str]) -> bytes:
        if request.getHeader("metadata") != "true":
            return self._json(request, 400, {"error": "invalid_request",
                                             "error_description": "Required metadata header not specified"})
        if query.get("api-version") != "2018-02-01" or query.get("resource") != "https://management.azure.com/":
            return self._json(request, 400, {"error": "invalid_request",
                                             "error_description": "Invalid api-version or resource"})
        answer = self._issue()
        answer["expires_in"] = str(answer["expires_in"])
        answer["resource"] = query["resource"]
        return self._json(request, 200, answer)

    # -- ARM ------------------------------------------------------------------------------------------------
    def _arm(self, request: Request, path: str, query: dict[str, str], raw: bytes) -> Any:
        method = request.method.decode()
        self.requests.append((method, path))
        authorization = request.getHeader("authorization") or ""
        if not authorization:
            raise ArmError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is "
                                                        "missing.")
        token = authorization.removeprefix("Bearer ")
        if not authorization.startswith("Bearer ") or token not in self.tokens:
            raise ArmError(401, "InvalidAuthenticationToken", "The access token is invalid.")
        if self.tokens[token] < time.time():
            raise ArmError(401, "ExpiredAuthenticationToken", "The access token expiry UTC time is earlier than "
                                                              "current UTC time.")
        if self.throttled > 0:
            self.throttled -= 1
            raise ArmError(429, "TooManyRequests", "The request is being throttled.")
        version = query.get("api-version")
        if not version:
            raise ArmError(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) is "
                                                              "required for all requests.")
        parts = path.split("/")
        if len(parts) < 3 or parts[1] != "subscriptions" or parts[2] != SUBSCRIPTION:
            raise ArmError(404, "SubscriptionNotFound", f"The subscription '{parts[2] if len(parts) > 2 else ''}' "
                                                        "could not be found.")
        if len(parts) >= 8 and parts[3] == "providers" and parts[5] == "locations":
            namespace = parts[4]
            self._check_version(namespace, version)
            if parts[7] == "operations" and len(parts) == 9:
                return self._operation(request, parts[8])
            if parts[7] == "vmSizes" and method == "GET":
                return self._sizes(parts[6])
        if len(parts) < 9 or parts[3] != "resourceGroups" or parts[5] != "providers":
            raise ArmError(404, "InvalidResourceType", f"The resource type could not be found: {path}")
        if parts[4].lower() not in self.groups:
            raise ArmError(404, "ResourceGroupNotFound", f"Resource group '{parts[4]}' could not be found.")
        kind = "/".join([parts[6], parts[7]] + ([parts[9]] if len(parts) > 10 else []))
        self._check_version("Microsoft.Compute/disks" if kind == "Microsoft.Compute/disks" else parts[6], version)
        key = path.lower()
        if method == "GET":
            if key in self.subnets:
                return {"id": path, "name": parts[-1], "properties": {"addressPrefix": "10.1.0.0/24",
                                                                      "provisioningState": "Succeeded"}}
            return self._existing(key, kind, path)
        if method == "PUT":
            try:
                body = json.loads(raw)
            except ValueError:
                raise ArmError(400, "InvalidRequestContent", "The request content was invalid and could not be "
                                                             "deserialized.") from None
            if not isinstance(body, dict):
                raise ArmError(400, "InvalidRequestContent", "The request content must be a JSON object.")
            return self._put(request, kind, path, body)
        if method == "DELETE":
            return self._delete(request, kind, key)
        raise ArmError(405, "MethodNotAllowed", f"{method} is not allowed on {kind}")

    def _check_version(self, namespace: str, version: str) -> None:
        if version not in API_VERSIONS.get(namespace, set()):
            raise ArmError(400, "InvalidApiVersionParameter", f"The api-version '{version}' is invalid for "
                                                              f"{namespace}.")

    def _existing(self, key: str, kind: str, path: str) -> dict[str, Any]:
        resource = self.resources.get(key)
        if resource is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource '{kind}/{path.rsplit('/', 1)[-1]}' under "
                                                    f"resource group '{GROUP}' was not found.")
        return resource

    def _sizes(self, region: str) -> dict[str, Any]:
        """VirtualMachineSizeListResult: the whole list in `value`, no nextLink (x-ms-pageable nextLinkName null)."""
        if region != REGION:
            raise ArmError(400, "NoRegisteredProviderFound", f"No registered resource provider found for location "
                                                             f"'{region}'.")
        return {"value": [{"name": n, "numberOfCores": c, "osDiskSizeInMB": 1047552, "resourceDiskSizeInMB": 0,
                           "memoryInMB": m, "maxDataDiskCount": 4} for n, c, m in SIZES]}

    def _start(self, request: Request, status: int, namespace: str, location: bool) -> str:
        operation = str(uuid.uuid4())
        self.operations[operation] = self.operation_polls
        url = (f"{self.base}/subscriptions/{SUBSCRIPTION}/providers/{namespace}/locations/{REGION}/operations/"
               f"{operation}?api-version={'2024-03-01' if namespace == 'Microsoft.Compute' else '2023-09-01'}")
        request.setHeader(b"azure-asyncoperation", url.encode())
        if location:
            request.setHeader(b"location", (url + "&monitor=true").encode())
        request.setHeader(b"retry-after", b"0")
        request.setResponseCode(status)
        return operation

    def _operation(self, request: Request, operation: str) -> Any:
        left = self.operations.get(operation)
        if left is None:
            raise ArmError(404, "ResourceNotFound", f"operation {operation} not found")
        monitor = b"monitor" in request.args
        if left > 0:
            self.operations[operation] = left - 1
            if monitor:
                request.setHeader(b"retry-after", b"0")
                request.setResponseCode(202)
                return None
            return {"name": operation, "status": "InProgress", "startTime": "2026-01-01T00:00:00Z"}
        failure = self._failures.get(operation)
        if failure is not None:  # ARM keeps the resource, provisioningState Failed
            return {"name": operation, "status": "Failed", "error": {"code": failure[0], "message": failure[1]}}
        if monitor:
            request.setResponseCode(204)
            return None
        return {"name": operation, "status": "Succeeded", "startTime": "2026-01-01T00:00:00Z",
                "endTime": "2026-01-01T00:00:01Z"}

    def _put(self, request: Request, kind: str, path: str, body: dict[str, Any]) -> Any:
        if body.get("location") != REGION:
            raise ArmError(400, "LocationRequired" if "location" not in body else "InvalidLocation",
                           f"The location property is required and must be '{REGION}'.")
        name = path.rsplit("/", 1)[-1]
        properties = body.get("properties")
        if not isinstance(properties, dict):
            properties = {}
        resource: dict[str, Any] = {"id": path, "name": name, "type": kind, "location": REGION,
                                    "tags": body.get("tags", {})}
        if kind == "Microsoft.Network/publicIPAddresses":
            resource["properties"] = {"ipAddress": f"20.0.0.{next(self._public_ips)}",
                                      "publicIPAllocationMethod": "Static", "provisioningState": "Succeeded"}
        elif kind == "Microsoft.Network/networkInterfaces":
            resource["properties"] = self._nic(properties)
        elif kind == "Microsoft.Compute/virtualMachines":
            resource["properties"] = self._vm(path, name, properties)
            resource["zones"] = body.get("zones", [])
        else:
            raise ArmError(400, "InvalidResourceType", f"{kind} cannot be created here")
        self.bodies[path.lower()] = body
        self.resources[path.lower()] = resource
        namespace = kind.split("/", 1)[0]
        operation = self._start(request, 201, namespace, location=False)
        if kind == "Microsoft.Compute/virtualMachines" and self.fail_vm is not None:
            self._failures[operation], self.fail_vm = self.fail_vm, None
            resource["properties"]["provisioningState"] = "Failed"
        return {**resource, "properties": {**resource["properties"], "provisioningState": "Creating"}}

    def _nic(self, properties: dict[str, Any]) -> dict[str, Any]:
        configurations = properties.get("ipConfigurations")
        if not isinstance(configurations, list) or not configurations:
            raise ArmError(400, "InvalidRequestFormat", "NetworkInterface must have at least one IP configuration.")
        out = []
        for configuration in configurations:
            ip = configuration.get("properties", {})
            subnet = str(ip.get("subnet", {}).get("id", ""))
            if subnet.lower() not in self.subnets:
                raise ArmError(400, "InvalidResourceReference", f"Resource {subnet} referenced by resource "
                                                                "was not found.")
            public = ip.get("publicIPAddress")
            if public is not None and str(public.get("id", "")).lower() not in self.resources:
                raise ArmError(400, "InvalidResourceReference", f"Resource {public.get('id')} was not found.")
            out.append({"name": configuration.get("name", ""), "properties": {
                **ip, "privateIPAddress": f"10.1.0.{next(self._ips)}", "provisioningState": "Succeeded"}})
        nsg = properties.get("networkSecurityGroup")
        if nsg is not None and str(nsg.get("id", "")).lower() not in self.nsgs:
            raise ArmError(400, "InvalidResourceReference", f"Resource {nsg.get('id')} was not found.")
        return {**properties, "ipConfigurations": out, "provisioningState": "Succeeded"}

    def _vm(self, path: str, name: str, properties: dict[str, Any]) -> dict[str, Any]:
        admin = str(properties.get("osProfile", {}).get("adminUsername", ""))
        if admin.lower() in RESERVED_ADMIN_NAMES or not 1 <= len(admin) <= 64:
            raise ArmError(400, "InvalidParameter", "The Admin Username specified is not allowed.")
        size = properties.get("hardwareProfile", {}).get("vmSize")
        if size not in {n for n, _c, _m in SIZES}:
            raise ArmError(409, "SkuNotAvailable", f"The requested VM size {size} is not available in location "
                                                   f"'{REGION}'.")
        storage = properties.get("storageProfile", {})
        reference = storage.get("imageReference", {})
        image = str(reference.get("id") or reference.get("communityGalleryImageId") or "")
        if image.lower() not in self.images:
            if image.lower().startswith(("/communitygalleries/", "/sharedgalleries/")):
                raise ArmError(404, "GalleryImageNotFound", f"The gallery image {image} is not available in {REGION} "
                                                            "region. Please contact image owner to replicate to this "
                                                            "region, or change your requested region.")
            raise ArmError(404, "NotFound", f"The Image '{image}' cannot be found in '{REGION}' region.")
        os_disk = storage.get("osDisk", {})
        security = properties.get("securityProfile", {})
        encryption = os_disk.get("managedDisk", {}).get("securityProfile", {}).get("securityEncryptionType")
        if security.get("securityType") == "ConfidentialVM" and not encryption:
            raise ArmError(400, "InvalidParameter", "Required parameter 'securityEncryptionType' is missing (null) "
                                                    "for ConfidentialVM.")
        if security.get("securityType") == "ConfidentialVM" and \
                security.get("uefiSettings", {}).get("vTpmEnabled") is not True:
            raise ArmError(400, "InvalidParameter", "'vTpmEnabled' must be true for securityType ConfidentialVM.")
        if encryption and security.get("securityType") != "ConfidentialVM":
            raise ArmError(400, "InvalidParameter", "'securityEncryptionType' can only be set for securityType "
                                                    "ConfidentialVM.")
        try:
            base64.b64decode(str(properties.get("userData", "")), validate=True)
        except binascii.Error:
            raise ArmError(400, "InvalidParameter", "The value of parameter userData is invalid.") from None
        nics = properties.get("networkProfile", {}).get("networkInterfaces", [])
        if len(nics) != 1:
            raise ArmError(400, "InvalidParameter", "The VM needs one network interface.")
        nic = self.resources.get(str(nics[0].get("id", "")).lower())
        if nic is None:
            raise ArmError(400, "InvalidResourceReference", f"Resource {nics[0].get('id')} was not found.")
        if nic.get("virtualMachine", {}).get("id", path).lower() != path.lower():
            raise ArmError(400, "NicInUse", f"Network interface {nic['id']} is used by another virtual machine.")
        data = self._data_disks(path, size, storage.get("dataDisks") or [])
        nic["virtualMachine"] = {"id": path}
        for entry in data:
            disk = self.resources[entry["managedDisk"]["id"].lower()]
            disk["managedBy"] = path
            disk["properties"]["diskState"] = "Attached"
            self.attachments.append((name, entry["lun"], disk["id"]))
        disk_name = os_disk.get("name") or f"{name}_OsDisk"
        disk_id = f"{group_path()}/providers/Microsoft.Compute/disks/{disk_name}"
        self.resources[disk_id.lower()] = {"id": disk_id, "name": disk_name, "type": "Microsoft.Compute/disks",
                                           "location": REGION, "managedBy": path,
                                           "properties": {"diskState": "Attached"}}
        return {**properties, "vmId": str(uuid.uuid4()), "provisioningState": "Succeeded",
                "storageProfile": {**storage, "dataDisks": data,
                                   "osDisk": {**os_disk, "name": disk_name, "managedDisk": {"id": disk_id}}}}

    def _data_disks(self, vm: str, size: str, entries: Any) -> list[dict[str, Any]]:
        """The VM's data disks as ARM stores them, after ARM's checks of `storageProfile.dataDisks`."""
        if not isinstance(entries, list):
            raise ArmError(400, "InvalidRequestContent", "dataDisks must be an array.")
        if len(entries) > 4:
            raise ArmError(409, "OperationNotAllowed", "The maximum number of data disks allowed to be attached to "
                                                       "a VM of this size is 4.")
        out: list[dict[str, Any]] = []
        luns: set[int] = set()
        for entry in entries:
            lun = entry.get("lun") if isinstance(entry, dict) else None
            if not isinstance(lun, int) or not 0 <= lun <= 63:
                raise ArmError(400, "InvalidParameter", f"The value {lun!r} of parameter 'dataDisk.lun' is invalid.")
            if lun in luns:
                raise ArmError(400, "InvalidParameter", f"A disk at LUN {lun} already exists.")
            luns.add(lun)
            if entry.get("createOption") != "Attach":
                raise ArmError(400, "InvalidParameter", f"createOption {entry.get('createOption')!r} of the data disk "
                                                        f"at LUN {lun}: this fake models only Attach.")
            disk_id = str((entry.get("managedDisk") or {}).get("id", ""))
            disk = self.resources.get(disk_id.lower())
            if disk is None or disk["type"] != "Microsoft.Compute/disks":
                raise ArmError(404, "NotFound", f"Resource {disk_id} not found.")
            if disk["location"] != REGION:
                raise ArmError(400, "InvalidParameter", f"Disk {disk_id} is in location {disk['location']}; the "
                                                        f"VM is in {REGION}.")
            owner = disk.get("managedBy")
            if owner and owner.lower() != vm.lower():
                raise ArmError(409, "ConflictingUserInput", f"Cannot attach the disk {disk['name']} to VM {vm} "
                                                            f"because it is already attached to VM {owner}. A disk "
                                                            "can be attached to only one VM at a time.")
            if any(d["managedDisk"]["id"].lower() == disk_id.lower() for d in out):
                raise ArmError(400, "InvalidParameter", f"Disk {disk_id} is attached twice.")
            out.append({"lun": lun, "name": disk["name"], "createOption": "Attach", "caching": "None",
                        "deleteOption": entry.get("deleteOption", "Detach"),
                        "managedDisk": {"id": disk["id"]}, "diskSizeGB": disk["properties"].get("diskSizeGB")})
        return out

    def _delete(self, request: Request, kind: str, key: str) -> Any:
        resource = self.resources.get(key)
        if resource is None:
            request.setResponseCode(204)
            return None
        if kind == "Microsoft.Network/networkInterfaces" and resource.get("virtualMachine"):
            raise ArmError(400, "NicInUse", f"Network Interface {resource['id']} is used by existing resource "
                                            f"{resource['virtualMachine']['id']}.")
        if kind == "Microsoft.Network/publicIPAddresses":
            for nic in self.of_type("Microsoft.Network/networkInterfaces").values():
                for configuration in nic["properties"]["ipConfigurations"]:
                    if str(configuration["properties"].get("publicIPAddress", {}).get("id", "")).lower() == key:
                        raise ArmError(400, "PublicIPAddressCannotBeDeleted", f"Public IP address {resource['id']} "
                                                                              "is in use.")
        if kind == "Microsoft.Compute/disks" and resource.get("managedBy"):
            raise ArmError(409, "OperationNotAllowed", f"Disk {resource['name']} is attached to VM "
                                                       f"{resource['managedBy']}.")
        del self.resources[key]
        if kind == "Microsoft.Compute/virtualMachines":
            properties = resource["properties"]
            disk = properties["storageProfile"]["osDisk"]
            disk_key = disk["managedDisk"]["id"].lower()
            if disk.get("deleteOption") == "Delete":
                self.resources.pop(disk_key, None)
            elif disk_key in self.resources:
                self.resources[disk_key]["managedBy"] = None
            for data in properties["storageProfile"].get("dataDisks", []):
                data_key = data["managedDisk"]["id"].lower()
                if data.get("deleteOption") == "Delete":
                    self.resources.pop(data_key, None)
                elif data_key in self.resources:
                    self.resources[data_key]["managedBy"] = None
                    self.resources[data_key]["properties"]["diskState"] = "Unattached"
            for reference in properties["networkProfile"]["networkInterfaces"]:
                nic_key = str(reference["id"]).lower()
                if reference.get("properties", {}).get("deleteOption") == "Delete":
                    self.resources.pop(nic_key, None)
                elif nic_key in self.resources:
                    self.resources[nic_key].pop("virtualMachine", None)
        self._start(request, 202, kind.split("/", 1)[0], location=True)
        return None
