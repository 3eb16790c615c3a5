"""The IBM Cloud Power Virtual Server provider: one PVM instance per pod VM (spec-providers §7), on the PowerVS
REST API (`/pcloud/v1/cloud-instances/<workspace>/pvm-instances`) with IAM bearer tokens and the workspace CRN."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from caa.providers.base import CoroutineProvider
from caa.providers.ibmcloud.iam import IamTokenSource, iam_error
from caa.providers.ibmcloud_powervs.config import PowerVSConfig
from caa.providers.interfaces import (
    ErrorKind,
    Instance,
    InstanceSpec,
    InvalidConfig,
    IProvider,
    ProviderError,
    QuotaExceeded,
    TransientError,
)
from caa.providers.redact import Redactor
from caa.providers.rest import RestClient, RestRequest, RestResponse, RetryPolicy, default_http_client, poll
from caa.reactors import INodeReactor

NAME_LIMIT = 47  # PowerVS server names


def pi_error(response: RestResponse) -> ProviderError | None:
    """PowerVS errors are `{"code", "description", "error", "message"}`; 429/5xx TRANSIENT, 404 NOT_FOUND, quota
    texts QUOTA, other 4xx INVALID_CONFIG."""
    status = response.status
    if 200 <= status < 300:
        return None
    try:
        body = json.loads(response.body or b"{}")
        text = ": ".join(str(body[k]) for k in ("error", "description", "message") if body.get(k))
    except (ValueError, AttributeError, TypeError):
        text = response.body[:200].decode("utf-8", "replace")
    message = f"HTTP {status}: {text}" if text else f"HTTP {status}"
    if status == 429 or status >= 500:
        return TransientError(message)
    if status == 404:
        return ProviderError(ErrorKind.NOT_FOUND, message)
    if "quota" in text.lower() or "insufficient" in text.lower():
        return QuotaExceeded(message)
    return InvalidConfig(message)


def create_body(config: PowerVSConfig, name: str, user_data: bytes, spec: InstanceSpec) -> dict[str, Any]:
    """The PVMInstanceCreate of one pod VM; pure, so tested without a cloud."""
    sizing = config.sizing(spec)
    body: dict[str, Any] = {
        "serverName": name, "imageID": config.image_id, "networks": [{"networkID": config.network_id}],
        "memory": sizing.memory_gb, "processors": sizing.processors, "procType": config.proc_type,
        "sysType": sizing.sys_type, "userData": base64.b64encode(user_data).decode(),
    }
    if config.ssh_key:
        body["keyPairName"] = config.ssh_key
    return body


def fixed_ips(body: dict[str, Any], public: bool) -> tuple[str, ...]:
    key = "externalIP" if public else "ipAddress"
    return tuple(str(n[key]) for n in body.get("networks") or [] if n.get("type") == "fixed" and n.get(key))


@implementer(IProvider)
class PowerVSProvider(CoroutineProvider):
    _log = Logger()
    name_limit = NAME_LIMIT

    def __init__(self, reactor: INodeReactor, config: PowerVSConfig, http: HTTPClient | None = None,
                 policy: RetryPolicy = RetryPolicy(), token_clock: IReactorTime | None = None) -> None:
        self._reactor = reactor
        self.config = config
        if http is None:
            http, self.owned_pool = default_http_client(reactor)
        self.rest = RestClient(reactor, http, policy, Redactor(config.secrets()))
        self.iam = IamTokenSource(token_clock or reactor, self.rest, config.iam_url, config.api_key)
        self._crn = ""

    # -- the API --------------------------------------------------------------------------------------------
    async def _verify(self) -> None:
        await self._session()

    async def _session(self) -> None:
        """Once: the account of the API key (IAM Identity) -> the workspace CRN every PowerVS call carries."""
        if self._crn:
            return
        self.config.check()
        request = RestRequest("GET", f"{self.config.iam_identity_url}/v1/apikeys/details",
                              {"IAM-Apikey": self.config.api_key, "Accept": "application/json"})
        response = await self.rest.call(request, iam_error, self.iam.sign, what="IAM API key details")
        account = str((response.json() or {}).get("account_id") or "")
        if not account:
            raise InvalidConfig("ibmcloud-powervs: IAM names no account for the API key")
        self._crn = (f"crn:v1:bluemix:public:power-iaas:{self.config.zone}:a/{account}:"
                     f"{self.config.service_instance_id}::")

    async def pi(self, method: str, path: str, body: Any = None) -> Any:
        await self._session()
        base = f"{self.config.api}/pcloud/v1/cloud-instances/{quote(self.config.service_instance_id, safe='')}"
        request = RestRequest(method, base + path, {"Accept": "application/json", "Content-Type": "application/json",
                                                    "CRN": self._crn},
                              json.dumps(body).encode() if body is not None else b"")
        response = await self.rest.call(request, pi_error, self.iam.sign, what=f"{method} {path.split('/')[1]}")
        return response.json() if response.body else None

    # -- create / delete ------------------------------------------------------------------------------------
    async def _create(self, name: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        if spec.volumes or spec.multi_nic:
            raise InvalidConfig("ibmcloud-powervs: CSI volumes and a second NIC (--ext-network-via-podvm) are not "
                                "supported")
        body = create_body(self.config, name, user_data, spec)  # InvalidConfig for a malformed machine type
        if spec.image:
            body["imageID"] = spec.image
            self._log.info("Choosing {image} from annotation as the PowerVS image for the PodVM", image=spec.image)
        created = await self.pi("POST", "/pvm-instances", body)
        first = created[0] if isinstance(created, list) and created else created
        instance_id = str((first or {}).get("pvmInstanceID") or "")
        if not instance_id:
            raise TransientError("ibmcloud-powervs: the create answer names no pvmInstanceID")
        self._log.info("ibmcloud-powervs: created {id} ({name}, {cpu} x {mem} GB {sys})", id=instance_id, name=name,
                       cpu=body["processors"], mem=body["memory"], sys=body["sysType"])
        try:
            active = await self._wait_active(instance_id)
            ips = fixed_ips(active, self.config.use_public_ip) or await self._dhcp_ip(active)
            return Instance(instance_id, name, ips)
        except BaseException as e:  # a failure or a cancel: roll back (the contract), then re-raise
            await self._roll_back(instance_id, e)
            raise

    async def _wait_active(self, instance_id: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            body: dict[str, Any] = await self.pi("GET", f"/pvm-instances/{instance_id}")
            status = str(body.get("status") or "").upper()
            if status == "ACTIVE":
                return body
            if status == "ERROR":
                fault = body.get("fault") or {}
                raise TransientError(f"ibmcloud-powervs: instance {instance_id} is in ERROR: "
                                     f"{fault.get('message') or 'no fault details'}")
            return None

        return await poll(self._reactor, probe, self.config.poll_interval, self.config.build_timeout,
                          f"ibmcloud-powervs: instance {instance_id} not ACTIVE")

    async def _dhcp_ip(self, active: dict[str, Any]) -> tuple[str, ...]:
        """No fixed IP: the lease of the VM's MAC on the DHCP server of our network."""
        macs = {str(n.get("macAddress") or "").lower() for n in active.get("networks") or []
                if n.get("networkID") == self.config.network_id}

        async def probe() -> tuple[str, ...] | None:
            for server in await self.pi("GET", "/services/dhcp") or []:
                if (server.get("network") or {}).get("id") != self.config.network_id:
                    continue
                detail = await self.pi("GET", f"/services/dhcp/{server['id']}")
                for lease in detail.get("leases") or []:
                    if str(lease.get("instanceMacAddress") or "").lower() in macs and lease.get("instanceIP"):
                        return (str(lease["instanceIP"]),)
            return None

        return await poll(self._reactor, probe, self.config.poll_interval, self.config.dhcp_timeout,
                          "ibmcloud-powervs: no DHCP lease for the instance")

    async def _delete(self, instance_id: str) -> None:
        try:
            await self.pi("DELETE", f"/pvm-instances/{quote(instance_id, safe='')}")
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                return  # already gone: a success (upstream errors, and peerpod-ctrl requeues forever)
            raise
        self._log.info("ibmcloud-powervs: deleted {id}", id=instance_id)

    async def _find(self, name: str) -> Instance | None:
        listed = await self.pi("GET", "/pvm-instances")
        for item in (listed or {}).get("pvmInstances") or []:
            if item.get("serverName") == name:
                return Instance(str(item["pvmInstanceID"]), name, fixed_ips(item, self.config.use_public_ip))
        return None
