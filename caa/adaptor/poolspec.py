"""`--pools` / `POOLS`: warm pools per key, each with a min and a max (not upstream; see docs/configuration.md).

One entry per pool key, entries separated by `;`, fields by `,`:

    min=1,max=4                                  pods without size or image annotations
    min=0,max=2,instance-type=t3.large           pods annotated with that machine type
    min=2,max=2,vcpus=4,memory=8192,image=ami-0a pods annotated with those vCPUs, memory (MiB) and image

`min` pool VMs of the key are kept booted (creating or ready) at all times; each miss for the key grows its
pool by one, up to `max`; each idle VM recycled at its TTL shrinks it by one, down to `min`. All keys use the
adaptor's `--initdata` (a VM's initdata is fixed at its creation). `--pool-size N` is `min=N,max=N` for the
default key.
"""

from __future__ import annotations

import attrs

__all__ = ["PoolEntry", "PoolSize", "PoolSpecError", "parse_pools"]

_FIELDS = ("min", "max", "instance-type", "vcpus", "memory", "image")


class PoolSpecError(ValueError):
    """A bad --pools value; the message names the entry and what is wrong with it."""


@attrs.frozen
class PoolSize:
    """How many pool VMs of one key: `min` always booted, at most `max` (grown by misses)."""

    min: int
    max: int

    def __attrs_post_init__(self) -> None:
        if self.min < 0:
            raise PoolSpecError(f"min must be 0 or more, got {self.min}")
        if self.max < self.min:
            raise PoolSpecError(f"max ({self.max}) must be at least min ({self.min})")


@attrs.frozen
class PoolEntry:
    """One parsed entry: the pod spec fields its key matches (empty/0: the adaptor's default) and its size."""

    size: PoolSize
    instance_type: str = ""
    vcpus: int = 0
    memory_mib: int = 0
    image: str = ""


def _count(entry: str, field: str, value: str) -> int:
    try:
        n = int(value, 10)
    except ValueError:
        raise PoolSpecError(f"pool {entry!r}: {field}={value!r} is not a whole number") from None
    if n < 0:
        raise PoolSpecError(f"pool {entry!r}: {field}={value!r} must be 0 or more")
    return n


def _entry(text: str) -> PoolEntry:
    fields: dict[str, str] = {}
    for part in text.split(","):
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name:
            raise PoolSpecError(f"pool {text!r}: {part.strip()!r} is not name=value")
        if name not in _FIELDS:
            raise PoolSpecError(f"pool {text!r}: unknown field {name!r} (known: {', '.join(_FIELDS)})")
        if name in fields:
            raise PoolSpecError(f"pool {text!r}: {name} given twice")
        fields[name] = value
    for required in ("min", "max"):
        if required not in fields:
            raise PoolSpecError(f"pool {text!r}: {required}= is required")
    low, high = _count(text, "min", fields["min"]), _count(text, "max", fields["max"])
    try:
        size = PoolSize(low, high)
    except PoolSpecError as e:
        raise PoolSpecError(f"pool {text!r}: {e}") from None
    return PoolEntry(size, instance_type=fields.get("instance-type", ""),
                     vcpus=_count(text, "vcpus", fields.get("vcpus", "0")),
                     memory_mib=_count(text, "memory", fields.get("memory", "0")), image=fields.get("image", ""))


def parse_pools(text: str, pool_size: int = 0) -> list[PoolEntry]:
    """The entries of a --pools value, plus `--pool-size`'s default-key entry when it is set; a key given
    twice is an error (so is --pool-size with a default-key entry)."""
    if pool_size < 0:
        raise PoolSpecError(f"--pool-size must be 0 or more, got {pool_size}")
    entries = [_entry(part.strip()) for part in text.split(";") if part.strip()]
    if pool_size:
        entries.append(PoolEntry(PoolSize(pool_size, pool_size)))
    seen: dict[tuple[str, int, int, str], str] = {}
    for e in entries:
        key = (e.instance_type, e.vcpus, e.memory_mib, e.image)
        what = ",".join(f"{k}={v}" for k, v in zip(("instance-type", "vcpus", "memory", "image"), key,
                                                         strict=True) if v) or "the default key"
        if key in seen:
            raise PoolSpecError(f"pools: {what} is configured twice (--pools entries and --pool-size)")
        seen[key] = what
    return entries

