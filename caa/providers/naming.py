"""Instance naming shared by every provider (spec-providers §1.5): `podvm-<pod>-<sid8>`."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^a-z0-9-]")

MAX_NAME_LENGTH = 63


def sanitize(value: str) -> str:
    """Lower-case `value` and replace every character outside [a-z0-9-] with '-'."""
    return _UNSAFE.sub("-", value.lower())


def instance_name(pod_name: str, sandbox_id: str, max_length: int = MAX_NAME_LENGTH) -> str:
    """
    `podvm-<pod>-<first 8 of sid>`, both parts sanitised; the pod part is cut so the whole name fits in
    `max_length` (63 for most clouds). Raises ValueError when `max_length` < 15 (no room for a pod part).
    """
    if max_length < 15:
        raise ValueError(f"instance name limit {max_length} is below 15")
    pod = sanitize(pod_name)
    sid8 = sanitize(sandbox_id)[:8]
    if 5 + len(pod) + 10 > max_length:
        pod = pod[: max_length - 15]
    return f"podvm-{pod}-{sid8}"
