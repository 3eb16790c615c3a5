"""The generated protobuf modules in caa/proto: up to date with protos/, and wire numbers as the spec says."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from types import ModuleType

from google.protobuf.descriptor import FieldDescriptor
from twisted.trial.unittest import SynchronousTestCase

from caa.proto import (
    admin_pb2,
    agent_pb2,
    csi_pb2,
    health_pb2,
    hypervisor_pb2,
    oci_pb2,
    podvm_pb2,
    podvminfo_pb2,
    ttrpc_pb2,
    types_pb2,
)

ROOT = Path(__file__).resolve().parent.parent

# spec-adaptor §3.1: every RPC of grpc.AgentService at the pinned kata commit, request -> response.
AGENT_RPCS: dict[str, tuple[str, str]] = {
    "CreateContainer": ("CreateContainerRequest", "Empty"),
    "StartContainer": ("StartContainerRequest", "Empty"),
    "RemoveContainer": ("RemoveContainerRequest", "Empty"),
    "ExecProcess": ("ExecProcessRequest", "Empty"),
    "SignalProcess": ("SignalProcessRequest", "Empty"),
    "WaitProcess": ("WaitProcessRequest", "WaitProcessResponse"),
    "UpdateContainer": ("UpdateContainerRequest", "Empty"),
    "UpdateEphemeralMounts": ("UpdateEphemeralMountsRequest", "Empty"),
    "StatsContainer": ("StatsContainerRequest", "StatsContainerResponse"),
    "PauseContainer": ("PauseContainerRequest", "Empty"),
    "ResumeContainer": ("ResumeContainerRequest", "Empty"),
    "RemoveStaleVirtiofsShareMounts": ("RemoveStaleVirtiofsShareMountsRequest", "Empty"),
    "GetDiagnosticData": ("GetDiagnosticDataRequest", "GetDiagnosticDataResponse"),
    "WriteStdin": ("WriteStreamRequest", "WriteStreamResponse"),
    "ReadStdout": ("ReadStreamRequest", "ReadStreamResponse"),
    "ReadStderr": ("ReadStreamRequest", "ReadStreamResponse"),
    "CloseStdin": ("CloseStdinRequest", "Empty"),
    "TtyWinResize": ("TtyWinResizeRequest", "Empty"),
    "UpdateInterface": ("UpdateInterfaceRequest", "Interface"),
    "UpdateRoutes": ("UpdateRoutesRequest", "Routes"),
    "ListInterfaces": ("ListInterfacesRequest", "Interfaces"),
    "ListRoutes": ("ListRoutesRequest", "Routes"),
    "AddARPNeighbors": ("AddARPNeighborsRequest", "Empty"),
    "GetIPTables": ("GetIPTablesRequest", "GetIPTablesResponse"),
    "SetIPTables": ("SetIPTablesRequest", "SetIPTablesResponse"),
    "GetMetrics": ("GetMetricsRequest", "Metrics"),
    "MemAgentMemcgSet": ("MemAgentMemcgConfig", "Empty"),
    "MemAgentCompactSet": ("MemAgentCompactConfig", "Empty"),
    "CreateSandbox": ("CreateSandboxRequest", "Empty"),
    "DestroySandbox": ("DestroySandboxRequest", "Empty"),
    "OnlineCPUMem": ("OnlineCPUMemRequest", "Empty"),
    "ReseedRandomDev": ("ReseedRandomDevRequest", "Empty"),
    "GetGuestDetails": ("GuestDetailsRequest", "GuestDetailsResponse"),
    "MemHotplugByProbe": ("MemHotplugByProbeRequest", "Empty"),
    "SetGuestDateTime": ("SetGuestDateTimeRequest", "Empty"),
    "CopyFile": ("CopyFileRequest", "Empty"),
    "GetOOMEvent": ("GetOOMEventRequest", "OOMEvent"),
    "AddSwap": ("AddSwapRequest", "Empty"),
    "AddSwapPath": ("AddSwapPathRequest", "Empty"),
    "GetVolumeStats": ("VolumeStatsRequest", "VolumeStatsResponse"),
    "ResizeVolume": ("ResizeVolumeRequest", "Empty"),
    "SetPolicy": ("SetPolicyRequest", "Empty"),
}


def _load_genprotos() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_genprotos", ROOT / "scripts" / "genprotos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fields(message: type) -> dict[str, tuple[int, int]]:
    """name -> (number, type) of a generated message class."""
    return {f.name: (f.number, f.type) for f in message.DESCRIPTOR.fields}  # type: ignore[attr-defined]


S = FieldDescriptor.TYPE_STRING
B = FieldDescriptor.TYPE_BOOL
M = FieldDescriptor.TYPE_MESSAGE
BY = FieldDescriptor.TYPE_BYTES


class GeneratedUpToDateTests(SynchronousTestCase):
    def test_regenerating_gives_identical_files(self) -> None:
        """`make protos` output committed in caa/proto is byte-identical to a fresh generation (stale check)."""
        gen = _load_genprotos()
        committed = ROOT / "caa" / "proto"
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            gen.generate(out)
            fresh = {p.relative_to(out): p.read_bytes() for p in out.rglob("*_pb2.py*")}
        self.assertTrue(fresh)
        old = {p.relative_to(committed): p.read_bytes() for p in committed.rglob("*_pb2.py*")}
        self.assertEqual(sorted(map(str, fresh)), sorted(map(str, old)), "run `make protos` and commit caa/proto")
        stale = sorted(str(name) for name, data in fresh.items() if old[name] != data)
        self.assertEqual(stale, [], "stale generated files: run `make protos` and commit caa/proto")

    def test_every_proto_has_a_module(self) -> None:
        names = {p.stem for p in (ROOT / "protos").rglob("*.proto")}
        self.assertEqual(
            names, {"ttrpc", "status", "hypervisor", "podvminfo", "agent", "health", "oci", "types", "csi", "admin",
                    "podvm"}
        )

    def test_imports_are_rewritten_into_caa_proto(self) -> None:
        text = (ROOT / "caa" / "proto" / "agent_pb2.py").read_text()
        self.assertIn("from caa.proto import oci_pb2", text)
        self.assertNotIn("\nimport oci_pb2", text)
        self.assertIn("from caa.proto.google.rpc import status_pb2", (ROOT / "caa/proto/ttrpc_pb2.py").read_text())


class WireNumberTests(SynchronousTestCase):
    def test_ttrpc_envelope(self) -> None:
        self.assertEqual(ttrpc_pb2.DESCRIPTOR.package, "ttrpc")
        self.assertEqual(
            _fields(ttrpc_pb2.Request),
            {
                "service": (1, S),
                "method": (2, S),
                "payload": (3, BY),
                "timeout_nano": (4, FieldDescriptor.TYPE_INT64),
                "metadata": (5, M),
            },
        )
        self.assertEqual(_fields(ttrpc_pb2.Response), {"status": (1, M), "payload": (2, BY)})
        self.assertEqual(_fields(ttrpc_pb2.KeyValue), {"key": (1, S), "value": (2, S)})
        self.assertEqual(_fields(ttrpc_pb2.StringList), {"list": (1, S)})

    def test_hypervisor(self) -> None:
        self.assertEqual(hypervisor_pb2.DESCRIPTOR.package, "hypervisor")
        service = hypervisor_pb2.DESCRIPTOR.services_by_name["Hypervisor"]
        self.assertEqual(service.full_name, "hypervisor.Hypervisor")
        self.assertEqual(
            {m.name: (m.input_type.name, m.output_type.name) for m in service.methods},
            {
                "CreateVM": ("CreateVMRequest", "CreateVMResponse"),
                "StartVM": ("StartVMRequest", "StartVMResponse"),
                "StopVM": ("StopVMRequest", "StopVMResponse"),
                "Version": ("VersionRequest", "VersionResponse"),
            },
        )
        self.assertEqual(
            _fields(hypervisor_pb2.CreateVMRequest),
            {"id": (1, S), "annotations": (2, M), "networkNamespacePath": (3, S)},
        )
        self.assertEqual(_fields(hypervisor_pb2.CreateVMResponse), {"agentSocketPath": (1, S)})
        self.assertEqual(_fields(hypervisor_pb2.StartVMRequest), {"id": (1, S)})
        self.assertEqual(_fields(hypervisor_pb2.StartVMResponse), {})
        self.assertEqual(_fields(hypervisor_pb2.StopVMRequest), {"id": (1, S)})
        self.assertEqual(_fields(hypervisor_pb2.StopVMResponse), {})
        self.assertEqual(_fields(hypervisor_pb2.VersionRequest), {"version": (1, S)})
        self.assertEqual(_fields(hypervisor_pb2.VersionResponse), {"version": (1, S)})

    def test_create_vm_annotations_are_a_string_map_on_the_wire(self) -> None:
        """map<string,string> = repeated entry {key=1, value=2}: bytes match a hand-encoded request."""
        req = hypervisor_pb2.CreateVMRequest(id="s", annotations={"k": "v"}, networkNamespacePath="/n")
        self.assertEqual(req.SerializeToString(), b"\n\x01s" + b"\x12\x06\n\x01k\x12\x01v" + b"\x1a\x02/n")

    def test_podvminfo(self) -> None:
        self.assertEqual(podvminfo_pb2.DESCRIPTOR.package, "podvminfo")
        service = podvminfo_pb2.DESCRIPTOR.services_by_name["PodVMInfo"]
        self.assertEqual(service.full_name, "podvminfo.PodVMInfo")
        self.assertEqual([m.name for m in service.methods], ["GetInfo"])
        self.assertEqual(
            _fields(podvminfo_pb2.GetInfoRequest), {"PodName": (1, S), "PodNamespace": (2, S), "Wait": (3, B)}
        )
        self.assertEqual(_fields(podvminfo_pb2.GetInfoResponse), {"VMID": (1, S)})

    def test_admin(self) -> None:
        """caa's own operator service (docs/ttrpc-api.md): caactl and the adaptor must agree on these numbers."""
        self.assertEqual(admin_pb2.DESCRIPTOR.package, "caa.adaptor.v1")
        service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
        self.assertEqual(service.full_name, "caa.adaptor.v1.Admin")
        method = service.methods_by_name["ListSandboxes"]
        self.assertEqual((method.input_type.name, method.output_type.name),
                         ("ListSandboxesRequest", "ListSandboxesResponse"))
        self.assertEqual(_fields(admin_pb2.ListSandboxesRequest), {})
        self.assertEqual(_fields(admin_pb2.ListSandboxesResponse), {"sandboxes": (1, M)})
        self.assertEqual(
            _fields(admin_pb2.Sandbox),
            {"id": (1, S), "pod_name": (2, S), "pod_namespace": (3, S), "instance_id": (4, S), "vm_ips": (5, S),
             "state": (6, S), "created": (7, M), "error": (8, S)},
        )
        created_type = admin_pb2.Sandbox.DESCRIPTOR.fields_by_name["created"].message_type
        assert created_type is not None
        self.assertEqual(created_type.full_name,
                         "google.protobuf.Timestamp")

    def test_podvm_claim(self) -> None:
        """caa's own pool VM service (issue 16): the adaptor and the pool VM's forwarder must agree on these."""
        self.assertEqual(podvm_pb2.DESCRIPTOR.package, "caa.podvm.v1")
        service = podvm_pb2.DESCRIPTOR.services_by_name["PodVM"]
        self.assertEqual(service.full_name, "caa.podvm.v1.PodVM")
        method = service.methods_by_name["Claim"]
        self.assertEqual((method.input_type.name, method.output_type.name), ("ClaimRequest", "ClaimResponse"))
        self.assertEqual(
            _fields(podvm_pb2.ClaimRequest),
            {"vm_name": (1, S), "token": (2, BY), "apf_json": (3, S), "auth_json": (4, S),
             "initdata_digest": (5, S)},
        )
        self.assertEqual(_fields(podvm_pb2.ClaimResponse), {"initdata_digest": (1, S)})

    def test_health(self) -> None:
        self.assertEqual(health_pb2.DESCRIPTOR.package, "grpc")
        service = health_pb2.DESCRIPTOR.services_by_name["Health"]
        self.assertEqual(service.full_name, "grpc.Health")
        self.assertEqual(
            {m.name: (m.input_type.name, m.output_type.name) for m in service.methods},
            {"Check": ("CheckRequest", "HealthCheckResponse"), "Version": ("CheckRequest", "VersionCheckResponse")},
        )
        self.assertEqual(_fields(health_pb2.CheckRequest), {"service": (1, S)})
        self.assertEqual(_fields(health_pb2.HealthCheckResponse), {"status": (1, FieldDescriptor.TYPE_ENUM)})
        self.assertEqual(health_pb2.HealthCheckResponse.UNKNOWN, 0)
        self.assertEqual(health_pb2.HealthCheckResponse.SERVING, 1)
        self.assertEqual(health_pb2.HealthCheckResponse.NOT_SERVING, 2)
        self.assertEqual(_fields(health_pb2.VersionCheckResponse), {"grpc_version": (1, S), "agent_version": (2, S)})

    def test_agent_service_has_every_rpc_of_the_spec(self) -> None:
        self.assertEqual(agent_pb2.DESCRIPTOR.package, "grpc")
        service = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
        self.assertEqual(service.full_name, "grpc.AgentService")
        got = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
        self.assertEqual(got, AGENT_RPCS)
        self.assertEqual(len(got), 42)
        for method in service.methods:
            self.assertFalse(method.client_streaming or method.server_streaming, method.name)
        self.assertEqual(service.methods_by_name["UpdateInterface"].output_type.full_name, "types.Interface")
        self.assertEqual(service.methods_by_name["CreateContainer"].output_type.full_name, "google.protobuf.Empty")

    def test_create_container_and_oci_spec(self) -> None:
        fields = _fields(agent_pb2.CreateContainerRequest)
        self.assertEqual(fields["container_id"], (1, S))
        self.assertEqual(fields["exec_id"], (2, S))
        self.assertEqual(fields["storages"], (5, M))
        self.assertEqual(fields["OCI"], (6, M))
        self.assertEqual(fields["sandbox_pidns"], (7, B))
        oci_type = agent_pb2.CreateContainerRequest.DESCRIPTOR.fields_by_name["OCI"].message_type
        assert oci_type is not None
        self.assertEqual(oci_type.full_name,
                         "grpc.Spec")
        spec = _fields(oci_pb2.Spec)
        self.assertEqual(spec["Version"], (1, S))
        self.assertEqual(spec["Process"], (2, M))
        self.assertEqual(spec["Root"], (3, M))
        self.assertEqual(spec["Mounts"], (5, M))
        self.assertEqual(spec["Annotations"], (7, M))
        self.assertEqual(spec["Linux"], (8, M))
        self.assertEqual(_fields(oci_pb2.Mount), {"destination": (1, S), "source": (2, S), "type": (3, S),
                                                  "options": (4, S)})
        self.assertEqual(_fields(agent_pb2.Storage)["mount_point"], (6, S))
        self.assertEqual(_fields(agent_pb2.Storage)["source"], (3, S))
        self.assertEqual(_fields(agent_pb2.CreateSandboxRequest)["sandbox_id"], (5, S))
        self.assertEqual(_fields(agent_pb2.SetPolicyRequest), {"policy": (1, S)})

    def test_create_container_round_trip_keeps_unknown_fields(self) -> None:
        """A newer shim's extra fields survive decode/re-encode (the proxy rewrites CreateContainer)."""
        req = agent_pb2.CreateContainerRequest(container_id="c1")
        req.OCI.Annotations["io.kubernetes.cri.container-type"] = "sandbox"
        wire = req.SerializeToString() + b"\xa0\x06\x01"  # field 100, varint 1: unknown to us
        decoded = agent_pb2.CreateContainerRequest.FromString(wire)
        self.assertEqual(decoded.OCI.Annotations["io.kubernetes.cri.container-type"], "sandbox")
        self.assertTrue(decoded.SerializeToString().endswith(b"\xa0\x06\x01"))

    def test_types_and_csi(self) -> None:
        self.assertEqual(types_pb2.DESCRIPTOR.package, "types")
        self.assertEqual(_fields(types_pb2.Route)["device"], (3, S))
        self.assertEqual(_fields(types_pb2.Interface)["IPAddresses"], (3, M))
        self.assertEqual(csi_pb2.DESCRIPTOR.package, "grpc")
        self.assertEqual(_fields(csi_pb2.VolumeStatsResponse), {"usage": (1, M), "volume_condition": (2, M)})
