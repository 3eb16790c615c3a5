"""`twistd caa-peerpod-ctrl`: options and service (plugin in twisted/plugins/caa_plugins.py).

Upstream's flags (`--health-probe-bind-address`, `--metrics-bind-address`, `--leader-elect`; Go `host:port`
addresses, `-flag` and `--flag=true|false` spellings, zap flags ignored) plus the lease timings and what
upstream hard-codes. Precedence: default < environment variable (set, non-empty) < flag. Leader election is
on by default (upstream's chart always passes `--leader-elect`); `--leader-elect=false` turns it off.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.python import usage

from caa.goflags import GoFlagOptions, endpoint_description
from caa.k8s.objects import PEERPOD_CTRL_LEASE
from caa.peerpodctrl.config import CONFIG_MAP_NAME, DEFAULT_NAMESPACE, SECRET_NAME
from caa.providers.options import parse_bool, parse_duration

__all__ = ["Options", "makeService"]

class Options(GoFlagOptions):
    synopsis = "[options]"
    longdesc = ("Peer-pods controller: deletes the cloud instance of every PeerPod being deleted that still "
                "holds peer.pod/finalizer, then releases the finalizer. One replica acts (Lease).")
    optParameters: ClassVar[list[list[Any]]] = [
        ["kubeconfig", None, "", "Kubeconfig file (default: in-cluster, else $KUBECONFIG)."],
        ["peerpods-namespace", None, DEFAULT_NAMESPACE, "Namespace of peer-pods-cm, peer-pods-secret and the Lease."],
        ["config-map", None, CONFIG_MAP_NAME, "ConfigMap of provider settings (upstream env var names as keys)."],
        ["secret", None, SECRET_NAME, "Secret of provider settings (upstream env var names as keys)."],
        ["health-probe-bind-address", None, ":8081", "Plain HTTP /healthz, /readyz, /metrics (0: off)."],
        ["metrics-bind-address", None, "0", "Accepted for compatibility: metrics are on the probe address."],
        ["leader-elect", None, True, "Leader election on a Lease (true/false).", parse_bool],
        ["leader-election-id", None, PEERPOD_CTRL_LEASE, "Name of the Lease."],
        ["leader-election-namespace", None, "", "Namespace of the Lease (default: --peerpods-namespace)."],
        ["identity", None, "", "This replica's holder identity (default: hostname_uuid)."],
        ["lease-duration", None, 15.0, "How long a Lease not renewed stays held (Go duration).", parse_duration],
        ["renew-deadline", None, 10.0, "A leader that cannot renew for this long stops acting.", parse_duration],
        ["retry-period", None, 2.0, "Interval of the Lease tries and renewals.", parse_duration],
        ["release-on-stop", None, True, "Release the Lease on a clean stop (true/false).", parse_bool],
        ["backoff-base", None, 0.005, "First retry delay of a failed PeerPod (doubles per failure).", parse_duration],
        ["backoff-max", None, 1000.0, "Longest retry delay of a failed PeerPod.", parse_duration],
        ["kube-timeout", None, 10.0, "Deadline of one Kubernetes API call.", parse_duration],
    ]
    optFlags: ClassVar[list[list[str | None]]] = [
        ["version", None, "Print the version and exit."],
    ]
    envVars: ClassVar[Mapping[str, str]] = {
        "peerpods-namespace": "PEERPODS_NAMESPACE",
        "identity": "POD_NAME",
    }

    bareTrue: ClassVar[frozenset[str]] = frozenset({"leader-elect", "release-on-stop"})

    def opt_version(self) -> None:
        from caa import __version__

        print(f"caa-peerpod-ctrl version {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        from caa.peerpodctrl.lease import LeaseTimings, default_identity

        self["probe-endpoint"] = endpoint_description(self["health-probe-bind-address"])
        endpoint_description(self["metrics-bind-address"])  # checked, not used
        if not self["leader-election-namespace"]:
            self["leader-election-namespace"] = self["peerpods-namespace"]
        if not self["identity"]:
            self["identity"] = default_identity()
        timings = LeaseTimings(self["lease-duration"], self["renew-deadline"], self["retry-period"])
        try:
            timings.check()
        except ValueError as e:
            raise usage.UsageError(f"leader election: {e}") from None
        self["lease"] = timings if self["leader-elect"] else None
        if not 0 < self["backoff-base"] <= self["backoff-max"]:
            raise usage.UsageError("need 0 < --backoff-base <= --backoff-max")
        if self["kube-timeout"] <= 0:
            raise usage.UsageError("--kube-timeout must be positive")


def makeService(options: Options) -> Any:
    from twisted.application.service import MultiService
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from caa.k8s.client import connect
    from caa.k8s.errors import KubeError
    from caa.k8s.pool import ThreadPoolService
    from caa.k8s.watch import peerpods_source
    from caa.peerpodctrl.config import cloud_config_sources
    from caa.peerpodctrl.service import PeerPodController
    from caa.reactors import as_node_reactor

    node_reactor = as_node_reactor(reactor)
    top = MultiService()
    # Three watches hold a thread each; the rest serve calls. Added first: stopped last.
    pool = ThreadPoolService(maxthreads=8, name="caa-peerpod-ctrl-k8s")
    pool.setServiceParent(top)
    try:
        client = connect(node_reactor, pool.pool, options["kubeconfig"] or None, timeout=options["kube-timeout"])
    except KubeError as e:
        raise SystemExit(f"caa-peerpod-ctrl: {e}") from None
    probe = options["probe-endpoint"]
    controller = PeerPodController(
        node_reactor, client, peerpods_source(client),
        cloud_config_sources(client, options["peerpods-namespace"], options["config-map"], options["secret"]),
        namespace=options["leader-election-namespace"], identity=options["identity"], lease=options["lease"],
        lease_name=options["leader-election-id"], release_on_stop=options["release-on-stop"],
        backoff_base=options["backoff-base"], backoff_max=options["backoff-max"],
        probe_endpoint=serverFromString(node_reactor, probe) if probe else None)
    controller.setServiceParent(top)
    return top
