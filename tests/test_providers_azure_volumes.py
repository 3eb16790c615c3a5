"""CSI volumes on Azure against the ARM fake (tests/fakes/azure_arm.py) on a real socket: managed data disks
attached in the VM's storageProfile at creation (LUN = the adaptor's order, deleteOption Detach), released and
never deleted when the VM goes (also by a restarted adaptor), and disks that cannot be attached refused before
anything is made."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from caa.providers.azure.arm import COMPUTE_API, NETWORK_API
from caa.providers.azure.provider import nic_body, vm_body
from caa.providers.interfaces import ErrorKind, InstanceSpec, ProviderError
from tests.fakes import azure_arm
from tests.test_providers_azure import AzureTestMixin
from tests.test_providers_contract import unique_pod


class AzureVolumeTests(AzureTestMixin, TestCase):
    async def refused(self, spec: InstanceSpec, prefix: str) -> tuple[ProviderError, str]:
        """Create with `spec`, which must fail; the error and the VM name."""
        provider = self.azure()
        pod, sid = unique_pod(prefix)
        try:
            await provider.create_instance(pod, sid, b"", spec)
        except ProviderError as e:
            return e, provider.instance_name(pod, sid)
        self.fail(f"created a VM with {spec.volumes}")

    async def test_attached_in_order_and_kept_when_the_vm_goes(self) -> None:
        await self.start_fake()
        # the CSI driver may keep its disks in another resource group (AKS: the node resource group)
        disks = [self.fake.add_disk("pvc-b"), self.fake.add_disk("pvc-a", group="mc-caa-nodes"),
                 self.fake.add_disk("pvc-c")]
        provider = self.azure()
        pod, sid = unique_pod("azv")
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec(volumes=disks))
        body = self.fake.bodies[instance.id.lower()]["properties"]["storageProfile"]["dataDisks"]
        self.assertEqual(body, [{"lun": n, "createOption": "Attach", "deleteOption": "Detach",
                                 "managedDisk": {"id": d}} for n, d in enumerate(disks)])
        self.assertEqual(self.fake.attachments, [(instance.name, n, d) for n, d in enumerate(disks)])
        for disk_id in disks:
            disk = self.fake.disk(disk_id)
            assert disk is not None
            self.assertEqual((disk["managedBy"], disk["properties"]["diskState"]), (instance.id, "Attached"))

        # an adaptor restarted in between: a fresh provider deletes, twice (the second finds nothing)
        for _ in range(2):
            await self.azure().delete_instance(instance.id)
        self.assertEqual(self.leftover_names([instance.name]), [])  # VM, NIC, OS disk gone
        for disk_id in disks:
            disk = self.fake.disk(disk_id)
            assert disk is not None, f"{disk_id} was deleted"
            self.assertEqual((disk["managedBy"], disk["properties"]["diskState"]), (None, "Unattached"))
        self.assertFalse([m for m, p in self.fake.requests if m == "DELETE" and p.lower() in map(str.lower, disks)])

        # released for real: the next pod's VM takes the same disks
        again = await provider.create_instance(*unique_pod("azv"), b"", InstanceSpec(volumes=disks[:1]))
        self.addCleanup(provider.delete_instance, again.id)
        self.assertEqual(self.fake.attachments[-1], (again.name, 0, disks[0]))

    async def test_missing_disk_is_a_config_error_and_nothing_is_made(self) -> None:
        await self.start_fake()
        present = self.fake.add_disk("pvc-here")
        missing = present.replace("pvc-here", "pvc-gone")
        error, name = await self.refused(InstanceSpec(volumes=[present, missing]), "azm")
        self.assertIs(error.kind, ErrorKind.INVALID_CONFIG)
        self.assertIn(f"data disk pre-validation failed: disk {missing} not found", str(error))
        self.assertFalse([p for m, p in self.fake.requests if m == "PUT"])  # no NIC, no VM
        self.assertEqual(self.leftover_names([name]), [])
        disk = self.fake.disk(present)
        assert disk is not None
        self.assertEqual(disk["properties"]["diskState"], "Unattached")

    async def test_disk_held_by_another_vm_is_transient(self) -> None:
        await self.start_fake()
        disk_id = self.fake.add_disk("pvc-shared")
        provider = self.azure()
        first = await provider.create_instance(*unique_pod("azh"), b"", InstanceSpec(volumes=[disk_id]))
        self.addCleanup(provider.delete_instance, first.id)
        error, name = await self.refused(InstanceSpec(volumes=[disk_id]), "azh")
        self.assertIs(error.kind, ErrorKind.TRANSIENT)  # the pod before may still be letting it go
        self.assertIn(f"disk {disk_id} is Attached to {first.id}", str(error))
        self.assertEqual(self.leftover_names([name]), [])
        disk = self.fake.disk(disk_id)
        assert disk is not None
        self.assertEqual(disk["managedBy"], first.id)  # untouched

    async def test_bad_ids_regions_and_counts_are_config_errors(self) -> None:
        await self.start_fake()
        cases = [
            (["vol-0123456789abcdef0"], "vol-0123456789abcdef0: not a managed disk id"),
            ([self.fake.add_disk("pvc-west", location="westus")], "is in westus, not in the VM's region eastus"),
            ([self.fake.add_disk(f"pvc-{n}") for n in range(5)], "5 data disks, VM size Standard_DC2as_v5 takes "
                                                                 "at most 4"),
        ]
        twice = self.fake.add_disk("pvc-twice")
        cases.append(([twice, twice.upper()], "a disk is named twice"))
        for volumes, text in cases:
            error, name = await self.refused(InstanceSpec(volumes=volumes), "azb")
            self.assertIs(error.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn(text, str(error))
            self.assertEqual(self.leftover_names([name]), [])
        self.assertFalse([p for m, p in self.fake.requests if m == "PUT"])


class FakeDataDiskTests(AzureTestMixin, TestCase):
    """The fake refuses what ARM refuses for data disks even when the provider's pre-check is skipped, and keeps
    ARM's deleteOption semantics."""

    async def put_vm(self, name: str, data_disks: list[dict[str, object]]) -> str:
        provider = self.azure()
        config = provider.config
        await provider.arm.put(provider.nic_path(name), NETWORK_API, nic_body(config, ""), 10, "nic")
        body = vm_body(config, name, config.instance_size, azure_arm.IMAGE_ID, b"", provider.nic_path(name),
                       "ssh-rsa AAAA")
        body["properties"]["storageProfile"]["dataDisks"] = data_disks
        await provider.arm.put(provider.vm_path(name), COMPUTE_API, body, 10, f"create {name}")
        return provider.vm_path(name)

    async def put_error(self, name: str, data_disks: list[dict[str, object]]) -> str:
        try:
            await self.put_vm(name, data_disks)
        except ProviderError as e:
            return str(e)
        self.fail("ARM accepted the data disks")

    async def test_refusals_and_delete_options(self) -> None:
        await self.start_fake()
        kept, dropped = self.fake.add_disk("pvc-kept"), self.fake.add_disk("pvc-dropped")
        missing = kept.replace("pvc-kept", "pvc-none")
        self.assertIn(f"NotFound: Resource {missing} not found.", await self.put_error(
            "vm-a", [{"lun": 0, "createOption": "Attach", "managedDisk": {"id": missing}}]))
        vm = await self.put_vm("vm-b", [
            {"lun": 0, "createOption": "Attach", "managedDisk": {"id": kept}},  # ARM's default: Detach
            {"lun": 1, "createOption": "Attach", "deleteOption": "Delete", "managedDisk": {"id": dropped}}])
        self.assertIn("ConflictingUserInput: Cannot attach the disk pvc-kept", await self.put_error(
            "vm-c", [{"lun": 0, "createOption": "Attach", "managedDisk": {"id": kept}}]))
        self.assertIn("OperationNotAllowed", await self.put_error(
            "vm-d", [{"lun": n, "createOption": "Attach", "managedDisk": {"id": kept}} for n in range(5)]))
        provider = self.azure()
        try:
            await provider.arm.delete(kept, "2023-10-02", 10, "delete a held disk")
        except ProviderError as e:
            self.assertIn("OperationNotAllowed", str(e))
        else:
            self.fail("ARM deleted a disk a VM holds")
        await provider.arm.delete(vm, COMPUTE_API, 10, "delete vm-b")
        self.assertIsNone(self.fake.disk(dropped))  # deleteOption Delete: gone with the VM
        disk = self.fake.disk(kept)
        assert disk is not None
        self.assertEqual((disk["managedBy"], disk["properties"]["diskState"]), (None, "Unattached"))
