"""What CreateVM computes from the request: pod identity, instance spec, auth.json and the user data.

The formats themselves (apf.json, the cloud-config document, initdata, VM names) live in caa.podvm_api,
which the pod VM side reads with; this module only decides what goes into them (spec-adaptor §5.2, §5.6).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from twisted.logger import Logger

from caa.podvm_api import cloudconfig, gojson, initdata
from caa.podvm_api.apf import APFConfig
from caa.podvm_api.cloudconfig import APF_PATH, AUTH_PATH, INITDATA_PATH, SCRATCH_PATH, WriteFile
from caa.podvm_api.initdata import validate as validate_initdata
from caa.providers.interfaces import InstanceSpec

__all__ = [
    "ANN_POD_NAME", "ANN_POD_NAMESPACE", "ANN_POD_UID", "ANN_INITDATA", "AnnotationError", "auth_json",
    "instance_spec", "pod_identity", "user_data",
    # kept importable here for adaptor/options.py (--initdata); the home is caa.podvm_api.initdata
    "validate_initdata",
]

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
        volumes=tuple(volumes),
    )


def auth_json(auths: Mapping[str, str]) -> str | None:
    """Compact Go JSON {"auths":{reg:{"auth":...}}} or None when empty or over 12288 bytes."""
    if not auths:
        return None
    text = gojson.dumps({"auths": {r: {"auth": a} for r, a in auths.items()}})
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
    encoded = initdata.encode(ann) if ann else default_initdata
    if encoded:
        files.append(WriteFile(INITDATA_PATH, encoded))
    if scratch_space:
        files.append(WriteFile(SCRATCH_PATH))
    return cloudconfig.render(files)
