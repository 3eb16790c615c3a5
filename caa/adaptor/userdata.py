"""What CreateVM computes from the request: pod identity, instance spec, VM name, apf.json, cloud-config.

Key names and layouts follow upstream byte for byte (spec-adaptor §5.2, §5.5, §5.6) so unmodified pod
VM images accept the user data.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from caa.providers.interfaces import InstanceSpec

ANN_POD_NAME = "io.kubernetes.cri.sandbox-name"
ANN_POD_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
ANN_POD_UID = "io.kubernetes.cri.sandbox-uid"
ANN_PREFIX = "io.katacontainers.config.hypervisor."
ANN_MACHINE_TYPE = ANN_PREFIX + "machine_type"
ANN_IMAGE = ANN_PREFIX + "image"
ANN_VCPUS = ANN_PREFIX + "default_vcpus"
ANN_MEMORY = ANN_PREFIX + "default_memory"
ANN_GPUS = ANN_PREFIX + "default_gpus"
ANN_INITDATA = ANN_PREFIX + "cc_init_data"

APF_PATH = "/run/peerpod/apf.json"
AUTH_PATH = "/run/peerpod/auth.json"
INITDATA_PATH = "/run/peerpod/initdata"
SCRATCH_PATH = "/run/peerpod/scratch-space.marker"
MAX_AUTH_JSON = 12288

_log = Logger(namespace="caa.adaptor.userdata")


class AnnotationError(ValueError):
    """A required annotation is missing; the message names it."""


def pod_identity(annotations: Mapping[str, str]) -> tuple[str, str]:
    """(pod name, namespace) from the CRI annotations; the CRI-O form k8s_<pod>_<ns>_<uid>_<n> is handled."""
    name = annotations.get(ANN_POD_NAME, "")
    parts = name.split("_")
    if len(parts) > 1 and parts[0] == "k8s":
        name = parts[1]
    if not name:
        raise AnnotationError(f"pod name annotation {ANN_POD_NAME} is missing or empty")
    ns = annotations.get(ANN_POD_NAMESPACE, "")
    if not ns:
        raise AnnotationError(f"pod namespace annotation {ANN_POD_NAMESPACE} is missing or empty")
    return name, ns


def _int_annotation(annotations: Mapping[str, str], key: str) -> int:
    v = annotations.get(key, "")
    if not v:
        return 0
    try:
        return int(v, 10)
    except ValueError:
        _log.warn("annotation {key}={value!r} is not a base-10 integer; using 0", key=key, value=v)
        return 0


def instance_spec(annotations: Mapping[str, str], multi_nic: bool = False,
                  volumes: Sequence[str] = ()) -> InstanceSpec:
    """The InstanceSpec of §5.3 from the pod's annotations."""
    return InstanceSpec(
        instance_type=annotations.get(ANN_MACHINE_TYPE, ""),
        vcpus=_int_annotation(annotations, ANN_VCPUS),
        memory_mib=_int_annotation(annotations, ANN_MEMORY),
        gpus=_int_annotation(annotations, ANN_GPUS),
        image=annotations.get(ANN_IMAGE, ""),
        multi_nic=multi_nic,
        volumes=tuple(volumes),  # type: ignore[arg-type]
    )


_BAD = re.compile(r"[^a-z0-9-]")


def _sanitise(s: str) -> str:
    return _BAD.sub("-", s.lower())


def vm_name(pod_name: str, sandbox_id: str, max_len: int = 63) -> str:
    """podvm-<pod>-<sid8> (§5.2): lower-case, [a-z0-9-] only, pod part cut so the total is <= max_len."""
    pod = _sanitise(pod_name)
    sid8 = _sanitise(sandbox_id)[:8]
    if 5 + len(pod) + 10 > max_len:
        pod = pod[: max_len - 5 - 10]
    return f"podvm-{pod}-{sid8}"


@dataclass(frozen=True)
class APFConfig:
    """apf.json (§5.5). pod_network is the "pod-network" object as built by the network package."""

    pod_namespace: str
    pod_name: str
    pod_network: Mapping[str, Any]
    tls_server_key: str = ""
    tls_server_cert: str = ""
    tls_client_ca: str = ""
    tls_min_version: str = ""
    tls_cipher_suites: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "pod-network": dict(self.pod_network),
            "pod-namespace": self.pod_namespace,
            "pod-name": self.pod_name,
        }
        for key, value in (("tls-server-key", self.tls_server_key), ("tls-server-cert", self.tls_server_cert),
                           ("tls-client-ca", self.tls_client_ca), ("tls-min-version", self.tls_min_version)):
            if value:
                d[key] = value
        if self.tls_cipher_suites:
            d["tls-cipher-suites"] = list(self.tls_cipher_suites)
        return d

    def to_json(self) -> str:
        """Pretty-printed with 4 spaces, as upstream writes it (Go MarshalIndent escapes <, > and &)."""
        text = json.dumps(self.to_dict(), indent=4, ensure_ascii=False)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@dataclass(frozen=True)
class WriteFile:
    path: str
    content: str = ""


def cloud_config(files: Sequence[WriteFile]) -> str:
    """The cloud-init text of §5.6, byte for byte."""
    lines = ["#cloud-config"]
    if files:
        lines += ["", "write_files:"]
        for f in files:
            lines.append(f"  - path: {f.path}")
            if f.content:
                lines.append("    content: |")
                pieces = f.content.split("\n")
                if pieces and pieces[-1] == "":
                    pieces.pop()
                lines += ["      " + p for p in pieces]
    return "\n".join(lines) + "\n"


def encode_initdata(toml_text: str) -> str:
    """base64(std, padded) of gzip of the initdata TOML (annotation content, §5.6 row 3)."""
    return base64.b64encode(gzip.compress(toml_text.encode(), mtime=0)).decode()


def validate_initdata(value: str) -> None:
    """Validate the global --initdata (gzip+base64 TOML); raises ValueError naming what is wrong."""
    try:
        raw = base64.b64decode(value.strip(), validate=True)
        if raw[:2] == b"\x1f\x8b":  # gzip (what upstream writes); plain TOML is accepted too
            raw = gzip.decompress(raw)
    except Exception as e:
        raise ValueError(f"initdata is not base64 (of gzip) data: {e}") from e
    try:
        doc = tomllib.loads(raw.decode())
    except Exception as e:
        raise ValueError(f"initdata is not valid TOML: {e}") from e
    if doc.get("algorithm") not in ("sha256", "sha384", "sha512"):
        raise ValueError(f"initdata algorithm {doc.get('algorithm')!r} is not sha256, sha384 or sha512")
    if not isinstance(doc.get("version"), str):
        raise ValueError("initdata has no version string")
    data = doc.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError("initdata [data] must be a table of strings")


def auth_json(auths: Mapping[str, str]) -> str | None:
    """Compact {"auths":{reg:{"auth":...}}} or None when empty or over 12288 bytes."""
    if not auths:
        return None
    text = json.dumps({"auths": {r: {"auth": a} for r, a in auths.items()}}, separators=(",", ":"))
    if len(text.encode()) > MAX_AUTH_JSON:
        _log.warn("auth.json is {size} bytes (> {limit}); not sent to the pod VM", size=len(text), limit=MAX_AUTH_JSON)
        return None
    return text


def user_data(apf: APFConfig, annotations: Mapping[str, str], default_initdata: str = "",
              auths: Mapping[str, str] | None = None, scratch_space: bool = False) -> str:
    """cloud-config with apf.json, auth.json, initdata and the scratch marker, in upstream's order."""
    files = [WriteFile(APF_PATH, apf.to_json())]
    auth = auth_json(auths or {})
    if auth is not None:
        files.append(WriteFile(AUTH_PATH, auth))
    ann = annotations.get(ANN_INITDATA, "")
    initdata = encode_initdata(ann) if ann else default_initdata
    if initdata:
        files.append(WriteFile(INITDATA_PATH, initdata))
    if scratch_space:
        files.append(WriteFile(SCRATCH_PATH))
    return cloud_config(files)
