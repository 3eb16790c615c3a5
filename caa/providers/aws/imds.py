"""
Upstream's start-up fill-in (spec-providers §3.2) from the node's instance metadata service (IMDSv2): a subnet,
security groups, region and key pair that were not configured come from the worker node itself, so the pod VMs
land next to it. Only when running on EC2 (the adaptor is host-network there); every failure is only logged.
`AWS_EC2_METADATA_DISABLED=true` turns it off, `AWS_EC2_METADATA_SERVICE_ENDPOINT` moves it (botocore's names).
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger

from caa.providers.aws.config import AwsConfig
from caa.providers.interfaces import ProviderError
from caa.providers.rest import RestClient, RestRequest

DEFAULT_IMDS = "http://169.254.169.254"
TOKEN_TTL = "21600"

_log = Logger(namespace="caa.providers.aws.imds")


def needs_metadata(config: AwsConfig) -> bool:
    return bool(config.imds_endpoint) and not (
        config.subnet_id and config.region and config.key_name and config.security_group_ids)


async def fill_from_metadata(config: AwsConfig, rest: RestClient) -> AwsConfig:
    """`config` with its empty subnet, security groups, region and key name taken from IMDS (unchanged when
    IMDS cannot be reached: upstream only logs that)."""
    if not needs_metadata(config):
        return config
    base = config.imds_endpoint.rstrip("/")
    try:
        token = (await rest.call(RestRequest("PUT", f"{base}/latest/api/token",
                                             {"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL}),
                                 what="IMDS token")).body.decode().strip()

        async def get(path: str) -> str:
            response = await rest.call(RestRequest("GET", f"{base}/latest/meta-data/{path}",
                                                   {"X-aws-ec2-metadata-token": token}), what=f"IMDS {path}")
            return response.body.decode().strip()

        changes: dict[str, object] = {}
        if not config.region:
            changes["region"] = await get("placement/region")
        if not config.subnet_id or not config.security_group_ids:
            mac = await get("mac")
            if not config.subnet_id:
                changes["subnet_id"] = await get(f"network/interfaces/macs/{mac}/subnet-id")
            if not config.security_group_ids:
                changes["security_group_ids"] = tuple(
                    (await get(f"network/interfaces/macs/{mac}/security-group-ids")).split())
        if not config.key_name:
            try:
                first = (await get("public-keys/")).splitlines()
            except ProviderError:
                first = []  # no key pair on the node: none for the pod VMs either
            if first and "=" in first[0]:
                changes["key_name"] = first[0].split("=", 1)[1]
    except ProviderError as e:
        _log.info("instance metadata not available ({error}); using the configuration as given", error=e)
        return config
    _log.info("filled from the node's instance metadata: {changes}", changes=changes)
    return attrs.evolve(config, **changes)  # type: ignore[arg-type]
