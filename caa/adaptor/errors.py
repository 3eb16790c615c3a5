"""The hypervisor service's own errors: a kind (what went wrong, for the caller) and a message (for the pod's
events). Only caa/adaptor/rpc.py turns them into ttrpc status codes; the service never sees the wire.

A failure that comes from a provider keeps the provider's `ErrorKind` as its kind, so the mapping of cloud
failures to codes lives in one place too.
"""

from __future__ import annotations

import enum
import re

from caa.providers.interfaces import ErrorKind


class Fault(enum.Enum):
    """Kinds of service failures that are not a provider's."""

    INVALID_ARGUMENT = "invalid-argument"  # a bad request: id, annotations
    NOT_FOUND = "not-found"  # no such sandbox (or it is being stopped)
    ALREADY_EXISTS = "already-exists"  # CreateVM of a known id
    PRECONDITION = "precondition"  # the node is not as the request needs (pod netns unreadable)
    INTERNAL = "internal"  # our own step failed (TLS issue, tunnel setup)
    UNAVAILABLE = "unavailable"  # the VM is not reachable (no IP)
    DEADLINE = "deadline"  # the request was cancelled or ran out of time


class SandboxError(Exception):
    """A failed hypervisor call: `kind` (a `Fault` or a provider's `ErrorKind`) and a message."""

    def __init__(self, kind: Fault | ErrorKind, message: str) -> None:
        super().__init__(kind, message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"SandboxError({self.kind.name}, {self.message!r})"


# Kata's rule for container and sandbox ids (katautils.VerifyContainerID); it also keeps "/", "." and ".." out
# of the pod directory's name.
SANDBOX_ID_PATTERN = "^[a-zA-Z0-9][a-zA-Z0-9_.-]+$"
_ID_RE = re.compile(SANDBOX_ID_PATTERN[1:-1])  # used with fullmatch (no "$" newline loophole)
# containerd's identifier limit (pkg/identifiers: maxLength 76): containerd never hands out a longer id, and
# <pods-dir>/<id>/agent.ttrpc must fit a unix socket path (108 bytes) with the default /run/peerpod/pods.
SANDBOX_ID_MAX = 76


def check_sandbox_id(sandbox_id: str) -> None:
    """Raise SandboxError(INVALID_ARGUMENT) unless sandbox_id is a valid sandbox id (see the patterns above)."""
    if not sandbox_id:
        raise SandboxError(Fault.INVALID_ARGUMENT, "empty sandbox id")
    if len(sandbox_id) > SANDBOX_ID_MAX:
        raise SandboxError(Fault.INVALID_ARGUMENT, f"invalid sandbox id {sandbox_id[:16]!r}... (length "
                           f"{len(sandbox_id)}): greater than maximum length ({SANDBOX_ID_MAX} characters)")
    if not _ID_RE.fullmatch(sandbox_id):
        raise SandboxError(Fault.INVALID_ARGUMENT,
                           f"invalid sandbox id {sandbox_id!r} (should match {SANDBOX_ID_PATTERN})")
