"""`caa.adaptor.v1.Admin`: caa's operator service on the hypervisor socket (protos/admin.proto).

`caactl list` asks the running adaptor which sandboxes it has, instead of reading a journal directory that
may not be the adaptor's; that handler only reads, taking the records from a callable so it does not depend
on how the daemon keeps them (journal or memory). `HandOver` is the rolling update's call: a newer adaptor
asks the one serving the socket to stop managing sandboxes before it takes the path over
(`request_hand_over` is the caller's side).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.internet.defer import Deferred

from caa.adaptor.interfaces import SandboxRecord
from caa.proto import admin_pb2
from caa.reactors import INodeReactor
from caa.ttrpc import CallContext, Handler, Server, connect
from caa.ttrpc.endpoints import unix_client_endpoint

ADMIN_SERVICE = "caa.adaptor.v1.Admin"

ListRecords = Callable[[], Iterable[SandboxRecord]]
#: The daemon's side of HandOver: given who asks, fires with the sandbox ids once nothing of ours is under way.
HandOver = Callable[[str], Deferred[list[str]]]
#: The caller's side (reactor, socket path, successor, timeout); `request_hand_over` is the real one.
HandOverCall = Callable[[INodeReactor, str, str, float], "Deferred[admin_pb2.HandOverResponse]"]


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


def register_admin(server: Server, list_records: ListRecords, hand_over: HandOver | None = None) -> None:
    """Serve `caa.adaptor.v1.Admin` on `server`: ListSandboxes from `list_records()` at each call, HandOver
    through `hand_over` (without it, HandOver is UNIMPLEMENTED, as on adaptors that predate it)."""

    async def list_sandboxes(
        ctx: CallContext, request: admin_pb2.ListSandboxesRequest
    ) -> admin_pb2.ListSandboxesResponse:
        return list_sandboxes_response(list_records())

    methods: dict[str, tuple[type[Message], Handler]] = {
        "ListSandboxes": (admin_pb2.ListSandboxesRequest, list_sandboxes)}
    if hand_over is not None:
        take = hand_over

        async def handing_over(ctx: CallContext, request: admin_pb2.HandOverRequest) -> admin_pb2.HandOverResponse:
            ids = await take(request.successor or "a newer adaptor")
            return admin_pb2.HandOverResponse(sandbox_ids=ids, pid=os.getpid())

        methods["HandOver"] = (admin_pb2.HandOverRequest, handing_over)
    server.register(ADMIN_SERVICE, methods)


def request_hand_over(reactor: INodeReactor, path: str, successor: str,
                      timeout: float) -> Deferred[admin_pb2.HandOverResponse]:
    """Ask the adaptor serving the unix socket `path` to hand over (HandOver, deadline `timeout` seconds)."""
    return Deferred.fromCoroutine(_request_hand_over(reactor, path, successor, timeout))


async def _request_hand_over(reactor: INodeReactor, path: str, successor: str,
                             timeout: float) -> admin_pb2.HandOverResponse:
    client = await connect(unix_client_endpoint(reactor, path, timeout=5), clock=reactor, name="hand-over")
    try:
        return await client.call(ADMIN_SERVICE, "HandOver", admin_pb2.HandOverRequest(successor=successor),
                                 admin_pb2.HandOverResponse, timeout=timeout)
    finally:
        client.close()


__all__ = ["ADMIN_SERVICE", "HandOver", "HandOverCall", "ListRecords", "list_sandboxes_response",
           "register_admin", "request_hand_over", "sandbox_message"]
