"""Pod VM names: `podvm-<pod>-<first 8 of sandbox id>` (spec-providers §1.5), always a valid DNS label.

The name is the cloud instance name, the per-VM certificate's DNS name and the TLS server name the adaptor
dials, so it must be an RFC 1123 label: lower-case letters, digits and '-', at most 63 characters, no '-'
at either end. Upstream's rule is kept exactly wherever it already gives such a label (the e2e suite
rebuilds names from the log); where it does not (an id whose 8th character is '-', an empty id), the
trailing hyphens are dropped.
"""

from __future__ import annotations

import re

__all__ = ["MAX_NAME_LENGTH", "instance_name", "is_dns_label", "sanitize"]

MAX_NAME_LENGTH = 63
#: "podvm-" + "-" + 8 characters of sandbox id: the room left for the pod part is the limit minus this.
_FIXED = 15

_UNSAFE = re.compile(r"[^a-z0-9-]")
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def sanitize(value: str) -> str:
    """Lower-case `value` and replace every character outside [a-z0-9-] with '-'."""
    return _UNSAFE.sub("-", value.lower())


def is_dns_label(name: str) -> bool:
    """True when `name` is an RFC 1123 label: [a-z0-9-], 1 to 63 characters, no '-' at either end."""
    return _LABEL.fullmatch(name) is not None


def instance_name(pod_name: str, sandbox_id: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """`podvm-<pod>-<sid8>`, both parts sanitised, the pod part cut so the name fits in `max_length`
    (63 for most clouds, 47 for ibmcloud-powervs; never more than 63, a label's limit). Raises ValueError
    when `max_length` < 15."""
    if max_length < _FIXED:
        raise ValueError(f"instance name limit {max_length} is below {_FIXED}")
    limit = min(max_length, MAX_NAME_LENGTH)
    pod = sanitize(pod_name)
    sid8 = sanitize(sandbox_id)[:8]
    if len(pod) + _FIXED > limit:
        pod = pod[: limit - _FIXED]
    # "podvm" starts the name, so only its end can be a hyphen (bug: a name ending in '-' failed at StartVM).
    return f"podvm-{pod}-{sid8}".rstrip("-")
