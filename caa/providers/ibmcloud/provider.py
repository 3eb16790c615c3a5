"""The IBM Cloud VPC provider: one virtual server instance per pod VM (spec-providers §6), on the VPC REST API
(`<vpc>/instances?version=...&generation=2`) with IAM bearer tokens (iam.py)."""

from __future__ import annotations

import json
import platform
import sys
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import attrs
from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from caa.k8s.client import connect
from caa.k8s.config import cluster_configured
from caa.k8s.errors import KubeError
from caa.once import Once
from caa.providers.base import CoroutineProvider
from caa.providers.ibmcloud.config import VPC_API_VERSION, IbmCloudConfig
from caa.providers.ibmcloud.discovery import discover
from caa.providers.ibmcloud.iam import IamTokenSource
from caa.providers.instancetypes import InstanceTypeInfo, select_instance_type
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

NO_IP = "0.0.0.0"
USER_AGENT = (f"cloud-api-adaptor-ibm-0.0.1 (arch={platform.machine()}; os={sys.platform}; "
              f"python.version={platform.python_version()})")
QUOTA_CODES = ("quota", "insufficient", "capacity")


def vpc_error(response: RestResponse) -> ProviderError | None:
    """The VPC API's `{"errors": [{"code", "message", "more_info"}], "trace"}`: 429/5xx TRANSIENT, 404
    NOT_FOUND, quota codes QUOTA, any other 4xx INVALID_CONFIG; the message is `code: message`."""
    status = response.status
    if 200 <= status < 300:
        return None
    try:
        body = json.loads(response.body or b"{}")
        first = body["errors"][0]
        message = f"{first.get('code', '')}: {first.get('message', '')}"
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        message = f"HTTP {status}: {response.body[:200].decode('utf-8', 'replace')}"
    if status == 429 or status >= 500:
        return TransientError(message)
    if status == 404:
        return ProviderError(ErrorKind.NOT_FOUND, message)
    if any(code in message.split(":", 1)[0] for code in QUOTA_CODES):
        return QuotaExceeded(message)
    return InvalidConfig(message)


def instance_prototype(config: IbmCloudConfig, name: str, user_data: bytes, profile: str, image_id: str,
                       placement: str) -> dict[str, Any]:
    """The InstancePrototype of one pod VM (spec-providers §6.3); pure, so tested without a cloud."""
    security_groups = [{"id": sg} for sg in config.security_group_ids]
    primary: dict[str, Any] = {"subnet": {"id": config.subnet_id}}
    if security_groups:
        primary["security_groups"] = security_groups
    prototype: dict[str, Any] = {
        "name": name,
        "image": {"id": image_id},
        "profile": {"name": profile},
        "zone": {"name": config.zone},
        "vpc": {"id": config.vpc_id},
        "user_data": user_data.decode("utf-8"),
        "primary_network_interface": primary,
        "metadata_service": {"enabled": True, "protocol": "http"},
        "confidential_compute_mode": "disabled" if config.disable_cvm else "tdx",
        "enable_secure_boot": not config.disable_cvm,
    }
    if config.key_id:
        prototype["keys"] = [{"id": config.key_id}]
    if config.resource_group_id:
        prototype["resource_group"] = {"id": config.resource_group_id}
    if config.secondary_subnet_id:
        prototype["network_interfaces"] = [{"subnet": {"id": config.secondary_subnet_id}, "allow_ip_spoofing": True,
                                            "security_groups": [{"id": config.secondary_security_group_id}]}]
    if placement:
        prototype["placement_target"] = {"id": placement}
    return prototype


def instance_ips(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The primary NIC's IP then the others', or None while any NIC has none yet (upstream compares against the
    secondary NIC count only, §16.2 #15)."""
    primary = body.get("primary_network_interface") or {}
    primary_id = primary.get("id")
    nics = [primary] + [n for n in body.get("network_interfaces") or [] if n.get("id") != primary_id or not primary_id]
    ips = []
    for nic in nics:
        address = ((nic.get("primary_ip") or {}).get("address")) or ""
        if not address or address == NO_IP:
            return None
        if address not in ips:
            ips.append(address)
    return tuple(ips)


@implementer(IProvider)
class IbmCloudProvider(CoroutineProvider):
    _log = Logger()

    def __init__(self, reactor: INodeReactor, config: IbmCloudConfig, http: HTTPClient | None = None,
                 policy: RetryPolicy = RetryPolicy(), token_clock: IReactorTime | None = None,
                 kube: Any = None) -> None:
        self._reactor = reactor
        self.config = config
        self._kube = kube  # an IKubeClient for the start-up discovery; None: made when in a cluster
        self._threadpool: ThreadPool | None = None
        if http is None:
            http, self.owned_pool = default_http_client(reactor)
        self.rest = RestClient(reactor, http, policy, Redactor(config.secrets()))
        self.iam = IamTokenSource(token_clock or reactor, self.rest, config.iam_url, config.api_key,
                                  config.iam_profile_id, config.cr_token_file)
        self._types = Once(self._load)
        self._image_arch: dict[str, str] = {}
        self._placement: tuple[str, str] | None = None  # (dedicated host id, host group id) in our zone

    # -- the API --------------------------------------------------------------------------------------------
    async def vpc(self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None) -> Any:
        """One VPC API call (version and generation added); the decoded JSON answer (None for 204)."""
        return await self.vpc_with(self.config, method, path, body, query)

    async def vpc_with(self, config: IbmCloudConfig, method: str, path: str, body: Any = None,
                       query: Mapping[str, str] | None = None) -> Any:
        params = {"version": VPC_API_VERSION, "generation": "2", **(query or {})}
        request = RestRequest(method, f"{config.vpc_url.rstrip('/')}{path}?{urlencode(params)}",
                              {"Accept": "application/json", "Content-Type": "application/json"},
                              json.dumps(body).encode() if body is not None else b"")
        response = await self.rest.call(request, vpc_error, self.iam.sign, what=f"{method} {path.split('?')[0]}")
        return response.json() if response.body else None

    async def _verify(self) -> None:
        await self._prepare()

    async def _teardown(self) -> None:
        await super()._teardown()
        if self._threadpool is not None:
            if self._kube is not None:
                self._kube.close()
            self._threadpool.stop()
            self._threadpool = None

    def _kube_client(self) -> Any:
        """The Kubernetes client of the discovery: the given one, else one of our own when in a cluster."""
        if self._kube is None and cluster_configured():
            self._threadpool = ThreadPool(minthreads=0, maxthreads=1, name="caa-ibmcloud-k8s")
            self._threadpool.start()
            try:
                self._kube = connect(self._reactor, self._threadpool)
            except KubeError as e:
                self._log.warn("ibmcloud: no Kubernetes client for the start-up discovery: {error}", error=e)
        return self._kube

    async def _discover(self) -> None:
        """Fill in what was not configured from the cluster (discovery.py) and the subnet (VPC, resource group)."""
        config = await discover(self.config, self._kube_client(), self.config.node_name)
        if config.vpc_url and config.subnet_id and not (config.vpc_id and config.resource_group_id):
            subnet = await self.vpc_with(config, "GET", f"/subnets/{quote(config.subnet_id, safe='')}")
            config = attrs.evolve(config, vpc_id=config.vpc_id or str((subnet.get("vpc") or {}).get("id") or ""),
                                  resource_group_id=config.resource_group_id or str(
                                      (subnet.get("resource_group") or {}).get("id") or ""))
        config.check_discovered()
        if config.cluster_id:
            config = attrs.evolve(config, security_group_ids=tuple(dict.fromkeys(
                (*config.security_group_ids, await self._cluster_security_group(config)))))
        if config != self.config:
            self._log.info("ibmcloud: discovered {fields}", fields={
                k: v for k, v in attrs.asdict(config).items() if v != getattr(self.config, k) and k != "api_key"})
        self.config = config

    async def _prepare(self) -> list[InstanceTypeInfo]:
        """Once: the profiles' sizes, the images' architectures, the dedicated host (group) of our zone."""
        return await self._types.get()

    async def _load(self) -> list[InstanceTypeInfo]:
        self.config.check()
        await self._discover()
        types = []
        for name in dict.fromkeys((self.config.profile_name, *self.config.profile_list)):
            try:
                profile = await self.vpc("GET", f"/instance/profiles/{quote(name, safe='')}")
            except ProviderError as e:
                if e.retryable:
                    raise
                raise InvalidConfig(f"ibmcloud: instance profile {name}: {e}") from None
            types.append(InstanceTypeInfo(
                name, int(profile["vcpu_count"]["value"]), int(profile["memory"]["value"]) * 1024,
                arch=str((profile.get("vcpu_architecture") or {}).get("value") or "")))
        for image_id in self.config.image_ids:
            try:
                image = await self.vpc("GET", f"/images/{quote(image_id, safe='')}")
            except ProviderError as e:
                if e.retryable:
                    raise
                self._log.warn("ibmcloud: image {id} skipped: {error}", id=image_id, error=e)
                continue
            self._image_arch[image_id] = str((image.get("operating_system") or {}).get("architecture") or "")
        if not self._image_arch:
            raise InvalidConfig("ibmcloud: no images valid images found")
        self._placement = (await self._in_zone("/dedicated_hosts", self.config.dedicated_host_ids),
                           await self._in_zone("/dedicated_host/groups", self.config.dedicated_host_group_ids))
        return types

    async def _cluster_security_group(self, config: IbmCloudConfig) -> str:
        """The id of the cluster's security group `kube-<cluster id>` (the Kubernetes Service API), which upstream
        always adds to the pod VMs' primary interface; InvalidConfig when the cluster has none."""
        query = urlencode({"cluster": config.cluster_id, "type": "cluster"})
        request = RestRequest("GET", f"{config.containers_url}/network/v2/security-group/getSecurityGroups?{query}",
                              {"Accept": "application/json", "User-Agent": USER_AGENT,
                               "X-Request-Id": str(uuid.uuid4())})
        response = await self.rest.call(request, vpc_error, self.iam.sign, what="cluster security groups")
        wanted = f"kube-{config.cluster_id}"
        for group in response.json() or []:
            if isinstance(group, dict) and group.get("name") == wanted and group.get("id"):
                return str(group["id"])
        raise InvalidConfig(f"ibmcloud: the cluster's security group {wanted} was not found")

    async def _in_zone(self, collection: str, ids: tuple[str, ...]) -> str:
        """The first of `ids` whose zone is ours; InvalidConfig when ids were given and none is."""
        for item in ids:
            found = await self.vpc("GET", f"{collection}/{quote(item, safe='')}")
            if (found.get("zone") or {}).get("name") == self.config.zone:
                return item
        if ids:
            raise InvalidConfig(f"ibmcloud: none of {', '.join(ids)} ({collection[1:]}) is in zone {self.config.zone}")
        return ""

    # -- create / delete -----------------------------------------------------------------------------------
    def _image_for(self, spec: InstanceSpec, profile: InstanceTypeInfo | None) -> str:
        if spec.image:
            self._log.info("Choosing {image} from annotation as the IBM Cloud image for the PodVM", image=spec.image)
            return spec.image
        arch = spec.arch or (profile.arch if profile else "")
        for image_id, image_arch in self._image_arch.items():
            if not arch or image_arch == arch:
                return image_id
        raise InvalidConfig(f"ibmcloud: no configured image for architecture {arch}")

    async def _create(self, name: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        if spec.volumes:
            raise InvalidConfig("ibmcloud: CSI volumes are not supported yet")
        types = await self._prepare()
        config = self.config
        profile = select_instance_type(spec, types, config.profile_list, config.profile_name)
        image_id = self._image_for(spec, next((t for t in types if t.name == profile), None))
        host, group = self._placement or ("", "")
        body = instance_prototype(config, name, user_data, profile, image_id, host or group)
        try:
            created = await self.vpc("POST", "/instances", body)
        except ProviderError:
            if not (host and group):
                raise
            self._log.warn("ibmcloud: create on dedicated host {host} failed; retrying on group {group}",
                           host=host, group=group)
            created = await self.vpc("POST", "/instances", instance_prototype(
                config, name, user_data, profile, image_id, group))
        instance_id = str(created["id"])
        self._log.info("ibmcloud: created instance {id} ({name}, {profile})", id=instance_id, name=name,
                       profile=profile)
        try:
            ips = await self._wait_ips(instance_id)
            if config.cluster_id or config.tags:
                await self._tag(str(created.get("crn") or ""))
            return Instance(instance_id, name, ips)
        except BaseException as e:  # a failure or a cancel: roll back (the contract), then re-raise
            await self._roll_back(instance_id, e)
            raise

    async def _wait_ips(self, instance_id: str) -> tuple[str, ...]:
        async def probe() -> tuple[str, ...] | None:
            body = await self.vpc("GET", f"/instances/{instance_id}")
            status = body.get("status")
            if status in ("failed", "deleting"):
                reasons = "; ".join(str(r.get("message")) for r in body.get("status_reasons") or [])
                raise TransientError(f"ibmcloud: instance {instance_id} is {status}" + (f": {reasons}" if reasons
                                                                                       else ""))
            return instance_ips(body)

        return await poll(self._reactor, probe, self.config.poll_interval, self.config.boot_timeout,
                          f"ibmcloud: instance {instance_id} has no IP")

    async def _tag(self, crn: str) -> None:
        names = ([f"coco-pod-vm:{self.config.cluster_id}"] if self.config.cluster_id else []) + list(self.config.tags)
        request = RestRequest("POST", f"{self.config.tagging_url}/v3/tags/attach?tag_type=user",
                              {"Accept": "application/json", "Content-Type": "application/json"},
                              json.dumps({"resources": [{"resource_id": crn}], "tag_names": names}).encode())
        response = await self.rest.call(request, vpc_error, self.iam.sign, what="global tagging attach")
        results = (response.json() or {}).get("results") or []
        if any(r.get("is_error") for r in results):
            raise TransientError(f"ibmcloud: tagging {crn} failed")

    async def _delete(self, instance_id: str) -> None:
        try:
            await self.vpc("DELETE", f"/instances/{quote(instance_id, safe='')}")
        except ProviderError as e:
            if e.kind is ErrorKind.NOT_FOUND:
                return  # already gone: a success (upstream errors, and peerpod-ctrl requeues forever)
            raise
        self._log.info("ibmcloud: deleted instance {id}", id=instance_id)

    async def _find(self, name: str) -> Instance | None:
        body = await self.vpc("GET", "/instances", query={"name": name})
        for item in body.get("instances") or []:
            if item.get("name") == name and item.get("status") != "deleting":
                return Instance(str(item["id"]), name, instance_ips(item) or ())
        return None
