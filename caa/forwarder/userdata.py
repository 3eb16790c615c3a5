"""caa-process-user-data: fetch the pod VM's user data and write the allowed `/run/peerpod/*` files.

One-shot, run before the forwarder (spec-podvm §2). Sources, first match wins:

1. NoCloud `cidata` volume: `<cidata-dir>/user-data` (the volume is mounted read-only first if it is present
   and not mounted yet), or `--user-data-file`;
2. Azure IMDS, 3. AWS IMDS (v2 token, v1 fallback), 4. GCP metadata server, 5. Alibaba Cloud metadata,
   each detected from `/sys/class/dmi/id/sys_vendor` (GCP also by probing its metadata server).

The document is a strict cloud-config (`caa.podvm_api.cloudconfig`, shared with the adaptor that writes it):
only `write_files` items with `path` and `content`; any other key or a duplicate key is an error. Only the six
allowed paths are written (credentials 0600, the rest 0644); then initdata is processed
(`caa.forwarder.initdata`).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from caa.forwarder import initdata
from caa.podvm_api.cloudconfig import PEERPOD_DIR, PEERPOD_FILES, CloudConfigError, WriteFile
from caa.podvm_api.cloudconfig import parse as parse_cloud_config
from caa.reactors import INodeReactor, as_node_reactor

if TYPE_CHECKING:
    from treq.client import HTTPClient

__all__ = [
    "UserDataError",
    "CREDENTIAL_FILES",
    "write_allowed_files",
    "FileSource",
    "AzureSource",
    "AWSSource",
    "GCPSource",
    "AlibabaSource",
    "cidata_source",
    "detect_source",
    "retrieve_cloud_config",
    "provision",
    "provision_files",
    "make_http_client",
    "main",
]

#: Files holding secrets: registry credentials, and apf.json which carries the VM's TLS server key.
CREDENTIAL_FILES = frozenset({"auth.json", "apf.json"})
CIDATA_DIR = "/media/cidata"
CIDATA_DEVICE = "/dev/disk/by-label/cidata"
DMI_DIR = "/sys/class/dmi/id"

AZURE_URL = "http://169.254.169.254"
AWS_URL = "http://169.254.169.254"
GCP_URL = "http://metadata.google.internal"
ALIBABA_URL = "http://100.100.100.200"

AZURE_USERDATA_PATH = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
AWS_TOKEN_PATH = "/latest/api/token"
AWS_USERDATA_PATH = "/latest/user-data"
GCP_PROBE_PATH = "/computeMetadata/v1/instance"
GCP_USERDATA_PATH = "/computeMetadata/v1/instance/attributes/user-data"
ALIBABA_USERDATA_PATH = "/latest/user-data"

FETCH_ATTEMPTS = 10
RETRY_DELAY = 5.0
DEFAULT_TIMEOUT = 180.0
REQUEST_TIMEOUT = 10.0
AWS_TOKEN_TIMEOUT = 5.0

_log = Logger(namespace="caa.forwarder.userdata")


class UserDataError(Exception):
    """User data could not be fetched, decoded or parsed; the message says which."""


def write_allowed_files(files: Sequence[WriteFile], output_dir: str | os.PathLike[str]) -> list[str]:
    """Write each file whose path is exactly `/run/peerpod/<allowed name>` into `output_dir`.

    Returns the names written. Others are skipped with a log line (never written).
    """
    allowed = {f"{PEERPOD_DIR}/{n}": n for n in PEERPOD_FILES}
    out = Path(output_dir)
    written: list[str] = []
    for f in files:
        name = allowed.get(f.path)
        if name is None:
            _log.warn("File: {path} is not allowed in WriteFiles.", path=f.path)
            continue
        mode = 0o600 if name in CREDENTIAL_FILES else 0o644
        initdata.write_file(out / name, f.content.encode("utf-8"), mode)
        _log.info("wrote {path} ({size} bytes, mode {mode:o})", path=str(out / name),
                  size=len(f.content), mode=mode)
        written.append(name)
    return written


# --- sources --------------------------------------------------------------------------------------------

HTTPGet = Callable[..., "Deferred[Any]"]


def _dmi_vendor(dmi_dir: str) -> str:
    try:
        return Path(dmi_dir, "sys_vendor").read_text().strip()
    except OSError:
        return ""


async def _http(http: Any, method: str, url: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
    resp = await http.request(method, url, headers={k: [v] for k, v in headers.items()}, timeout=timeout)
    body = await resp.content()
    return int(resp.code), bytes(body)


async def _get_ok(http: Any, url: str, headers: dict[str, str], timeout: float = REQUEST_TIMEOUT) -> bytes:
    try:
        code, body = await _http(http, "GET", url, headers, timeout)
    except Exception as e:
        raise UserDataError(f"GET {url}: {e}") from None
    if code != 200:
        raise UserDataError(f"GET {url}: HTTP status {code}")
    return body


def _b64(body: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(body.replace(b"\r", b"").replace(b"\n", b""), validate=True)
    except (binascii.Error, ValueError):
        raise UserDataError(f"{what} user data is not base64") from None


@attrs.frozen
class FileSource:
    """A local user-data file (NoCloud `cidata`'s `user-data`, or `--user-data-file`)."""

    path: str
    name: str = "file"

    async def fetch(self) -> bytes:
        try:
            return Path(self.path).read_bytes()
        except OSError as e:
            raise UserDataError(f"cannot read {self.path}: {e.strerror}") from None


@attrs.frozen
class AzureSource:
    """Azure IMDS: `userData` (base64) with header `Metadata: true`."""

    http: Any
    base_url: str = AZURE_URL
    name: str = "azure"

    async def fetch(self) -> bytes:
        body = await _get_ok(self.http, self.base_url + AZURE_USERDATA_PATH, {"Metadata": "true"})
        return _b64(body, "Azure")


@attrs.frozen
class AWSSource:
    """AWS IMDS: IMDSv2 token (PUT, TTL 60 s, 5 s timeout), then user-data; without a token IMDSv1."""

    http: Any
    base_url: str = AWS_URL
    name: str = "aws"

    async def token(self) -> str | None:
        url = self.base_url + AWS_TOKEN_PATH
        try:
            code, body = await _http(self.http, "PUT", url, {"X-aws-ec2-metadata-token-ttl-seconds": "60"},
                                     AWS_TOKEN_TIMEOUT)
        except Exception as e:
            _log.warn("AWS IMDSv2 token request failed ({error}); falling back to IMDSv1", error=str(e))
            return None
        if code != 200:
            _log.warn("AWS IMDSv2 token request: HTTP status {code}; falling back to IMDSv1", code=code)
            return None
        return body.decode("ascii", "replace").strip()

    async def fetch(self) -> bytes:
        token = await self.token()
        headers = {"X-aws-ec2-metadata-token": token} if token else {}
        return await _get_ok(self.http, self.base_url + AWS_USERDATA_PATH, headers)


@attrs.frozen
class GCPSource:
    """GCP metadata server: `attributes/user-data` (base64) with header `Metadata-Flavor: Google`."""

    http: Any
    base_url: str = GCP_URL
    name: str = "gcp"

    async def probe(self) -> bool:
        try:
            code, _ = await _http(self.http, "GET", self.base_url + GCP_PROBE_PATH,
                                  {"Metadata-Flavor": "Google"}, REQUEST_TIMEOUT)
        except Exception:
            return False
        return code == 200

    async def fetch(self) -> bytes:
        body = await _get_ok(self.http, self.base_url + GCP_USERDATA_PATH, {"Metadata-Flavor": "Google"})
        return _b64(body, "GCP")


@attrs.frozen
class AlibabaSource:
    """Alibaba Cloud metadata: `latest/user-data` (plain)."""

    http: Any
    base_url: str = ALIBABA_URL
    name: str = "alibaba"

    async def fetch(self) -> bytes:
        return await _get_ok(self.http, self.base_url + ALIBABA_USERDATA_PATH, {})


Source = FileSource | AzureSource | AWSSource | GCPSource | AlibabaSource


def _mount_cidata(cidata_dir: str, device: str = CIDATA_DEVICE) -> None:
    """Mount the NoCloud volume read-only at `cidata_dir` when it exists and is not mounted (best effort)."""
    if not os.path.exists(device) or os.path.ismount(cidata_dir):
        return
    os.makedirs(cidata_dir, exist_ok=True)
    r = subprocess.run(["mount", "-t", "iso9660", "-o", "ro", device, cidata_dir],
                       capture_output=True, text=True, check=False)
    if r.returncode:
        _log.warn("mounting {device} at {dir} failed: {err}", device=device, dir=cidata_dir,
                  err=r.stderr.strip())


def cidata_source(cidata_dir: str = CIDATA_DIR) -> FileSource | None:
    """The NoCloud volume's `user-data`, when present (the first source in upstream's order)."""
    user_data = os.path.join(cidata_dir, "user-data")
    try:
        os.stat(user_data)
    except FileNotFoundError:
        return None
    except OSError:
        pass  # like upstream: a stat error other than not-exist counts
    return FileSource(user_data)


async def detect_source(
    http: Any,
    cidata_dir: str = CIDATA_DIR,
    dmi_dir: str = DMI_DIR,
    urls: dict[str, str] | None = None,
) -> Source | None:
    """Pick the user-data source, in upstream's order. `urls` overrides base URLs (tests, development)."""
    urls = urls or {}
    cidata = cidata_source(cidata_dir)
    if cidata is not None:
        return cidata
    vendor = _dmi_vendor(dmi_dir)
    if vendor.startswith("Microsoft"):
        return AzureSource(http, urls.get("azure", AZURE_URL))
    if vendor == "Amazon EC2":
        return AWSSource(http, urls.get("aws", AWS_URL))
    if vendor == "Google":
        gcp = GCPSource(http, urls.get("gcp", GCP_URL))
        if await gcp.probe():
            return gcp
    if vendor == "Alibaba Cloud":
        return AlibabaSource(http, urls.get("alibaba", ALIBABA_URL))
    return None


async def retrieve_cloud_config(
    source: Any,
    clock: IReactorTime,
    attempts: int = FETCH_ATTEMPTS,
    delay: float = RETRY_DELAY,
    deadline: float | None = None,
) -> list[WriteFile]:
    """Fetch and parse, retrying both (a half-written file is retried): `attempts` tries, `delay` apart,
    never past `deadline` (in `clock.seconds()` time)."""
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            return parse_cloud_config(await source.fetch())
        except (UserDataError, CloudConfigError) as e:
            last = e
            _log.warn("user data from {source}, attempt {attempt}/{attempts}: {error}",
                      source=source.name, attempt=attempt, attempts=attempts, error=str(e))
        if attempt == attempts or (deadline is not None and clock.seconds() + delay > deadline):
            break
        await deferLater(clock, delay)
    raise UserDataError(f"failed to retrieve cloud config: {last}")


async def provision(
    clock: IReactorTime,
    output_dir: str = PEERPOD_DIR,
    source: Any | None = None,
    http: Any | None = None,
    cidata_dir: str = CIDATA_DIR,
    dmi_dir: str = DMI_DIR,
    timeout: float = DEFAULT_TIMEOUT,
    delay: float = RETRY_DELAY,
) -> list[str]:
    """The whole `provision-files` run; returns the names written (user data, then initdata)."""
    deadline = clock.seconds() + timeout
    written: list[str] = []
    if source is None:
        source = await detect_source(http, cidata_dir, dmi_dir)
    if source is None:
        _log.info("unsupported user data provider (no cidata volume, unknown cloud): initdata only")
    else:
        _log.info("user data source: {source}", source=source.name)
        files = await retrieve_cloud_config(source, clock, delay=delay, deadline=deadline)
        written += write_allowed_files(files, output_dir)
    try:
        init = initdata.process(output_dir)
    except (initdata.InitdataError, OSError) as e:
        raise UserDataError(f"failed to extract initdata hash: {e}") from None
    written += [n for n in init.data if n in initdata.INITDATA_FILES] + ["initdata.digest"]
    return written


async def provision_files(
    reactor: INodeReactor,
    output_dir: str = PEERPOD_DIR,
    user_data_file: str | None = None,
    cidata_dir: str = CIDATA_DIR,
    mount_cidata: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    delay: float = RETRY_DELAY,
) -> list[str]:
    """`provision-files` with its sources picked from the command line; `caa-process-user-data` and
    `caa-forwarder --provision-user-data` both run this. The cidata volume is mounted (off the reactor) only
    at its real mount point, and an HTTP client is made only when there is no cidata to read."""
    if user_data_file is not None:
        source: Source | None = FileSource(user_data_file)
    else:
        if mount_cidata and cidata_dir == CIDATA_DIR:
            await deferToThreadPool(reactor, reactor.getThreadPool(), _mount_cidata, cidata_dir)
        source = cidata_source(cidata_dir)
    http = make_http_client(reactor) if source is None else None
    return await provision(reactor, output_dir, source=source, http=http, cidata_dir=cidata_dir,
                           timeout=timeout, delay=delay)


def make_http_client(reactor: INodeReactor) -> HTTPClient:
    """A treq client without persistent connections (a one-shot program leaves nothing open)."""
    # Imported here: treq and twisted.web's client cost the guest's start-up about 50 ms (docs/benchmarks.md,
    # Forwarder start-up imports) and only a VM without a cidata volume asks a metadata service.
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="caa-process-user-data",
        description="Write the pod VM's /run/peerpod files from its user data (cidata volume or cloud IMDS).",
    )
    p.add_argument("-v", "--version", action="store_true", help="print the version and exit")
    p.add_argument("command", nargs="?", default="provision-files", choices=["provision-files"])
    p.add_argument("-t", "--user-data-fetch-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="bound for the whole run (default 180)")
    p.add_argument("--user-data-file", help="read user data from this file instead of detecting a source")
    p.add_argument("--output-dir", default=PEERPOD_DIR, help="where to write the files (default /run/peerpod)")
    p.add_argument("--cidata-dir", default=CIDATA_DIR, help="mount point of the NoCloud cidata volume")
    p.add_argument("--no-mount-cidata", action="store_true", help="do not mount the cidata volume")
    p.add_argument("--retry-delay", type=float, default=RETRY_DELAY, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.version:
        from caa import __version__

        print(f"caa-process-user-data version {__version__}")
        raise SystemExit(0)
    from twisted.internet.task import react
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)

    async def run(reactor: INodeReactor) -> None:
        try:
            await provision_files(reactor, args.output_dir, args.user_data_file or None, args.cidata_dir,
                                  not args.no_mount_cidata, args.user_data_fetch_timeout, args.retry_delay)
        except UserDataError as e:
            print(f"caa-process-user-data: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    react(lambda reactor: Deferred.fromCoroutine(run(as_node_reactor(reactor))))
