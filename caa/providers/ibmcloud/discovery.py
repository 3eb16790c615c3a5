"""
Start-up discovery of the IBM Cloud VPC provider on IKS/ROKS (spec-providers §6.2): what the operator left unset
comes from the cluster, through the Kubernetes API.

- cluster id: ConfigMap `kube-system/cluster-info`, key `cluster_id`, or `cluster-config.json`'s `cluster_id`;
- from the node's labels (`NODE_NAME`): `topology.kubernetes.io/region` -> the VPC endpoint
  `https://<region>.iaas.cloud.ibm.com/v1`, `topology.kubernetes.io/zone` -> the zone,
  `ibm-provider.kubernetes.io/subnet-id` or `ibm-cloud.kubernetes.io/subnet-id` -> the primary subnet;
- then the subnet itself (`GET /subnets/{id}` on the VPC API, done by the provider) gives the VPC and resource group.

Each lookup that fails is logged and leaves the value unset; the provider then says which value is missing.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.logger import Logger

from caa.k8s.errors import KubeError
from caa.providers.ibmcloud.config import IbmCloudConfig

REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBNET_LABELS = ("ibm-provider.kubernetes.io/subnet-id", "ibm-cloud.kubernetes.io/subnet-id")

_log = Logger()


def cluster_id_of(config_map: dict[str, Any]) -> str:
    data = config_map.get("data") or {}
    if data.get("cluster_id"):
        return str(data["cluster_id"])
    try:
        return str(json.loads(data.get("cluster-config.json") or "{}").get("cluster_id") or "")
    except (ValueError, AttributeError):
        return ""


def from_labels(config: IbmCloudConfig, labels: dict[str, str]) -> IbmCloudConfig:
    """The unset endpoint, zone and subnet filled in from a node's labels."""
    changes: dict[str, Any] = {}
    if not config.vpc_url and labels.get(REGION_LABEL):
        changes["vpc_url"] = f"https://{labels[REGION_LABEL]}.iaas.cloud.ibm.com/v1"
    if not config.zone and labels.get(ZONE_LABEL):
        changes["zone"] = labels[ZONE_LABEL]
    if not config.subnet_id:
        subnet = next((labels[label] for label in SUBNET_LABELS if labels.get(label)), "")
        if subnet:
            changes["subnet_id"] = subnet
    return attrs.evolve(config, **changes) if changes else config


async def discover(config: IbmCloudConfig, kube: Any, node_name: str) -> IbmCloudConfig:
    """`config` with what the cluster says filled in; `kube` is an IKubeClient (or None: nothing to ask)."""
    if kube is None:
        return config
    if not config.cluster_id:
        try:
            found = cluster_id_of(await kube.get_config_map("kube-system", "cluster-info"))
        except KubeError as e:
            _log.info("ibmcloud: no cluster id from kube-system/cluster-info: {error}", error=e)
            found = ""
        if found:
            config = attrs.evolve(config, cluster_id=found)
    if node_name and not (config.vpc_url and config.zone and config.subnet_id):
        try:
            node = await kube.get_node(node_name)
        except KubeError as e:
            _log.warn("ibmcloud: cannot read node {node} for region, zone and subnet: {error}", node=node_name,
                      error=e)
        else:
            config = from_labels(config, dict((node.get("metadata") or {}).get("labels") or {}))
    return config
