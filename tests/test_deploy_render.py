"""deploy/ rendered with the machine's kubectl (tests/deploy.py) and checked.

- every overlay renders, with the objects an install needs and its provider's peer-pods-cm;
- every container's arguments parse with its daemon's real option parser, and every object refers to objects
  that exist (ServiceAccounts, Secrets, ConfigMaps, the webhook's Service and certificate, the RuntimeClass's
  nodes);
- one image for every container of every overlay, tagged with caa's version;
- what each daemon may do (capabilities, host paths, user, RBAC verbs) equals the table below, per overlay;
- the cert-manager-free webhook variant carries the CA of its files as caBundle;
- every object of every overlay is accepted by the real kube-apiserver (tests/kubeapi.py) in a server-side
  dry-run apply, Namespace and CRDs applied first, with nothing pruned as unknown. cert-manager's kinds are
  checked against stand-in CRDs typed as cert-manager's for the fields deploy/ uses (no cert-manager here).
"""

from __future__ import annotations

import base64
import os
import time
import urllib.error
from collections.abc import Iterable, Mapping
from typing import Any

from twisted.python import usage
from twisted.trial.unittest import TestCase

from caa import __version__
from caa.adaptor.options import AdaptorOptions
from caa.peerpodctrl import tap as ctrl_tap
from caa.providers.registry import provider_names
from caa.tls import CertificateAuthority
from caa.webhook import tap as webhook_tap
from tests.deploy import (
    NAMESPACE,
    OVERLAYS,
    SSH_KEY_OVERLAYS,
    ResourcePaths,
    apply,
    crds_first,
    deploy_copy,
    find,
    for_test_server,
    missing_fields,
    render,
    render_dir,
)
from tests.kubeapi import KubeAPIServer, shared_server

IMAGE = f"localhost/caa:{__version__}"
PROVIDERS = {"local": "local", "libvirt": "libvirt", "aws": "aws", "azure": "azure", "gcp": "gcp", "byom": "byom",
             "ibmcloud": "ibmcloud", "ibmcloud-powervs": "ibmcloud-powervs", "alibabacloud": "alibabacloud"}
# What an operator fills in before applying (the overlays ship these keys empty); the adaptor refuses to start
# without them.
OPERATOR_SETTINGS = {
    "aws": {"PODVM_AMI_ID": "ami-0123456789abcdef0"},
    "azure": {"AZURE_SUBSCRIPTION_ID": "00000000-0000-0000-0000-000000000000", "AZURE_REGION": "eastus",
              "AZURE_RESOURCE_GROUP": "caa", "AZURE_IMAGE_ID": (
                  "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/caa/providers/"
                  "Microsoft.Compute/images/podvm"),
              "AZURE_SUBNET_ID": (
                  "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/caa/providers/"
                  "Microsoft.Network/virtualNetworks/worker/subnets/nodes")},
    "gcp": {"GCP_PROJECT_ID": "caa-project", "GCP_ZONE": "us-central1-a", "PODVM_IMAGE_NAME": "podvm"},
    "byom": {"VM_POOL_IPS": "192.168.122.10,192.168.122.20-192.168.122.29"},
    "ibmcloud": {"IBMCLOUD_PODVM_IMAGE_ID": "r006-01234567-89ab-cdef-0123-456789abcdef"},
    "ibmcloud-powervs": {"POWERVS_ZONE": "dal12", "POWERVS_SERVICE_INSTANCE_ID": "0123456789abcdef0123456789abcdef",
                         "POWERVS_NETWORK_ID": "01234567-89ab-cdef-0123-456789abcdef",
                         "POWERVS_IMAGE_ID": "89abcdef-0123-4567-89ab-cdef01234567"},
    "alibabacloud": {"IMAGEID": "m-2ze0123456789abcdefg", "VSWITCH_ID": "vsw-2ze0123456789abcdefg",
                     "SECURITY_GROUP_IDS": "sg-2ze0123456789abcdefg"},
}
# What an operator puts in <overlay>-cred.env (shipped with empty values) where the provider's options refuse
# to parse without it.
OPERATOR_SECRETS = {
    "ibmcloud": {"IBMCLOUD_API_KEY": "caa-test-api-key"},
    "ibmcloud-powervs": {"IBMCLOUD_API_KEY": "caa-test-api-key"},
    "alibabacloud": {"ALIBABACLOUD_ACCESS_KEY_ID": "LTAI0123456789abcdef",
                     "ALIBABACLOUD_ACCESS_KEY_SECRET": "caa-test-secret"},
}
# Objects an overlay puts outside confidential-containers-system, and where.
OTHER_NAMESPACES = {("ibmcloud", "Role", "caa-ibmcloud-cluster-info"): "kube-system",
                    ("ibmcloud", "RoleBinding", "caa-ibmcloud-cluster-info"): "kube-system"}

ADAPTOR_RULES = [
    "cluster confidentialcontainers.org/peerpods create", "cluster confidentialcontainers.org/peerpods delete",
    "cluster confidentialcontainers.org/peerpods patch",
    "cluster core/nodes get", "cluster core/nodes patch", "cluster core/nodes/status patch",
    "cluster core/pods get", "cluster core/pods list", "cluster core/secrets get",
    "cluster core/serviceaccounts get",
]
CTRL_RULES = [
    "cluster confidentialcontainers.org/peerpods delete", "cluster confidentialcontainers.org/peerpods get",
    "cluster confidentialcontainers.org/peerpods list", "cluster confidentialcontainers.org/peerpods patch",
    "cluster confidentialcontainers.org/peerpods watch",
    "namespace coordination.k8s.io/leases create",
    "namespace coordination.k8s.io/leases[33f6c5d6.confidentialcontainers.org] get",
    "namespace coordination.k8s.io/leases[33f6c5d6.confidentialcontainers.org] update",
    "namespace core/configmaps[peer-pods-cm] get", "namespace core/configmaps[peer-pods-cm] list",
    "namespace core/configmaps[peer-pods-cm] watch", "namespace core/secrets[peer-pods-secret] get",
    "namespace core/secrets[peer-pods-secret] list", "namespace core/secrets[peer-pods-secret] watch",
]
# byom's IP pool ConfigMap: read, made on first use, written back (adaptor and controller).
BYOM_POOL_RULES = ["namespace core/configmaps create", "namespace core/configmaps[byom-ip-pool-state] get",
                   "namespace core/configmaps[byom-ip-pool-state] update"]
NODE_PATHS = ["/run/kata-containers/shared/direct-volumes", "/run/netns", "/run/peerpod", "/run/xtables.lock"]

# What each daemon may do in the cloud overlays (aws, azure, gcp, ibmcloud-powervs, alibabacloud).
BASE_PRIVILEGES: dict[str, dict[str, Any]] = {
    "cloud-api-adaptor-daemonset": {
        "service_account": "cloud-api-adaptor", "token": True, "host_network": True, "user": 0,
        "non_root": False, "privileged": False, "add": ["NET_ADMIN", "SYS_ADMIN"], "drop": ["ALL"],
        "read_only_root": False, "host_paths": NODE_PATHS, "secrets": [], "rules": ADAPTOR_RULES},
    "caa-peerpod-ctrl": {
        "service_account": "caa-peerpod-ctrl", "token": True, "host_network": False, "user": 65532,
        "non_root": True, "privileged": False, "add": [], "drop": ["ALL"], "read_only_root": True,
        "host_paths": [], "secrets": [], "rules": CTRL_RULES},
    "caa-webhook": {
        "service_account": "caa-webhook", "token": False, "host_network": False, "user": 65532, "non_root": True,
        "privileged": False, "add": [], "drop": ["ALL"], "read_only_root": True, "host_paths": [],
        "secrets": ["webhook-server-cert"], "rules": []},
}
# What an overlay changes, and why (see the overlay's patches).
OVERLAY_PRIVILEGES: dict[str, dict[str, dict[str, Any]]] = {
    "aws": {}, "azure": {}, "gcp": {}, "ibmcloud-powervs": {}, "alibabacloud": {},
    # start-up discovery on IKS: the cluster id from kube-system/cluster-info (Node labels: the base's get).
    "ibmcloud": {"cloud-api-adaptor-daemonset": {
        "rules": sorted([*ADAPTOR_RULES, "namespace kube-system core/configmaps[cluster-info] get"])}},
    # SFTP to the VMs with the key pair in /root/.ssh, and the pool ConfigMap, in the adaptor and in the
    # controller deleting leaked instances.
    "byom": {"cloud-api-adaptor-daemonset": {"secrets": ["ssh-key-secret"],
                                             "rules": sorted([*ADAPTOR_RULES, *BYOM_POOL_RULES])},
             "caa-peerpod-ctrl": {"user": 0, "non_root": False, "secrets": ["ssh-key-secret"],
                                  "rules": sorted([*CTRL_RULES, *BYOM_POOL_RULES])}},
    # qemu+ssh: root's key pair, in the adaptor and in the controller deleting leaked domains.
    "libvirt": {"cloud-api-adaptor-daemonset": {"secrets": ["ssh-key-secret"]},
                "caa-peerpod-ctrl": {"user": 0, "non_root": False, "secrets": ["ssh-key-secret"]}},
    # instances are network namespaces of the node (Bidirectional /run/netns: privileged), development only.
    "local": {"cloud-api-adaptor-daemonset": {"privileged": True,
                                              "host_paths": sorted([*NODE_PATHS, "/run/caa-local"])},
              "caa-peerpod-ctrl": {"host_network": True, "user": 0, "non_root": False, "privileged": True,
                                   "host_paths": ["/run/caa-local", "/run/netns"]}},
}


def workloads(objects: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [dict(o) for o in objects if o["kind"] in ("DaemonSet", "Deployment")]


def _rules(objects: list[dict[str, Any]], service_account: str) -> list[str]:
    """Every (scope, group/resource[names], verb) granted to the ServiceAccount by the rendered bindings."""
    out: set[str] = set()
    for binding in (o for o in objects if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        if not any(s["kind"] == "ServiceAccount" and s["name"] == service_account for s in binding["subjects"]):
            continue
        role = find(objects, binding["roleRef"]["kind"], binding["roleRef"]["name"])
        namespace = binding["metadata"].get("namespace")
        scope = "cluster" if binding["kind"] == "ClusterRoleBinding" else (
            "namespace" if namespace == NAMESPACE else f"namespace {namespace}")
        for rule in role["rules"]:
            names = ",".join(rule.get("resourceNames", []))
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.add(f"{scope} {group or 'core'}/{resource}{f'[{names}]' if names else ''} {verb}")
    return sorted(out)


def privileges(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per workload: what its (single) container may do on the node and in the API."""
    table = {}
    for w in workloads(objects):
        pod = w["spec"]["template"]["spec"]
        [container] = pod["containers"]
        pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})
        caps = sc.get("capabilities", {})
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounted = [volumes[m["name"]] for m in container.get("volumeMounts", [])]
        sa = pod.get("serviceAccountName", "default")
        account = find(objects, "ServiceAccount", sa)
        table[w["metadata"]["name"]] = {
            "service_account": sa,
            "token": pod.get("automountServiceAccountToken", account.get("automountServiceAccountToken", True)),
            "host_network": pod.get("hostNetwork", False),
            "user": sc.get("runAsUser", pod_sc.get("runAsUser")),
            "non_root": sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot", False)),
            "privileged": sc.get("privileged", False),
            "add": sorted(caps.get("add", [])), "drop": sorted(caps.get("drop", [])),
            "read_only_root": sc.get("readOnlyRootFilesystem", False),
            "host_paths": sorted(v["hostPath"]["path"] for v in mounted if "hostPath" in v),
            "secrets": sorted(v["secret"]["secretName"] for v in mounted if "secret" in v),
            "rules": _rules(objects, sa),
        }
    return table


def _expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command arguments."""
    for name, text in env.items():
        value = value.replace(f"$({name})", text)
    return value


class RenderTests(TestCase):
    def test_every_overlay_renders_a_whole_install(self) -> None:
        self.assertEqual(OVERLAYS, sorted(PROVIDERS))
        for overlay, provider in PROVIDERS.items():
            objects = render(self, overlay)
            kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
            for needed in ("Namespace/confidential-containers-system",
                           "CustomResourceDefinition/peerpods.confidentialcontainers.org",
                           "RuntimeClass/kata-remote", "DaemonSet/cloud-api-adaptor-daemonset",
                           "Deployment/caa-peerpod-ctrl", "Deployment/caa-webhook", "Service/caa-webhook",
                           "MutatingWebhookConfiguration/caa-mutating-webhook-configuration",
                           "ConfigMap/peer-pods-cm", "Issuer/caa-selfsigned-issuer",
                           "Certificate/caa-webhook-serving-cert"):
                self.assertIn(needed, kinds, overlay)
            cm = find(objects, "ConfigMap", "peer-pods-cm")
            self.assertEqual(cm["data"]["CLOUD_PROVIDER"], provider)
            self.assertEqual(cm["metadata"]["namespace"], "confidential-containers-system")
            for o in objects:
                if o["kind"] not in ("Namespace", "CustomResourceDefinition", "RuntimeClass", "ClusterRole",
                                     "ClusterRoleBinding", "MutatingWebhookConfiguration"):
                    where = OTHER_NAMESPACES.get((overlay, o["kind"], o["metadata"]["name"]), NAMESPACE)
                    self.assertEqual(o["metadata"].get("namespace"), where,
                                     f"{overlay}: {o['kind']}/{o['metadata']['name']}")
        for overlay in SSH_KEY_OVERLAYS:
            self.assertEqual(sorted(find(render(self, overlay), "Secret", "ssh-key-secret")["data"]),
                             ["id_rsa", "id_rsa.pub"], overlay)
        for overlay, keys in (("aws", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]),
                              ("azure", ["AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID"]),
                              ("gcp", ["GCP_CREDENTIALS"]),
                              ("ibmcloud", ["IBMCLOUD_API_KEY", "IBMCLOUD_IAM_PROFILE_ID"]),
                              ("ibmcloud-powervs", ["IBMCLOUD_API_KEY"]),
                              ("alibabacloud", ["ALIBABACLOUD_ACCESS_KEY_ID", "ALIBABACLOUD_ACCESS_KEY_SECRET"])):
            self.assertEqual(sorted(find(render(self, overlay), "Secret", "peer-pods-secret").get("data", {})),
                             keys)

    def test_arguments_parse_with_the_daemons_own_options(self) -> None:
        parsers = {"caa-peerpod-ctrl": ctrl_tap.Options, "caa-webhook": webhook_tap.Options}
        for overlay in PROVIDERS:
            objects = render(self, overlay)
            cm = find(objects, "ConfigMap", "peer-pods-cm")["data"]
            self.assertEqual({k for k, v in cm.items() if not v}, set(OPERATOR_SETTINGS.get(overlay, {})))
            secrets = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "peer-pods-secret"]
            shipped = {k: base64.b64decode(v) for s in secrets for k, v in s.get("data", {}).items()}
            self.assertEqual({k for k, v in shipped.items() if v}, set(), f"{overlay}: credentials committed")
            self.assertLessEqual(set(OPERATOR_SECRETS.get(overlay, {})), set(shipped), overlay)
            cm = {**cm, **OPERATOR_SETTINGS.get(overlay, {}), **OPERATOR_SECRETS.get(overlay, {})}
            for w in workloads(objects):
                [container] = w["spec"]["template"]["spec"]["containers"]
                self.assertEqual(container["command"], ["/usr/local/bin/entrypoint.sh"])
                daemon, *args = container["args"]
                env = {e["name"]: e.get("value", "10.1.2.3") for e in container.get("env", [])}
                args = [_expand(a, env) for a in args]
                self.assertNotIn("$(", " ".join(args), f"{overlay}: unexpanded variable in {args}")
                self.assertIn(cm["CLOUD_PROVIDER"], provider_names(), f"{overlay}: no such provider")
                if daemon == "caa-adaptor":
                    # the provider's own options read the process environment, as in the container
                    self.patch(os, "environ", {**os.environ, **cm, **env})
                    options: usage.Options = AdaptorOptions({**cm, **env})
                else:
                    options = parsers[daemon]({**cm, **env})
                try:
                    options.parseOptions(args)
                except usage.UsageError as e:
                    self.fail(f"{overlay}: {daemon} {args}: {e}")
                if daemon == "caa-adaptor":
                    self.assertEqual(options["metrics-port"], 8090)
                    self.assertEqual(options["metrics-interface"], "10.1.2.3")
                    self.assertEqual(options["probe-port"], 8000)  # the startup probe's port
                if daemon == "caa-peerpod-ctrl":
                    self.assertIsNotNone(options["lease"], "leader election must be on")

    def test_references_between_objects_resolve(self) -> None:
        for overlay in PROVIDERS:
            objects = render(self, overlay)
            names = {(o["kind"], o["metadata"]["name"]) for o in objects}
            for w in workloads(objects):
                pod = w["spec"]["template"]["spec"]
                self.assertIn(("ServiceAccount", pod["serviceAccountName"]), names)
                self.assertEqual(w["spec"]["selector"]["matchLabels"].items() - w["spec"]["template"]["metadata"]
                                 ["labels"].items(), set())
                for ref in pod["containers"][0].get("envFrom", []):
                    kind, ref_name = ("Secret", ref["secretRef"]) if "secretRef" in ref else (
                        "ConfigMap", ref["configMapRef"])
                    if not ref_name.get("optional"):
                        self.assertIn((kind, ref_name["name"]), names, overlay)
                for volume in pod.get("volumes", []):
                    if "secret" in volume and not volume["secret"].get("optional"):
                        # the webhook's certificate comes from the Certificate (cert-manager writes it)
                        certificate = find(objects, "Certificate")
                        self.assertEqual(volume["secret"]["secretName"], certificate["spec"]["secretName"])
            ds = find(objects, "DaemonSet")
            self.assertEqual(ds["spec"]["updateStrategy"],
                             {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
            self.assertEqual(find(objects, "RuntimeClass", "kata-remote")["scheduling"]["nodeSelector"],
                             ds["spec"]["template"]["spec"]["nodeSelector"])
            service, webhook = find(objects, "Service", "caa-webhook"), find(objects, "Deployment", "caa-webhook")
            self.assertEqual(service["spec"]["selector"], webhook["spec"]["selector"]["matchLabels"])
            [hook] = find(objects, "MutatingWebhookConfiguration")["webhooks"]
            ref = hook["clientConfig"]["service"]
            self.assertEqual((ref["name"], ref["namespace"], ref["port"]),
                             (service["metadata"]["name"], service["metadata"]["namespace"],
                              service["spec"]["ports"][0]["port"]))
            certificate = find(objects, "Certificate")
            self.assertIn(f"{ref['name']}.{ref['namespace']}.svc", certificate["spec"]["dnsNames"])
            annotations = find(objects, "MutatingWebhookConfiguration")["metadata"]["annotations"]
            self.assertEqual(annotations["cert-manager.io/inject-ca-from"],
                             f"{certificate['metadata']['namespace']}/{certificate['metadata']['name']}")

    def test_one_image_for_every_container(self) -> None:
        images = {(overlay, c["image"]) for overlay in PROVIDERS for w in workloads(render(self, overlay))
                  for c in w["spec"]["template"]["spec"]["containers"]}
        self.assertEqual({image for _, image in images}, {IMAGE})

    def test_privileges_per_daemon(self) -> None:
        self.assertEqual(sorted(OVERLAY_PRIVILEGES), OVERLAYS)
        for overlay, changes in OVERLAY_PRIVILEGES.items():
            expected = {name: {**row, **changes.get(name, {})} for name, row in BASE_PRIVILEGES.items()}
            self.assertEqual(privileges(render(self, overlay)), expected, overlay)

    def test_webhook_certificate_from_files(self) -> None:
        files = webhook_files()
        objects = render_dir(self, files_variant(self, files))
        self.assertNotIn("Certificate", {o["kind"] for o in objects})
        self.assertNotIn("Issuer", {o["kind"] for o in objects})
        mwc = find(objects, "MutatingWebhookConfiguration")
        self.assertNotIn("annotations", mwc["metadata"])
        self.assertEqual(base64.b64decode(mwc["webhooks"][0]["clientConfig"]["caBundle"]), files["ca.crt"])
        secret = find(objects, "Secret", "webhook-server-cert")
        self.assertEqual(secret["type"], "kubernetes.io/tls")
        self.assertEqual({k: base64.b64decode(v) for k, v in secret["data"].items()}, files)


def webhook_files(server_name: str = "caa-webhook.confidential-containers-system.svc") -> dict[str, bytes]:
    """ca.crt, tls.crt and tls.key for components/webhook-certs-from-files (a fresh CA)."""
    ca = CertificateAuthority.create()
    pair = ca.issue_server_certificate(server_name)
    return {"ca.crt": ca.cert_pem, "tls.crt": pair.cert_pem, "tls.key": pair.key_pem}


def files_variant(testcase: TestCase, files: Mapping[str, bytes], overlay: str = "local") -> Any:
    """A copy of deploy/ whose overlay uses components/webhook-certs-from-files (the documented swap) with
    `files` in place; the overlay's directory."""
    copy = deploy_copy(testcase, webhook_certs=files)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    testcase.assertIn("../../components/cert-manager", text)
    kustomization.write_text(text.replace("../../components/cert-manager",
                                          "../../components/webhook-certs-from-files"))
    return kustomization.parent


def cert_manager_crds() -> list[dict[str, Any]]:
    """Stand-ins for cert-manager's Issuer and Certificate CRDs (cert-manager.io/v1), typed as cert-manager's own
    schema for the fields deploy/ uses (and their required ones), so a misspelt or mistyped field is pruned or
    refused here as it would be in a cluster with cert-manager."""
    string, strings = {"type": "string"}, {"type": "array", "items": {"type": "string"}}
    issuer_ref = {"type": "object", "required": ["name"],
                  "properties": {"name": string, "kind": string, "group": string}}
    kinds = {
        "Issuer": {"type": "object", "properties": {
            "selfSigned": {"type": "object", "properties": {"crlDistributionPoints": strings}},
            "ca": {"type": "object", "required": ["secretName"], "properties": {"secretName": string}}}},
        "Certificate": {"type": "object", "required": ["issuerRef", "secretName"], "properties": {
            "commonName": string, "dnsNames": strings, "duration": string, "renewBefore": string,
            "issuerRef": issuer_ref, "secretName": string, "usages": strings, "isCA": {"type": "boolean"}}},
    }
    def schema(spec: dict[str, Any]) -> dict[str, Any]:
        return {"openAPIV3Schema": {"type": "object", "properties": {
            "apiVersion": string, "kind": string, "metadata": {"type": "object"}, "spec": spec,
            "status": {"type": "object"}}}}
    return [{
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{kind.lower()}s.cert-manager.io"},
        "spec": {"group": "cert-manager.io", "scope": "Namespaced",
                 "names": {"kind": kind, "plural": f"{kind.lower()}s", "singular": kind.lower(),
                           "listKind": f"{kind}List"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": schema(spec)}]},
    } for kind, spec in kinds.items()]


def establish(server: KubeAPIServer, paths: ResourcePaths, crd: dict[str, Any]) -> None:
    """Apply a CRD for real and wait until it is Established and served."""
    apply(server, paths, crd)
    path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = server.request("GET", path).get("status", {})
        if any(c["type"] == "Established" and c["status"] == "True" for c in status.get("conditions") or []):
            for version in crd["spec"]["versions"]:
                paths.forget(f"{crd['spec']['group']}/{version['name']}")
            return
        time.sleep(0.1)
    raise AssertionError(f"CRD {crd['metadata']['name']} not Established")


def validate(testcase: TestCase, server: KubeAPIServer, objects: list[dict[str, Any]]) -> None:
    """Namespace and CRDs applied for real, everything else in a dry run; nothing may be refused or pruned."""
    paths = ResourcePaths(server)
    for crd in cert_manager_crds():
        establish(server, paths, crd)
    for obj in crds_first(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        for_test_server(obj)
        try:
            if obj["kind"] == "CustomResourceDefinition":
                establish(server, paths, obj)
                continue
            answer = apply(server, paths, obj, dry_run=obj["kind"] != "Namespace")
        except urllib.error.HTTPError as e:
            testcase.fail(f"{where} refused: {e.code} {e.read().decode(errors='replace')}")
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        testcase.assertEqual(missing_fields(body, answer), [], f"{where}: fields the API server dropped or changed")


class ServerValidationTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = shared_server(self)

    def test_every_overlay_validates_on_the_api_server(self) -> None:
        for overlay in PROVIDERS:
            validate(self, self.server, render(self, overlay))

    def test_files_variant_validates_on_the_api_server(self) -> None:
        files = webhook_files()
        validate(self, self.server, render_dir(self, files_variant(self, files)))

    def test_a_misspelt_field_is_noticed(self) -> None:
        """The check itself: server-side apply refuses a field the kind's schema does not declare, for a
        built-in kind (here in a DaemonSet's pod spec) as for a CRD's (cert-manager's stand-in)."""
        objects = render(self, "aws")
        paths = ResourcePaths(self.server)
        apply(self.server, paths, find(objects, "Namespace"))
        ds = find(objects, "DaemonSet")
        ds["spec"]["template"]["spec"]["hostNetwrk"] = True
        with self.assertRaises(urllib.error.HTTPError) as refused:
            apply(self.server, paths, ds, dry_run=True)
        self.assertIn("hostNetwrk: field not declared in schema", refused.exception.read().decode())
        for crd in cert_manager_crds():
            establish(self.server, paths, crd)
        certificate = find(objects, "Certificate")
        certificate["spec"]["dnsName"] = ["caa-webhook"]
        with self.assertRaises(urllib.error.HTTPError) as refused:
            apply(self.server, paths, certificate, dry_run=True)
        self.assertIn("dnsName: field not declared in schema", refused.exception.read().decode())
