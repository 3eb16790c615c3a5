"""The unclaimed forwarder of a warm-pool VM: accepts exactly one `caa.podvm.v1.PodVM/Claim`, refuses
every agent call before it, then hands the pod's configuration to the forwarder (pod network, the pod's
TLS certificate) and lets the relay through.

Only a client presenting the adaptor's certificate reaches this at all (the listener requires it, mutual
TLS). A Claim is refused when the VM was claimed already (or a claim is under way), when it names another
VM, when its token does not hash to the bootstrap digest, when its apf.json is unusable or its initdata
digest is not the one this VM booted with. A refused claim changes nothing; a claim that fails half way
(the pod network cannot be built) leaves the VM refusing everything: the adaptor deletes it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from caa.forwarder.initdata import write_file
from caa.podvm_api import claim as claim_format
from caa.podvm_api.apf import APFConfig, APFError
from caa.proto import podvm_pb2
from caa.ttrpc import CallContext, Code, RawHandler, Server, TTRPCError

__all__ = ["ClaimState", "ClaimGate", "OnClaim"]

#: (the pod's apf.json, its server TLS options) -> set up the pod network and switch certificates
OnClaim = Callable[[APFConfig, Any], Awaitable[None]]


class ClaimState(enum.Enum):
    UNCLAIMED = "unclaimed"
    CLAIMING = "claiming"
    CLAIMED = "claimed"
    FAILED = "failed"


class ClaimGate:
    _log = Logger()

    def __init__(self, bootstrap: APFConfig, relay: RawHandler, on_claim: OnClaim, peerpod_dir: str,
                 build_tls: Callable[[APFConfig], Any]) -> None:
        if not claim_format.is_bootstrap(bootstrap) or not bootstrap.pool_vm_name:
            raise ValueError("a claim gate needs a bootstrap apf.json (caa-pool-vm and caa-claim-token-sha256)")
        self._bootstrap = bootstrap
        self._relay = relay
        self._on_claim = on_claim
        self._dir = Path(peerpod_dir)
        self._build_tls = build_tls
        self.state = ClaimState.UNCLAIMED

    @property
    def vm_name(self) -> str:
        return self._bootstrap.pool_vm_name

    def register(self, server: Server) -> None:
        server.register(claim_format.SERVICE, {claim_format.METHOD: (podvm_pb2.ClaimRequest, self.claim)})
        server.register_fallback(self.relay)

    def booted_initdata_digest(self) -> str:
        """The digest caa-process-user-data wrote at boot (empty when the VM booted without initdata)."""
        try:
            return (self._dir / "initdata.digest").read_text().strip()
        except FileNotFoundError:
            return ""

    def _refuse(self, code: Code, why: str) -> TTRPCError:
        self._log.warn("claim of pool VM {vm} refused: {why}", vm=self.vm_name, why=why)
        return TTRPCError(code, why)

    async def claim(self, ctx: CallContext, req: podvm_pb2.ClaimRequest) -> podvm_pb2.ClaimResponse:
        if self.state is not ClaimState.UNCLAIMED:
            raise self._refuse(Code.FAILED_PRECONDITION, f"pod VM {self.vm_name} is {self.state.value}: "
                               "a pool VM is claimed once")
        if req.vm_name != self.vm_name:
            raise self._refuse(Code.PERMISSION_DENIED, f"claim for VM {req.vm_name!r} sent to {self.vm_name!r}")
        if not claim_format.token_matches(req.token, self._bootstrap.claim_token_sha256):
            raise self._refuse(Code.PERMISSION_DENIED, "wrong claim token")
        try:
            pod = APFConfig.from_json(req.apf_json)
        except APFError as e:
            raise self._refuse(Code.INVALID_ARGUMENT, f"claim apf.json: {e}") from None
        if not pod.tls_server_cert or not pod.tls_server_key:
            raise self._refuse(Code.INVALID_ARGUMENT, "claim apf.json has no tls-server-cert/tls-server-key")
        if claim_format.is_bootstrap(pod):
            raise self._refuse(Code.INVALID_ARGUMENT, "claim apf.json is a bootstrap apf.json")
        booted = self.booted_initdata_digest()
        if req.initdata_digest != booted:
            raise self._refuse(Code.FAILED_PRECONDITION, f"initdata digest {req.initdata_digest!r} is not the "
                               f"one this VM booted with ({booted!r})")
        try:
            options = self._build_tls(pod)
        except Exception as e:
            raise self._refuse(Code.INVALID_ARGUMENT, f"claim TLS material: {e}") from None
        self.state = ClaimState.CLAIMING
        self._log.info("pool VM {vm} claimed for pod {ns}/{pod}", vm=self.vm_name, ns=pod.pod_namespace,
                       pod=pod.pod_name)
        try:
            if req.auth_json:
                write_file(self._dir / "auth.json", req.auth_json.encode("utf-8"), 0o600)
            await self._on_claim(pod, options)
        except BaseException as e:
            self.state = ClaimState.FAILED
            self._log.error("claim of pool VM {vm} failed: {error}", vm=self.vm_name, error=str(e))
            raise TTRPCError(Code.INTERNAL, f"claim failed: {e}") from None
        self.state = ClaimState.CLAIMED
        return podvm_pb2.ClaimResponse(initdata_digest=booted)

    async def relay(self, ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
        if self.state is not ClaimState.CLAIMED:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"pod VM {self.vm_name} is {self.state.value}: {service}/{method} refused before "
                             "the claim")
        return await self._relay(ctx, service, method, payload)
