"""`caa.adaptor.v1.Admin`: caa's read-only operator service on the hypervisor socket (protos/admin.proto).

`caactl list` asks the running adaptor which sandboxes it has, instead of reading a journal directory that
may not be the adaptor's. The handler only reads; it takes the records from a callable so it does not
depend on how the daemon keeps them (journal or memory).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from caa.adaptor.interfaces import SandboxRecord
from caa.proto import admin_pb2
from caa.ttrpc import CallContext, Server

ADMIN_SERVICE = "caa.adaptor.v1.Admin"

ListRecords = Callable[[], Iterable[SandboxRecord]]


def sandbox_message(record: SandboxRecord) -> admin_pb2.Sandbox:
    """One record as the wire message: identity, where its VM is, its journal state and age."""
    created = Timestamp()
    created.FromNanoseconds(int(record.created * 1e9))
    return admin_pb2.Sandbox(
        id=record.sandbox_id,
        pod_name=record.pod_name,
        pod_namespace=record.pod_namespace,
        instance_id=record.instance_id,
        vm_ips=list(record.ips),
        state=record.state.value,
        created=created,
        error=record.error,
    )


def list_sandboxes_response(records: Iterable[SandboxRecord]) -> admin_pb2.ListSandboxesResponse:
    """The records, oldest first (ties by id), as a ListSandboxes answer."""
    ordered = sorted(records, key=lambda r: (r.created, r.sandbox_id))
    return admin_pb2.ListSandboxesResponse(sandboxes=[sandbox_message(r) for r in ordered])


def register_admin(server: Server, list_records: ListRecords) -> None:
    """Serve `caa.adaptor.v1.Admin` on `server`, answering from `list_records()` at each call."""

    async def list_sandboxes(
        ctx: CallContext, request: admin_pb2.ListSandboxesRequest
    ) -> admin_pb2.ListSandboxesResponse:
        return list_sandboxes_response(list_records())

    server.register(ADMIN_SERVICE, {"ListSandboxes": (admin_pb2.ListSandboxesRequest, list_sandboxes)})


__all__ = ["ADMIN_SERVICE", "ListRecords", "list_sandboxes_response", "register_admin", "sandbox_message"]
