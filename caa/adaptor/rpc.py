"""ttrpc bindings: hypervisor.Hypervisor and podvminfo.PodVMInfo handlers over a CloudService."""

from __future__ import annotations

from twisted.logger import Logger

from caa.adaptor import metrics
from caa.adaptor.service import CloudService
from caa.proto import hypervisor_pb2, podvminfo_pb2
from caa.ttrpc import CallContext, Code, Server, TTRPCError

HYPERVISOR = "hypervisor.Hypervisor"
PODVMINFO = "podvminfo.PodVMInfo"


class HypervisorHandlers:
    """Decode requests, call the service, count errors by method and code."""

    _log = Logger()

    def __init__(self, service: CloudService) -> None:
        self.service = service

    def _failed(self, method: str, e: BaseException) -> None:
        code = e.code if isinstance(e, TTRPCError) else Code.UNKNOWN
        metrics.RPC_ERRORS.labels(method=method, code=Code(code).name).inc()
        self._log.info("{method} failed: {error}", method=method, error=str(e))

    async def create_vm(self, ctx: CallContext, req: hypervisor_pb2.CreateVMRequest
                        ) -> hypervisor_pb2.CreateVMResponse:
        try:
            path = await self.service.create_vm(req.id, dict(req.annotations), req.networkNamespacePath)
        except Exception as e:
            self._failed("CreateVM", e)
            raise
        return hypervisor_pb2.CreateVMResponse(agentSocketPath=path)

    async def start_vm(self, ctx: CallContext, req: hypervisor_pb2.StartVMRequest) -> hypervisor_pb2.StartVMResponse:
        try:
            await self.service.start_vm(req.id, ctx.deadline)
        except Exception as e:
            self._failed("StartVM", e)
            raise
        return hypervisor_pb2.StartVMResponse()

    async def stop_vm(self, ctx: CallContext, req: hypervisor_pb2.StopVMRequest) -> hypervisor_pb2.StopVMResponse:
        try:
            await self.service.stop_vm(req.id)
        except Exception as e:
            self._failed("StopVM", e)
            raise
        return hypervisor_pb2.StopVMResponse()

    async def version(self, ctx: CallContext, req: hypervisor_pb2.VersionRequest) -> hypervisor_pb2.VersionResponse:
        return hypervisor_pb2.VersionResponse(version=self.service.version())

    async def get_info(self, ctx: CallContext, req: podvminfo_pb2.GetInfoRequest) -> podvminfo_pb2.GetInfoResponse:
        vmid = await self.service.get_info(req.PodName, req.PodNamespace, req.Wait)
        return podvminfo_pb2.GetInfoResponse(VMID=vmid)

    def register(self, server: Server) -> None:
        server.register(HYPERVISOR, {
            "CreateVM": (hypervisor_pb2.CreateVMRequest, self.create_vm),
            "StartVM": (hypervisor_pb2.StartVMRequest, self.start_vm),
            "StopVM": (hypervisor_pb2.StopVMRequest, self.stop_vm),
            "Version": (hypervisor_pb2.VersionRequest, self.version),
        })
        server.register(PODVMINFO, {"GetInfo": (podvminfo_pb2.GetInfoRequest, self.get_info)})
