"""Network namespaces without fork: per-thread ``setns(2)`` through libc.

pyroute2 enters a namespace by forking a child that creates the socket; a fork of a Twisted
process can run the parent's signal handlers and write to its descriptors (trial's worker pipes
got corrupted that way). Here the calling thread itself switches namespace for the moment it
opens a socket, then switches back: ``setns`` with ``CLONE_NEWNET`` affects the calling thread
only, and a netlink socket stays in the namespace it was created in.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC = 16384
MS_SHARED = 1 << 20
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


@contextmanager
def entered(path: str) -> Iterator[None]:
    """Run the body with the calling thread in the netns at ``path`` (restored afterwards)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _check(_libc.setns(target, CLONE_NEWNET), f"setns {path}")
        finally:
            os.close(target)
        try:
            yield
        finally:
            _check(_libc.setns(own, CLONE_NEWNET), "setns back to the original netns")
    finally:
        os.close(own)


def create(path: str) -> None:
    """Create a persistent netns bound at ``path`` (like ``ip netns add``), from a throw-away thread."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    if _libc.mount(b"", directory.encode(), b"none", MS_SHARED | MS_REC, None) != 0:
        _libc.mount(directory.encode(), directory.encode(), b"none", MS_BIND | MS_REC, None)
        _libc.mount(b"", directory.encode(), b"none", MS_SHARED | MS_REC, None)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    errors: list[BaseException] = []

    def body() -> None:
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            _check(_libc.mount(b"/proc/thread-self/ns/net", path.encode(), b"none", MS_BIND, None),
                   f"bind-mount netns on {path}")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=body, name="netns-create")
    t.start()
    t.join()
    if errors:
        try:
            os.unlink(path)
        except OSError:
            pass
        raise errors[0]


def remove(path: str) -> None:
    """Unmount and delete a netns created by :func:`create` (or ``ip netns add``)."""
    _libc.umount2(path.encode(), MNT_DETACH)
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
