"""ttrpc bindings: hypervisor.Hypervisor and podvminfo.PodVMInfo handlers over a CloudService.

The one place where the service's failures become ttrpc statuses: `SandboxError` kinds (and the provider
`ErrorKind`s they carry) map to gRPC codes here; the message is passed on unchanged.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from twisted.logger import Logger

from caa.adaptor import metrics
from caa.adaptor.errors import Fault, SandboxError
from caa.adaptor.service import CloudService
from caa.proto import hypervisor_pb2, podvminfo_pb2
from caa.providers.interfaces import ErrorKind
from caa.ttrpc import CallContext, Code, Server, TTRPCError

T = TypeVar("T")

HYPERVISOR = "hypervisor.Hypervisor"
PODVMINFO = "podvminfo.PodVMInfo"

CODES: dict[Fault | ErrorKind, Code] = {
    Fault.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
    Fault.NOT_FOUND: Code.NOT_FOUND,
    Fault.ALREADY_EXISTS: Code.ALREADY_EXISTS,
    Fault.PRECONDITION: Code.FAILED_PRECONDITION,
    Fault.INTERNAL: Code.INTERNAL,
    Fault.UNAVAILABLE: Code.UNAVAILABLE,
    Fault.DEADLINE: Code.DEADLINE_EXCEEDED,
    ErrorKind.NOT_FOUND: Code.NOT_FOUND,
    ErrorKind.QUOTA: Code.RESOURCE_EXHAUSTED,
    ErrorKind.INVALID_CONFIG: Code.INVALID_ARGUMENT,
    ErrorKind.TRANSIENT: Code.UNAVAILABLE,
}


def to_ttrpc(e: BaseException) -> BaseException:
    """The error a handler raises for e: a TTRPCError for a SandboxError, anything else unchanged (the ttrpc
    server answers TTRPCErrors with their code, other exceptions with UNKNOWN)."""
    if isinstance(e, SandboxError):
        return TTRPCError(CODES.get(e.kind, Code.UNKNOWN), e.message)
    return e


class HypervisorHandlers:
    """Decode requests, call the service, count errors by method and code."""

    _log = Logger()

    def __init__(self, service: CloudService) -> None:
        self.service = service

    async def _call(self, method: str, call: Awaitable[T]) -> T:
        try:
            return await call
        except Exception as e:
            err = to_ttrpc(e)
            code = err.code if isinstance(err, TTRPCError) else Code.UNKNOWN
            metrics.RPC_ERRORS.labels(method=method, code=Code(code).name).inc()
            self._log.info("{method} failed: {error}", method=method, error=str(e))
            if err is e:
                raise
            raise err from e

    async def create_vm(self, ctx: CallContext, req: hypervisor_pb2.CreateVMRequest
                        ) -> hypervisor_pb2.CreateVMResponse:
        path = await self._call("CreateVM", self.service.create_vm(req.id, dict(req.annotations),
                                                                   req.networkNamespacePath))
        return hypervisor_pb2.CreateVMResponse(agentSocketPath=path)

    async def start_vm(self, ctx: CallContext, req: hypervisor_pb2.StartVMRequest) -> hypervisor_pb2.StartVMResponse:
        await self._call("StartVM", self.service.start_vm(req.id, ctx.deadline))
        return hypervisor_pb2.StartVMResponse()

    async def stop_vm(self, ctx: CallContext, req: hypervisor_pb2.StopVMRequest) -> hypervisor_pb2.StopVMResponse:
        await self._call("StopVM", self.service.stop_vm(req.id))
        return hypervisor_pb2.StopVMResponse()

    async def version(self, ctx: CallContext, req: hypervisor_pb2.VersionRequest) -> hypervisor_pb2.VersionResponse:
        return hypervisor_pb2.VersionResponse(version=self.service.version())

    async def get_info(self, ctx: CallContext, req: podvminfo_pb2.GetInfoRequest) -> podvminfo_pb2.GetInfoResponse:
        vmid = await self._call("GetInfo", self.service.get_info(req.PodName, req.PodNamespace, req.Wait))
        return podvminfo_pb2.GetInfoResponse(VMID=vmid)

    def register(self, server: Server) -> None:
        server.register(HYPERVISOR, {
            "CreateVM": (hypervisor_pb2.CreateVMRequest, self.create_vm),
            "StartVM": (hypervisor_pb2.StartVMRequest, self.start_vm),
            "StopVM": (hypervisor_pb2.StopVMRequest, self.stop_vm),
            "Version": (hypervisor_pb2.VersionRequest, self.version),
        })
        server.register(PODVMINFO, {"GetInfo": (podvminfo_pb2.GetInfoRequest, self.get_info)})
