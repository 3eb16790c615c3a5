"""deploy/ as the tests see it: render an overlay with the machine's kubectl and apply objects server-side.

`render(overlay)` copies deploy/ into a temporary directory, adds the files an operator must supply before
rendering (libvirt's and byom's SSH key pairs; the webhook certificate of components/webhook-certs-from-files when asked
for) and runs `kubectl kustomize` on the copy, so the repository is never written to. kubectl comes from the
machine (the `kubectl` package of packages.cloud.google.com, kustomize v5 inside; Debian's kubernetes-client
1.20 embeds kustomize 2.0, which knows neither components nor `labels`): scripts/setup.sh installs it when
missing, and the tests fail (never skip) without it.

`ResourcePaths` finds an object's REST path through the API server's discovery, so any kind the server
serves (CRDs included) can be applied with `apply(server, obj, dry_run=...)` (server-side apply).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SynchronousTestCase

from tests.kubeapi import REPO, KubeAPIServer

DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# Overlays whose ssh-key-secret the operator supplies as id_rsa / id_rsa.pub files.
SSH_KEY_OVERLAYS = ("byom", "libvirt")
FIELD_MANAGER = "caa-tests"
NAMESPACE = "confidential-containers-system"


def kubectl(testcase: SynchronousTestCase) -> str:
    """Path of a kubectl whose kustomize is v4 or newer (components, `labels`); fail without one."""
    path = shutil.which("kubectl")
    reason = "kubectl is not installed"
    if path is not None:
        out = subprocess.run([path, "version", "--client"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"Kustomize Version: v(\d+)", out)
        if found and int(found.group(1)) >= 4:
            return path
        reason = f"kubectl at {path} has no kustomize v4+ ({out.strip()!r})"
    testcase.fail(f"{reason}: the deploy/ tests render with it (scripts/setup.sh installs the kubectl package)")


def _ssh_key_pair(directory: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (directory / "id_rsa").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    (directory / "id_rsa.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b" caa-test\n")


def deploy_copy(testcase: SynchronousTestCase, webhook_certs: Mapping[str, bytes] | None = None) -> Path:
    """A private copy of deploy/ with the operator's files in place (removed at cleanup)."""
    root = Path(tempfile.mkdtemp(prefix="caa-deploy-"))
    testcase.addCleanup(shutil.rmtree, root, True)
    tree = root / "deploy"
    shutil.copytree(DEPLOY, tree)
    for overlay in SSH_KEY_OVERLAYS:
        _ssh_key_pair(tree / "overlays" / overlay)
    if webhook_certs is not None:
        for name, data in webhook_certs.items():
            (tree / "components" / "webhook-certs-from-files" / name).write_bytes(data)
    return tree


def render_dir(testcase: SynchronousTestCase, directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize directory`, parsed; a failure fails the test with kubectl's message."""
    result = subprocess.run([kubectl(testcase), "kustomize", str(directory)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        testcase.fail(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    objects = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for obj in objects:
        # kustomize wraps long base64 values over several lines; the API server's decoder skips the line breaks
        if obj["kind"] == "Secret":
            obj["data"] = {k: "".join(v.split()) for k, v in obj.get("data", {}).items()}
        for hook in obj.get("webhooks", []) if obj["kind"].endswith("WebhookConfiguration") else []:
            if "caBundle" in hook["clientConfig"]:
                hook["clientConfig"]["caBundle"] = "".join(hook["clientConfig"]["caBundle"].split())
    return objects


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(testcase: SynchronousTestCase, overlay: str) -> list[dict[str, Any]]:
    """The objects of deploy/overlays/<overlay> as `kubectl apply -k` would send them (rendered once per
    process; each caller gets its own copy to change)."""
    if overlay not in _rendered:
        _rendered[overlay] = render_dir(testcase, deploy_copy(testcase) / "overlays" / overlay)
    return copy.deepcopy(_rendered[overlay])


def find(objects: Iterable[Mapping[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of that kind (and name)."""
    hits = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    if len(hits) != 1:
        raise AssertionError(f"expected one {kind} {name or ''}, found {len(hits)}")
    return dict(hits[0])


# What deploy/ uses that Kubernetes 1.20 (the tests' API server) does not know yet, left out when applying
# there: the DaemonSet's surge rollout (maxSurge is alpha in 1.21, on by default since 1.22; without it 1.20
# also refuses maxUnavailable 0). docs/install.md asks for Kubernetes >= 1.22; the render tests check the
# strategy itself.
NEWER_THAN_THE_TEST_SERVER = {("DaemonSet", ".spec.updateStrategy.rollingUpdate")}


def for_test_server(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without what the tests' API server does not know yet (in place; returned)."""
    for kind, path in NEWER_THAN_THE_TEST_SERVER:
        if obj["kind"] == kind:
            *parents, last = path.strip(".").split(".")
            node = obj
            for key in parents:
                node = node.get(key) or {}
            node.pop(last, None)
    return obj


def crds_first(objects: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Namespaces and CRDs before everything else (what `kubectl apply` must create first)."""
    order = {"Namespace": 0, "CustomResourceDefinition": 1}
    return sorted(objects, key=lambda o: order.get(o["kind"], 2))


class ResourcePaths:
    """apiVersion + kind -> REST collection path, from the server's discovery documents (cached per group)."""

    def __init__(self, server: KubeAPIServer) -> None:
        self.server = server
        self._groups: dict[str, dict[str, tuple[str, bool]]] = {}

    def forget(self, api_version: str) -> None:
        """Drop a cached group (after its CRD was created)."""
        self._groups.pop(api_version, None)

    def _resources(self, api_version: str) -> dict[str, tuple[str, bool]]:
        if api_version not in self._groups:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            listing = self.server.request("GET", base)
            self._groups[api_version] = {r["kind"]: (r["name"], r["namespaced"])
                                         for r in listing["resources"] if "/" not in r["name"]}
        return self._groups[api_version]

    def path(self, obj: Mapping[str, Any]) -> str:
        """The object's own path (.../namespaces/<ns>/<plural>/<name> or .../<plural>/<name>)."""
        api_version, kind, meta = obj["apiVersion"], obj["kind"], obj["metadata"]
        plural, namespaced = self._resources(api_version)[kind]
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        ns = f"/namespaces/{meta.get('namespace') or 'default'}" if namespaced else ""
        return f"{base}{ns}/{plural}/{meta['name']}"


def apply(server: KubeAPIServer, paths: ResourcePaths, obj: Mapping[str, Any], dry_run: bool = False) -> Any:
    """Server-side apply of one object (forced, field manager caa-tests); the server's answer."""
    query = {"fieldManager": FIELD_MANAGER, "force": "true"}
    if dry_run:
        query["dryRun"] = "All"
    return server.request("PATCH", f"{paths.path(obj)}?{urllib.parse.urlencode(query)}", dict(obj),
                          content_type="application/apply-patch+yaml")


def missing_fields(sent: Any, stored: Any, at: str = "") -> list[str]:
    """Paths of what `sent` holds and `stored` does not: fields the server pruned as unknown (a typo, a field
    of a newer Kubernetes) or changed. Servers before 1.25 drop unknown fields silently; this makes them visible."""
    if isinstance(sent, dict):
        if not isinstance(stored, dict):
            return [at or "/"]
        out: list[str] = []
        for key, value in sent.items():
            if key not in stored:
                out.append(f"{at}.{key}")
            else:
                out.extend(missing_fields(value, stored[key], f"{at}.{key}"))
        return out
    if isinstance(sent, list):
        if not isinstance(stored, list) or len(stored) != len(sent):
            return [at]
        pairs = enumerate(zip(sent, stored, strict=True))
        return [p for i, (a, b) in pairs for p in missing_fields(a, b, f"{at}[{i}]")]
    if sent != stored and str(sent) != str(stored):
        return [at]
    return []


__all__ = ["DEPLOY", "NAMESPACE", "NEWER_THAN_THE_TEST_SERVER", "OVERLAYS", "ResourcePaths", "apply",
           "crds_first", "deploy_copy", "find", "for_test_server", "kubectl", "missing_fields", "render",
           "render_dir"]
