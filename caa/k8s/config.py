"""Where the API server is: a kubeconfig file, or the in-cluster service account (one place for both)."""

from __future__ import annotations

import os

from kubernetes import client, config

from caa.k8s.errors import KubeError


def in_cluster() -> bool:
    """True inside a pod: the service-account environment the kubelet provides is there."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token")


def load_configuration(kubeconfig: str | None = None, context: str | None = None) -> client.Configuration:
    """A client Configuration from `kubeconfig` if given, else in-cluster, else $KUBECONFIG.

    Raises KubeError with one clear line when none is usable (a daemon turns that into a start failure)."""
    cfg = client.Configuration()
    # One attempt per call: our callers own retries and deadlines (urllib3 would retry 3 times silently).
    cfg.retries = False
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg,
                                    persist_config=False)
        elif in_cluster():
            config.load_incluster_config(client_configuration=cfg)
        elif os.environ.get("KUBECONFIG"):
            config.load_kube_config(config_file=os.environ["KUBECONFIG"], context=context,
                                    client_configuration=cfg, persist_config=False)
        else:
            raise KubeError("no Kubernetes configuration: not in a cluster and no kubeconfig given")
    except (config.ConfigException, OSError) as e:
        raise KubeError(f"Kubernetes configuration: {e}") from e
    return cfg


def cluster_configured(kubeconfig: str | None = None) -> bool:
    """Whether `load_configuration(kubeconfig)` has something to load (a daemon's 'am I in a cluster?')."""
    return bool(kubeconfig) or in_cluster() or bool(os.environ.get("KUBECONFIG"))


__all__ = ["cluster_configured", "in_cluster", "load_configuration"]
