"""
`FakeAlibabaCloud` stands for Alibaba Cloud's RPC-style ECS (`2014-05-26`) and VPC (`2016-04-28`) endpoints on one
twisted.web resource (no emulator exists). It follows the documented protocol field for field and rejects what the
real service rejects:

- every request is a form POST (or GET query) carrying the common parameters; the signature v1.0 (HMAC-SHA1 over
  `METHOD&%2F&percent(sorted, RFC 3986-encoded query)`, key `secret&`) is recomputed here independently of the
  client and a mismatch answers 400 `SignatureDoesNotMatch`; an unknown key 404 `InvalidAccessKeyId.NotFound`; a
  timestamp more than 15 minutes off 400 `InvalidTimeStamp.Expired`; a reused nonce 400 `SignatureNonceUsed`; a
  wrong `Version` for the action 400 `InvalidVersion`.
- errors are `{"RequestId", "HostId", "Code", "Message", "Recommend"}`.
- actions: `DescribeVSwitchAttributes` (VPC), `DescribeInstanceTypes`, `RunInstances`, `DescribeInstances`
  (`InstanceIds` as a JSON list, or `InstanceName`), `DeleteInstance` (`IncorrectInstanceStatus` while the
  instance is `Pending` and `busy_deletes` is set; `InvalidInstanceId.NotFound` for unknown ids). Instances go
  `Pending` -> `Starting` -> `Running` over `boot_polls` describes, with a private IP (and a public one when
  `InternetMaxBandwidthOut` > 0).
- ENIs (ECS): `CreateNetworkInterface` (`VSwitchId` and `SecurityGroupId` must exist, `NetworkInterfaceName` 2-128
  characters starting with a letter; answers an empty `NetworkInterfaceId` `empty_enis` times, as the documented
  "call again" case), `AttachNetworkInterface` (403 `InvalidOperation.InvalidEcsState` unless the instance is
  Running or Stopped, 403 `InvalidOperation.InvalidEniState` unless the ENI is Available), `Attaching` -> `InUse`
  on the next describe; `DetachNetworkInterface` (`InUse` only) `Detaching` -> `Available`;
  `DeleteNetworkInterface` (Available only); `DescribeNetworkInterfaceAttribute`, `DescribeNetworkInterfaces`
  (`NetworkInterfaceName`, `InstanceId`, `NetworkInterfaceId.N` filters, `NetworkInterfaceSets`),
  `ModifyNetworkInterfaceAttribute` (`DeleteOnRelease`). Unknown ENIs are 404 `InvalidEniId.NotFound`. Deleting an
  instance detaches its ENIs, deleting those with DeleteOnRelease.
- EIPs (VPC): `AllocateEipAddress` (`AllocationId`, `EipAddress`, Available), `AssociateEipAddress`
  (`InstanceType` `EcsInstance` or `NetworkInterface`; the EIP must be Available, else 400 `IncorrectEipStatus`)
  `Associating` -> `InUse`, `UnassociateEipAddress` (InUse only) `Unassociating` -> `Available`,
  `ReleaseEipAddress` (Available only), `DescribeEipAddresses` (`AllocationId`, `AssociatedInstanceType`,
  `AssociatedInstanceId`, `Status` filters, `EipAddresses.EipAddress`). Unknown EIPs are 404
  `InvalidAllocationId.NotFound`.

- STS `AssumeRoleWithOIDC` (`2015-04-01`, anonymous: no key, no signature) trades `OIDCToken` for the role
  `RoleArn` (with `OIDCProviderArn`) into temporary keys; calls signed with them must carry their `SecurityToken`
  (else 400 `InvalidSecurityToken.MismatchWithAccessKey`).

`throttle` answers that many next calls with 400 `Throttling.User`, as the real flow control does; `fail` maps an
action to the (status, code, message) it answers once (e.g. a RAM policy refusing it).
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import itertools
import json
import time
import uuid
from typing import Any
from urllib.parse import parse_qs

from twisted.web.resource import Resource
from twisted.web.server import Request

KEY_ID = "LTAI5tFakeKeyId0001"
KEY_SECRET = "fakeAlibabaSecret0123456789abcd"
REGION = "cn-beijing"
IMAGE = "m-2ze0fakeimage"
VSWITCH = "vsw-2zefake01"
VPC = "vpc-2zefake01"
SECURITY_GROUP = "sg-2zefake01"
ECS_ACTIONS = {"DescribeInstanceTypes", "RunInstances", "DescribeInstances", "DeleteInstance",
               "CreateNetworkInterface", "AttachNetworkInterface", "DescribeNetworkInterfaceAttribute",
               "DescribeNetworkInterfaces", "ModifyNetworkInterfaceAttribute", "DetachNetworkInterface",
               "DeleteNetworkInterface"}
VPC_ACTIONS = {"DescribeVSwitchAttributes", "AllocateEipAddress", "AssociateEipAddress", "UnassociateEipAddress",
               "DescribeEipAddresses", "ReleaseEipAddress"}
ROLE_ARN = "acs:ram::1234567890:role/caa-peerpods"
OIDC_PROVIDER_ARN = "acs:ram::1234567890:oidc-provider/ack-rrsa-c123"
OIDC_TOKEN = "eyJhbGciOiJSUzI1NiJ9.fake-projected-token.sig"
TYPES = {"ecs.g8i.xlarge": (4, 16.0, 0), "ecs.g8i.2xlarge": (8, 32.0, 0), "ecs.gn7i-c8g1.2xlarge": (8, 30.0, 1),
         "ecs.g7.large": (2, 8.0, 0)}


def _encode(text: str) -> str:
    # RFC 3986 unreserved characters only; '~' stays, '*' and ' ' are escaped (%2A, %20).
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_.~") else
                   "".join(f"%{b:02X}" for b in c.encode()) for c in text)


class FakeAlibabaCloud(Resource):
    isLeaf = True

    def __init__(self, boot_polls: int = 2, busy_deletes: int = 0) -> None:
        super().__init__()
        self.boot_polls = boot_polls
        self.busy_deletes = busy_deletes
        self.throttle = 0
        self.nonces: set[str] = set()
        self.actions: list[str] = []
        self.rejections: list[str] = []
        self.keys: dict[str, tuple[str, str]] = {KEY_ID: (KEY_SECRET, "")}  # id -> (secret, security token)
        self.assumed = 0
        self.instances: dict[str, dict[str, Any]] = {}
        self.run_params: dict[str, dict[str, str]] = {}
        self.polls: dict[str, int] = {}
        self._ips = itertools.count(10)
        self.enis: dict[str, dict[str, Any]] = {}
        self.eips: dict[str, dict[str, Any]] = {}
        self.empty_enis = 0
        self.fail: dict[str, tuple[int, str, str]] = {}

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read().decode()
        raw = body if request.method == b"POST" else request.uri.decode().partition("?")[2]
        params = {k: v[-1] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        request.setHeader(b"content-type", b"application/json")
        if params.get("Action") == "AssumeRoleWithOIDC":
            status, doc = self._assume(params)
            if status >= 400:
                self.rejections.append(doc["Code"])
                return self._error(request, status, doc["Code"], doc["Message"])
            return json.dumps({"RequestId": str(uuid.uuid4()).upper(), **doc}).encode()
        problem = self._authenticate(request.method.decode(), params)
        if problem is not None:
            self.rejections.append(problem[1])
            return self._error(request, *problem)
        action = params["Action"]
        self.actions.append(action)
        if self.throttle > 0:
            self.throttle -= 1
            return self._error(request, 400, "Throttling.User", "Request was denied due to user flow control.")
        if action in self.fail:
            return self._error(request, *self.fail.pop(action))
        handler = getattr(self, f"_{action}", None)
        if handler is None:
            return self._error(request, 400, "InvalidAction.NotFound", f"Specified api {action} is not found.")
        status, doc = handler(params)
        if status >= 400:
            return self._error(request, status, doc["Code"], doc["Message"])
        request.setResponseCode(status)
        return json.dumps({"RequestId": str(uuid.uuid4()).upper(), **doc}).encode()

    def _error(self, request: Request, status: int, code: str, message: str) -> bytes:
        request.setResponseCode(status)
        return json.dumps({"RequestId": str(uuid.uuid4()).upper(), "HostId": "ecs.aliyuncs.com", "Code": code,
                           "Message": message, "Recommend": "https://api.aliyun.com/troubleshoot"}).encode()

    def _authenticate(self, method: str, params: dict[str, str]) -> tuple[int, str, str] | None:
        for name in ("Action", "Format", "Version", "AccessKeyId", "SignatureMethod", "SignatureVersion",
                     "SignatureNonce", "Timestamp", "Signature"):
            if not params.get(name):
                return 400, "MissingParameter", f"The input parameter \"{name}\" that is mandatory is not supplied."
        if params["SignatureMethod"] != "HMAC-SHA1" or params["SignatureVersion"] != "1.0":
            return 400, "InvalidParameter", "SignatureMethod / SignatureVersion"
        if params["AccessKeyId"] not in self.keys:
            return 404, "InvalidAccessKeyId.NotFound", "Specified access key is not found."
        secret, security_token = self.keys[params["AccessKeyId"]]
        if params.get("SecurityToken", "") != security_token:
            return 400, "InvalidSecurityToken.MismatchWithAccessKey", "The security token does not match the key."
        unsigned = {k: v for k, v in params.items() if k != "Signature"}
        query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(unsigned.items()))
        to_sign = f"{method}&{_encode('/')}&{_encode(query)}"
        expected = base64.b64encode(hmac.new(f"{secret}&".encode(), to_sign.encode(), hashlib.sha1).digest())
        if not hmac.compare_digest(expected.decode(), params["Signature"]):
            return 400, "SignatureDoesNotMatch", f"Specified signature is not matched with our calculation. " \
                                                 f"server string to sign is:{to_sign}"
        try:
            stamp = calendar.timegm(time.strptime(params["Timestamp"], "%Y-%m-%dT%H:%M:%SZ"))
        except ValueError:
            return 400, "InvalidTimeStamp.Format", "Specified time stamp or date value is not well formatted."
        if abs(stamp - time.time()) > 15 * 60:
            return 400, "InvalidTimeStamp.Expired", "Specified time stamp or date value is expired."
        if params["SignatureNonce"] in self.nonces:
            return 400, "SignatureNonceUsed", "Specified signature nonce was used already."
        self.nonces.add(params["SignatureNonce"])
        wanted = "2016-04-28" if params["Action"] in VPC_ACTIONS else "2014-05-26"
        if params["Version"] != wanted:
            return 400, "InvalidVersion", f"Specified parameter Version is not valid for {params['Action']}."
        if params["Format"] != "JSON":
            return 400, "InvalidParameter", "Format: this fake answers JSON only"
        return None

    def _assume(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        for name in ("Format", "Version", "Timestamp", "SignatureNonce", "RoleArn", "OIDCProviderArn", "OIDCToken",
                     "RoleSessionName"):
            if not p.get(name):
                return 400, {"Code": "MissingParameter", "Message": f"{name} is mandatory for this action."}
        if p["Version"] != "2015-04-01":
            return 400, {"Code": "InvalidVersion", "Message": "Specified parameter Version is not valid."}
        if p["OIDCToken"] != OIDC_TOKEN:
            return 400, {"Code": "AuthenticationFail.OIDCToken.Invalid", "Message": "The OIDC token is invalid."}
        if p["RoleArn"] != ROLE_ARN or p["OIDCProviderArn"] != OIDC_PROVIDER_ARN:
            return 404, {"Code": "EntityNotExist.Role", "Message": "The role or OIDC provider does not exist."}
        key_id, secret, token = "STS." + uuid.uuid4().hex[:20], uuid.uuid4().hex, "CAIS" + uuid.uuid4().hex * 2
        self.keys[key_id] = (secret, token)
        self.assumed += 1
        expiration = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + int(p.get("DurationSeconds",
                                                                                               "3600"))))
        return 200, {"Credentials": {"AccessKeyId": key_id, "AccessKeySecret": secret, "SecurityToken": token,
                                     "Expiration": expiration},
                     "AssumedRoleUser": {"Arn": f"{ROLE_ARN}/{p['RoleSessionName']}", "AssumedRoleId": "3001:x"},
                     "OIDCTokenInfo": {"Subject": "system:serviceaccount:confidential-containers-system:caa"}}

    # -- actions ------------------------------------------------------------------------------------------
    def _DescribeVSwitchAttributes(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if p.get("VSwitchId") != VSWITCH:
            return 404, {"Code": "InvalidVSwitchId.NotFound", "Message": "Specified vswitch does not exist."}
        return 200, {"VSwitchId": VSWITCH, "VpcId": VPC, "Status": "Available", "CidrBlock": "172.16.0.0/24",
                     "ZoneId": "cn-beijing-h"}

    def _DescribeInstanceTypes(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        asked = [v for k, v in p.items() if k.startswith("InstanceTypes.")]
        rows = [{"InstanceTypeId": name, "CpuCoreCount": cpus, "MemorySize": mem, "GPUAmount": gpus}
                for name, (cpus, mem, gpus) in TYPES.items() if not asked or name in asked]
        return 200, {"InstanceTypes": {"InstanceType": rows}}

    def _RunInstances(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if p.get("RegionId") != REGION:
            return 400, {"Code": "InvalidRegionId.NotFound", "Message": "The specified RegionId does not exist."}
        if p.get("ImageId") != IMAGE:
            return 404, {"Code": "InvalidImageId.NotFound", "Message": "The specified ImageId does not exist."}
        if p.get("InstanceType") not in TYPES:
            return 400, {"Code": "InvalidInstanceType.NotFound", "Message": "The specified InstanceType is invalid"}
        if p.get("VSwitchId") != VSWITCH:
            return 404, {"Code": "InvalidVSwitchId.NotFound", "Message": "Specified vswitch does not exist."}
        groups = [v for k, v in p.items() if k.startswith("SecurityGroupIds.")]
        if groups != [SECURITY_GROUP]:
            return 404, {"Code": "InvalidSecurityGroupId.NotFound", "Message": f"security groups {groups}"}
        name = p.get("InstanceName", "")
        if not 2 <= len(name) <= 128:
            return 400, {"Code": "InvalidInstanceName.Malformed", "Message": "InstanceName"}
        try:
            user_data = base64.b64decode(p.get("UserData", ""), validate=True)
        except ValueError:
            return 400, {"Code": "InvalidUserData.Base64FormatInvalid", "Message": "UserData is not base64"}
        if len(user_data) > 32 * 1024:
            return 400, {"Code": "InvalidUserData.SizeExceeded", "Message": "UserData is larger than 32 KB"}
        if p.get("Amount", "1") != "1" or int(p.get("SystemDisk.Size", "40")) < 20:
            return 400, {"Code": "InvalidParameter", "Message": "Amount / SystemDisk.Size"}
        mode = p.get("SecurityOptions.ConfidentialComputingMode")
        if mode and (mode not in ("TDX", "Enclave") or not p["InstanceType"].startswith("ecs.g8i")):
            return 400, {"Code": "InvalidParameter.ConfidentialComputingMode",
                         "Message": f"{mode} is not supported by {p['InstanceType']}"}
        instance_id = "i-2ze" + uuid.uuid4().hex[:17]
        self.instances[instance_id] = {
            "InstanceId": instance_id, "InstanceName": name, "Status": "Pending", "RegionId": REGION,
            "InstanceType": p["InstanceType"], "ImageId": p["ImageId"],
            "VpcAttributes": {"VpcId": VPC, "VSwitchId": VSWITCH, "PrivateIpAddress": {"IpAddress": []}},
            "PublicIpAddress": {"IpAddress": []}, "EipAddress": {"IpAddress": "", "AllocationId": ""},
        }
        self.run_params[instance_id] = dict(p)
        self.polls[instance_id] = 0
        return 200, {"InstanceIdSets": {"InstanceIdSet": [instance_id]}, "OrderId": "2100", "TradePrice": 0.5}

    def _DescribeInstances(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        wanted = json.loads(p["InstanceIds"]) if p.get("InstanceIds") else None
        rows = []
        for item in self.instances.values():
            if wanted is not None and item["InstanceId"] not in wanted:
                continue
            if p.get("InstanceName") and item["InstanceName"] != p["InstanceName"]:
                continue
            self._advance(item)
            rows.append(item)
        return 200, {"Instances": {"Instance": rows}, "TotalCount": len(rows), "PageNumber": 1, "PageSize": 10}

    def _advance(self, item: dict[str, Any]) -> None:
        instance_id = item["InstanceId"]
        self.polls[instance_id] += 1
        if item["Status"] == "Pending":
            item["Status"] = "Starting"
        elif item["Status"] == "Starting" and self.polls[instance_id] >= self.boot_polls:
            n = next(self._ips)
            item["Status"] = "Running"
            item["VpcAttributes"]["PrivateIpAddress"]["IpAddress"] = [f"172.16.{n // 250}.{n % 250 + 2}"]
            if int(self.run_params[instance_id].get("InternetMaxBandwidthOut", "0")) > 0:
                item["PublicIpAddress"]["IpAddress"] = [f"47.95.{n // 250}.{n % 250 + 2}"]

    def _DeleteInstance(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        item = self.instances.get(p.get("InstanceId", ""))
        if item is None:
            return 404, {"Code": "InvalidInstanceId.NotFound", "Message": "The specified InstanceId does not exist"}
        if item["Status"] != "Running" and p.get("Force") != "true":
            return 403, {"Code": "IncorrectInstanceStatus", "Message": "The current status of the resource does "
                                                                       "not support this operation."}
        if self.busy_deletes > 0:
            self.busy_deletes -= 1
            return 403, {"Code": "IncorrectInstanceStatus", "Message": "The current status of the resource does "
                                                                       "not support this operation."}
        del self.instances[item["InstanceId"]]
        for eni in list(self.enis.values()):
            if eni["InstanceId"] == item["InstanceId"]:
                eni["InstanceId"], eni["Status"] = "", "Available"
                if eni["DeleteOnRelease"]:
                    self._drop_eni(eni["NetworkInterfaceId"])
        return 200, {}

    # -- ENIs ---------------------------------------------------------------------------------------------
    def _eni(self, p: dict[str, str]) -> tuple[dict[str, Any] | None, tuple[int, dict[str, Any]]]:
        eni = self.enis.get(p.get("NetworkInterfaceId", ""))
        return eni, (404, {"Code": "InvalidEniId.NotFound", "Message": "The specified NetworkInterfaceId does "
                                                                      "not exist."})

    def _CreateNetworkInterface(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if not p.get("VSwitchId"):
            return 400, {"Code": "MissingParameter", "Message": "The input parameter \"VSwitchId\" that is "
                                                                "mandatory is not supplied."}
        if p["VSwitchId"] != VSWITCH:
            return 404, {"Code": "InvalidVSwitchId.NotFound", "Message": "Specified vswitch does not exist."}
        if p.get("SecurityGroupId") != SECURITY_GROUP:
            return 404, {"Code": "InvalidSecurityGroupId.NotFound", "Message": "The SecurityGroupId is not found"}
        name = p.get("NetworkInterfaceName", "")
        if name and not (2 <= len(name) <= 128 and name[0].isalpha()):
            return 400, {"Code": "InvalidNetworkInterfaceName.Malformed", "Message": "NetworkInterfaceName"}
        if self.empty_enis > 0:
            self.empty_enis -= 1
            return 200, {"NetworkInterfaceId": ""}
        eni_id = "eni-2ze" + uuid.uuid4().hex[:17]
        n = next(self._ips)
        self.enis[eni_id] = {
            "NetworkInterfaceId": eni_id, "NetworkInterfaceName": name, "Status": "Available", "Type": "Secondary",
            "VSwitchId": VSWITCH, "VpcId": VPC, "InstanceId": "", "DeleteOnRelease": False,
            "SecurityGroupIds": {"SecurityGroupId": [SECURITY_GROUP]},
            "PrivateIpAddress": f"172.16.{n // 250}.{n % 250 + 2}", "MacAddress": f"00:16:3e:00:{n // 250:02x}:"
                                                                              f"{n % 250:02x}",
            "AssociatedPublicIp": {"PublicIpAddress": "", "AllocationId": ""},
        }
        return 200, {"NetworkInterfaceId": eni_id, "Status": "Available", "Type": "Secondary",
                     "VSwitchId": VSWITCH, "VpcId": VPC, "PrivateIpAddress": self.enis[eni_id]["PrivateIpAddress"]}

    def _AttachNetworkInterface(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        eni, missing = self._eni(p)
        if eni is None:
            return missing
        item = self.instances.get(p.get("InstanceId", ""))
        if item is None:
            return 404, {"Code": "InvalidInstanceId.NotFound", "Message": "The specified InstanceId does not exist"}
        if item["Status"] not in ("Running", "Stopped"):
            return 403, {"Code": "InvalidOperation.InvalidEcsState", "Message": "The instance status does not "
                                                                                "support this operation."}
        if eni["Status"] != "Available":
            return 403, {"Code": "InvalidOperation.InvalidEniState", "Message": "The ENI status does not "
                                                                                "support this operation."}
        eni["Status"], eni["InstanceId"] = "Attaching", item["InstanceId"]
        return 200, {}

    def _DetachNetworkInterface(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        eni, missing = self._eni(p)
        if eni is None:
            return missing
        if p.get("InstanceId", "") not in self.instances:
            return 404, {"Code": "InvalidInstanceId.NotFound", "Message": "The specified InstanceId does not exist"}
        if eni["Status"] != "InUse" or eni["InstanceId"] != p["InstanceId"]:
            return 403, {"Code": "InvalidOperation.InvalidEniState", "Message": "The ENI status does not "
                                                                                "support this operation."}
        eni["Status"] = "Detaching"
        return 200, {}

    def _DeleteNetworkInterface(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        eni, missing = self._eni(p)
        if eni is None:
            return missing
        if eni["Status"] != "Available":
            return 403, {"Code": "InvalidOperation.InvalidEniState", "Message": "The ENI status does not "
                                                                                "support this operation."}
        self._drop_eni(eni["NetworkInterfaceId"])
        return 200, {}

    def _drop_eni(self, eni_id: str) -> None:
        del self.enis[eni_id]
        for eip in self.eips.values():  # an EIP on a deleted ENI is unbound, not released
            if eip["InstanceId"] == eni_id:
                eip["InstanceId"], eip["InstanceType"], eip["Status"] = "", "", "Available"

    def _ModifyNetworkInterfaceAttribute(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        eni, missing = self._eni(p)
        if eni is None:
            return missing
        if "DeleteOnRelease" in p:
            if p["DeleteOnRelease"] not in ("true", "false"):
                return 400, {"Code": "InvalidParameter", "Message": "DeleteOnRelease"}
            eni["DeleteOnRelease"] = p["DeleteOnRelease"] == "true"
        return 200, {}

    def _settle_eni(self, eni: dict[str, Any]) -> dict[str, Any]:
        if eni["Status"] == "Attaching":
            eni["Status"] = "InUse"
        elif eni["Status"] == "Detaching":
            eni["Status"], eni["InstanceId"] = "Available", ""
        public = next((e for e in self.eips.values() if e["InstanceId"] == eni["NetworkInterfaceId"]
                       and e["Status"] == "InUse"), None)
        eni["AssociatedPublicIp"] = {"PublicIpAddress": public["IpAddress"] if public else "",
                                     "AllocationId": public["AllocationId"] if public else ""}
        return eni

    def _DescribeNetworkInterfaceAttribute(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        eni, missing = self._eni(p)
        if eni is None:
            return missing
        return 200, dict(self._settle_eni(eni))

    def _DescribeNetworkInterfaces(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        ids = [v for k, v in p.items() if k.startswith("NetworkInterfaceId.")]
        rows = [dict(self._settle_eni(e)) for e in self.enis.values()
                if (not ids or e["NetworkInterfaceId"] in ids)
                and (not p.get("NetworkInterfaceName") or e["NetworkInterfaceName"] == p["NetworkInterfaceName"])
                and (not p.get("InstanceId") or e["InstanceId"] == p["InstanceId"])]
        return 200, {"NetworkInterfaceSets": {"NetworkInterfaceSet": rows}, "TotalCount": len(rows),
                     "PageNumber": 1, "PageSize": int(p.get("PageSize", "10"))}

    # -- EIPs ---------------------------------------------------------------------------------------------
    def _eip(self, p: dict[str, str]) -> tuple[dict[str, Any] | None, tuple[int, dict[str, Any]]]:
        eip = self.eips.get(p.get("AllocationId", ""))
        return eip, (404, {"Code": "InvalidAllocationId.NotFound", "Message": "The specified AllocationId is not "
                                                                              "found"})

    def _AllocateEipAddress(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if p.get("RegionId") != REGION:
            return 400, {"Code": "InvalidRegionId.NotFound", "Message": "The specified RegionId does not exist."}
        if p.get("InternetChargeType", "PayByBandwidth") not in ("PayByBandwidth", "PayByTraffic"):
            return 400, {"Code": "InvalidInternetChargeType.ValueNotSupported", "Message": "InternetChargeType"}
        eip_id = "eip-2ze" + uuid.uuid4().hex[:17]
        n = next(self._ips)
        self.eips[eip_id] = {"AllocationId": eip_id, "IpAddress": f"39.105.{n // 250}.{n % 250 + 2}",
                             "Status": "Available", "InstanceId": "", "InstanceType": "", "RegionId": REGION,
                             "Description": p.get("Description", ""), "Name": p.get("Name", ""),
                             "InternetChargeType": p.get("InternetChargeType", "PayByBandwidth")}
        return 200, {"AllocationId": eip_id, "EipAddress": self.eips[eip_id]["IpAddress"]}

    def _AssociateEipAddress(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        eip, missing = self._eip(p)
        if eip is None:
            return missing
        kind = p.get("InstanceType", "EcsInstance")
        target = p.get("InstanceId", "")
        if kind == "NetworkInterface":
            if target not in self.enis:
                return 404, {"Code": "InvalidEniId.NotFound", "Message": "The specified NetworkInterfaceId does "
                                                                         "not exist."}
        elif kind == "EcsInstance":
            if target not in self.instances:
                return 404, {"Code": "InvalidInstanceId.NotFound", "Message": "The specified InstanceId does not "
                                                                              "exist"}
        else:
            return 400, {"Code": "InvalidParameter", "Message": f"InstanceType {kind}"}
        if eip["Status"] != "Available":
            return 400, {"Code": "IncorrectEipStatus", "Message": "The current status of the EIP does not support "
                                                                  "this operation."}
        eip["Status"], eip["InstanceId"], eip["InstanceType"] = "Associating", target, kind
        return 200, {}

    def _UnassociateEipAddress(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        eip, missing = self._eip(p)
        if eip is None:
            return missing
        if eip["Status"] != "InUse":
            return 400, {"Code": "IncorrectEipStatus", "Message": "The current status of the EIP does not support "
                                                                  "this operation."}
        if p.get("InstanceId") and p["InstanceId"] != eip["InstanceId"]:
            return 400, {"Code": "IncorrectInstanceStatus", "Message": "The EIP is not bound to this instance."}
        eip["Status"] = "Unassociating"
        return 200, {}

    def _ReleaseEipAddress(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        eip, missing = self._eip(p)
        if eip is None:
            return missing
        if eip["Status"] != "Available":
            return 400, {"Code": "IncorrectEipStatus", "Message": "The current status of the EIP does not support "
                                                                  "this operation."}
        del self.eips[eip["AllocationId"]]
        return 200, {}

    def _DescribeEipAddresses(self, p: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if p.get("RegionId") != REGION:
            return 400, {"Code": "InvalidRegionId.NotFound", "Message": "The specified RegionId does not exist."}
        ids = [i for i in p.get("AllocationId", "").split(",") if i]
        rows = []
        for eip in self.eips.values():
            if eip["Status"] == "Associating":
                eip["Status"] = "InUse"
            elif eip["Status"] == "Unassociating":
                eip["Status"], eip["InstanceId"], eip["InstanceType"] = "Available", "", ""
            if ((not ids or eip["AllocationId"] in ids)
                    and (not p.get("AssociatedInstanceType") or eip["InstanceType"] == p["AssociatedInstanceType"])
                    and (not p.get("AssociatedInstanceId") or eip["InstanceId"] == p["AssociatedInstanceId"])
                    and (not p.get("Status") or eip["Status"] == p["Status"])):
                rows.append(dict(eip))
        return 200, {"EipAddresses": {"EipAddress": rows}, "TotalCount": len(rows), "PageNumber": 1,
                     "PageSize": int(p.get("PageSize", "10"))}


__all__ = ["FakeAlibabaCloud", "IMAGE", "KEY_ID", "KEY_SECRET", "OIDC_PROVIDER_ARN", "OIDC_TOKEN", "REGION", "ROLE_ARN",
           "SECURITY_GROUP", "VSWITCH"]
