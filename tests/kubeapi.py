"""A real kube-apiserver + etcd for the tests (Kubernetes 1.20 built from Debian's source package).

`shared_server(testcase)` is the one entry point: it builds the binaries when the cache is empty
(scripts/build-kube.sh, ~10 minutes once; `make test` runs the build before trial), starts etcd and the API
server on free loopback ports in a private directory, waits for /readyz and hands back a `KubeAPIServer`
shared by every test of this process (trial -j2 workers each start their own). It is stopped at process exit.
Without root the tests skip, except in CI (`CI` set), where they fail: CI must run them.

Identity: `server.admin_token` is in system:masters; `server.token_for(namespace, name)` creates that
ServiceAccount and returns a token for it (TokenRequest API), so a test can bind exactly the RBAC a daemon
gets in deploy/ and prove least privilege. `server.kubeconfig(token)` writes a kubeconfig for any token.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SkipTest, SynchronousTestCase

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-kube.sh"
START_TIMEOUT = 90.0
ADMIN_TOKEN_USER = "caa-test-admin"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # A trial worker killed hard must not leave etcd/apiserver behind: PR_SET_PDEATHSIG = 1.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


def kube_bin_dir() -> Path:
    """The directory holding kube-apiserver, kube-scheduler, kube-controller-manager and etcd (built if needed)."""
    out = subprocess.run([str(BUILD_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def require_root(testcase: SynchronousTestCase) -> None:
    """Skip without root outside CI; in CI missing root is a failure, never a skip."""
    if os.geteuid() == 0:
        return
    if os.environ.get("CI"):
        testcase.fail("the Kubernetes API-server tests need root (apt, /var/cache/caa-kube) and CI must run them")
    raise SkipTest("the Kubernetes API-server tests need root")


class KubeAPIServer:
    """etcd + kube-apiserver started on free loopback ports under a private directory (one per process)."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.dir = Path(tempfile.mkdtemp(prefix=f"caa-kube-{os.getpid()}-"))
        self.admin_token = os.urandom(16).hex()
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []
        self.ca_file = self.dir / "certs" / "apiserver.crt"
        self.admin_kubeconfig = self.dir / "admin.kubeconfig"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "wb")
        self._logs.append(log)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                                preexec_fn=_die_with_parent)
        self._procs.append(proc)
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def start(self) -> None:
        etcd_port, peer_port = _free_port(), _free_port()
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn("etcd", [
            str(self.bin_dir / "etcd"), "--name", "default", "--data-dir", str(self.dir / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"default={peer_url}"])
        self._wait("etcd", etcd, lambda: self._http_ok(f"{etcd_url}/health"))

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (self.dir / "sa.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption()))
        (self.dir / "sa.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (self.dir / "tokens.csv").write_text(f'{self.admin_token},{ADMIN_TOKEN_USER},admin-uid,"system:masters"\n')
        api = self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--cert-dir={self.dir / 'certs'}", f"--token-auth-file={self.dir / 'tokens.csv'}",
            "--authorization-mode=RBAC", "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={self.dir / 'sa.pub'}",
            f"--service-account-signing-key-file={self.dir / 'sa.key'}",
            "--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none",
            "--allow-privileged=true", "--insecure-port=0"])
        self._wait("kube-apiserver", api, lambda: self._http_ok(f"{self.url}/readyz", self.admin_token))
        self.kubeconfig(self.admin_token, self.admin_kubeconfig)

    def _ssl(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _http_ok(self, url: str, token: str | None = None) -> bool:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=2, context=self._ssl() if token else None) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError, ssl.SSLError):
            return False

    def _wait(self, name: str, proc: subprocess.Popen[bytes], ready: Any) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{name} not ready after {START_TIMEOUT:.0f}s:\n{self.log_tail(name)}")

    def request(self, method: str, path: str, body: Any = None, token: str | None = None,
                content_type: str = "application/json") -> Any:
        """A raw API call (JSON in, JSON out) for test setup; HTTPError carries the status."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method, headers={
            "Authorization": f"Bearer {token or self.admin_token}", "Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=30, context=self._ssl()) as resp:
            return json.loads(resp.read() or b"null")

    def kubeconfig(self, token: str, path: Path | None = None) -> Path:
        """Write a kubeconfig for token (default: a fresh file in the server's directory) and return its path."""
        if path is None:
            fd, name = tempfile.mkstemp(prefix="kubeconfig-", dir=self.dir)
            os.close(fd)
            path = Path(name)
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url,
                                                      "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }
        path.write_text(json.dumps(doc))  # JSON is YAML
        path.chmod(0o600)
        return path

    def ensure_namespace(self, name: str) -> None:
        try:
            self.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": name}})
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise

    def token_for(self, namespace: str, service_account: str) -> str:
        """A bearer token of ServiceAccount namespace/service_account (created if missing), for RBAC tests."""
        self.ensure_namespace(namespace)
        try:
            self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account}})
        except urllib.error.HTTPError as e:
            if e.code != 409:
                raise
        review = self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 86400}})
        return str(review["status"]["token"])

    def start_scheduler(self) -> subprocess.Popen[bytes]:
        """Run a kube-scheduler against this server (binds Pods to Nodes; stopped with the server)."""
        k = str(self.admin_kubeconfig)
        return self._spawn("kube-scheduler", [
            str(self.bin_dir / "kube-scheduler"), f"--kubeconfig={k}", f"--authentication-kubeconfig={k}",
            f"--authorization-kubeconfig={k}", "--leader-elect=false", "--secure-port=0", "--port=0"])

    def start_controller_manager(self, controllers: str = "garbagecollector,namespace") -> subprocess.Popen[bytes]:
        """Run a kube-controller-manager with only `controllers` (default: garbage collection, so objects
        owned by a deleted Pod go too, and namespace deletion); stopped with the server."""
        k = str(self.admin_kubeconfig)
        return self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"), f"--kubeconfig={k}", f"--controllers={controllers}",
            "--leader-elect=false", "--secure-port=0", "--port=0"])

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: KubeAPIServer | None = None
_failed: str | None = None


def shared_server(testcase: SynchronousTestCase) -> KubeAPIServer:
    """This process's API server, started on first use and stopped at exit (see the module docstring)."""
    global _shared, _failed
    require_root(testcase)
    if _shared is not None:
        return _shared
    if _failed is not None:
        testcase.fail(_failed)
    try:
        server = KubeAPIServer(kube_bin_dir())
        atexit.register(server.stop)
        server.start()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        _failed = f"could not start the test API server: {e}"
        testcase.fail(_failed)
    _shared = server
    return server


__all__ = ["KubeAPIServer", "kube_bin_dir", "require_root", "shared_server"]
