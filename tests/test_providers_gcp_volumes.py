"""CSI volumes on GCP against the Compute fake (tests/fakes/gcp_compute.py) on a real socket: persistent disks
attached in the insert body (`boot: false`, `autoDelete: false`, device `caa-lun-<n>` in the adaptor's order),
left in place when the instance goes (also by a restarted adaptor), and disks that cannot be attached refused
before anything is made."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from caa.providers.gcp.disks import disk_path
from caa.providers.gcp.provider import instance_body
from caa.providers.interfaces import ErrorKind, InstanceSpec, ProviderError
from tests.fakes import gcp_compute
from tests.test_providers_contract import unique_pod
from tests.test_providers_gcp import GcpTestMixin


class GcpVolumeTests(GcpTestMixin, TestCase):
    async def refused(self, spec: InstanceSpec, prefix: str) -> tuple[ProviderError, str]:
        """Create with `spec`, which must fail; the error and the instance name."""
        provider = self.gcp()
        pod, sid = unique_pod(prefix)
        try:
            await provider.create_instance(pod, sid, b"", spec)
        except ProviderError as e:
            return e, provider.instance_name(pod, sid)
        self.fail(f"created an instance with {spec.volumes}")

    def inserts(self) -> list[str]:
        return [p for m, p in self.fake.requests if m == "POST" and p.endswith("/instances")]

    async def test_attached_in_order_and_kept_when_the_instance_goes(self) -> None:
        await self.start_fake()
        first, second = self.fake.add_disk("pvc-b"), self.fake.add_disk("pvc-a")
        # the PD CSI driver's volume handle, a Compute URL, a bare name in the zone: all the same kind of id
        volumes = [first, f"https://www.googleapis.com/compute/v1/{second}", "pvc-c"]
        third = self.fake.add_disk("pvc-c")
        disks = [first, second, third]
        provider = self.gcp()
        pod, sid = unique_pod("gcv")
        instance = await provider.create_instance(pod, sid, b"", InstanceSpec(volumes=volumes))
        body = self.fake.inserted[instance.name]["disks"]
        self.assertTrue(body[0]["boot"])
        self.assertEqual(body[1:], [{"boot": False, "autoDelete": False, "type": "PERSISTENT", "mode": "READ_WRITE",
                                     "source": d, "deviceName": f"caa-lun-{n}"} for n, d in enumerate(disks)])
        self.assertEqual(self.fake.attachments, [(instance.name, f"caa-lun-{n}", d) for n, d in enumerate(disks)])
        link = self.fake.instances[instance.name]["selfLink"]
        self.assertEqual([self.fake.disks[d]["users"] for d in disks], [[link]] * 3)

        # an adaptor restarted in between: a fresh provider deletes, twice (the second finds nothing)
        for _ in range(2):
            await self.gcp().delete_instance(instance.id)
        self.assertEqual(self.fake.instances, {})
        self.assertEqual([self.fake.disks[d]["users"] for d in disks], [[]] * 3)  # kept, free
        self.assertFalse([p for m, p in self.fake.requests if m == "DELETE" and "/disks/" in p])

        # released for real: the next pod's instance takes the same disk
        again = await provider.create_instance(*unique_pod("gcv"), b"", InstanceSpec(volumes=[third]))
        self.addCleanup(provider.delete_instance, again.id)
        self.assertEqual(self.fake.attachments[-1], (again.name, "caa-lun-0", third))

    async def test_missing_disk_is_a_config_error_and_nothing_is_made(self) -> None:
        await self.start_fake()
        present = self.fake.add_disk("pvc-here")
        missing = present.replace("pvc-here", "pvc-gone")
        error, name = await self.refused(InstanceSpec(volumes=[present, missing]), "gcm")
        self.assertIs(error.kind, ErrorKind.INVALID_CONFIG)
        self.assertIn(f"gcp: disk pre-validation failed: disk {missing} not found", str(error))
        self.assertEqual(self.inserts(), [])
        self.assertNotIn(name, self.fake.instances)
        self.assertEqual(self.fake.disks[present]["users"], [])

    async def test_disk_used_by_another_instance_is_transient(self) -> None:
        await self.start_fake()
        path = self.fake.add_disk("pvc-shared")
        provider = self.gcp()
        first = await provider.create_instance(*unique_pod("gcu"), b"", InstanceSpec(volumes=[path]))
        self.addCleanup(provider.delete_instance, first.id)
        error, name = await self.refused(InstanceSpec(volumes=[path]), "gcu")
        self.assertIs(error.kind, ErrorKind.TRANSIENT)  # the pod before may still be letting it go
        self.assertIn(f"disk {path} is in use by ", str(error))
        self.assertIn(f"/instances/{first.name}", str(error))
        self.assertEqual(len(self.inserts()), 1)
        self.assertNotIn(name, self.fake.instances)

    async def test_bad_ids_zones_and_states_are_config_errors(self) -> None:
        await self.start_fake()
        twice = self.fake.add_disk("pvc-twice")
        cases = [
            (["vol-0123456789abcdef0/x"], "is neither projects/<p>/zones/<z>/disks/<name> nor a disk name"),
            ([self.fake.add_disk("pvc-b-zone", zone=gcp_compute.OTHER_ZONE)],
             f"is in zone {gcp_compute.OTHER_ZONE}, the instance in {gcp_compute.ZONE}"),
            ([self.fake.add_disk("pvc-failed", status="FAILED")], "pvc-failed is FAILED"),
            ([twice, "pvc-twice"], "a disk is named twice"),
        ]
        for volumes, text in cases:
            error, name = await self.refused(InstanceSpec(volumes=volumes), "gcb")
            self.assertIs(error.kind, ErrorKind.INVALID_CONFIG)
            self.assertIn(text, str(error))
        self.assertEqual(self.inserts(), [])
        self.assertEqual(self.fake.instances, {})


class FakeAttachedDiskTests(GcpTestMixin, TestCase):
    """The fake refuses what Compute refuses for attached disks even when the provider's pre-check is skipped,
    and deletes only autoDelete disks with their instance."""

    async def insert(self, name: str, disks: list[dict[str, Any]]) -> Any:
        provider = self.gcp()
        config = provider.config
        body = instance_body(config, name, config.machine_type, f"projects/{gcp_compute.PROJECT}/global/images/"
                             f"{gcp_compute.IMAGE}", 20, b"", {}, 0)
        body["disks"] += disks
        zone = f"projects/{gcp_compute.PROJECT}/zones/{gcp_compute.ZONE}"
        operation = await provider.compute.call("POST", f"{zone}/instances", body, f"insert {name}")
        await provider.compute.wait(operation, 10, f"insert {name}")
        return provider

    async def insert_error(self, name: str, disks: list[dict[str, Any]]) -> str:
        try:
            await self.insert(name, disks)
        except ProviderError as e:
            return str(e)
        self.fail("Compute accepted the disks")

    async def test_refusals_and_auto_delete(self) -> None:
        await self.start_fake()
        kept, dropped = self.fake.add_disk("pvc-kept"), self.fake.add_disk("pvc-dropped")
        missing = kept.replace("pvc-kept", "pvc-none")
        self.assertIn(f"HTTP 404 notFound: The resource '{missing}' was not found",
                      await self.insert_error("vm-a", [{"source": missing, "deviceName": "d0"}]))
        other = self.fake.add_disk("pvc-other", zone=gcp_compute.OTHER_ZONE)
        self.assertIn("Disk must be in the same zone as the instance",
                      await self.insert_error("vm-a", [{"source": other}]))
        provider = await self.insert("vm-b", [{"source": kept, "deviceName": "d0"},  # autoDelete: false by default
                                              {"source": dropped, "deviceName": "d1", "autoDelete": True}])
        self.assertIn("resourceInUseByAnotherResource",
                      await self.insert_error("vm-c", [{"source": kept, "deviceName": "d0"}]))
        self.assertEqual(set(self.fake.instances), {"vm-b"})
        await provider.delete_instance("vm-b")
        self.assertNotIn(dropped, self.fake.disks)  # autoDelete: gone with the instance
        self.assertEqual(self.fake.disks[kept]["users"], [])


class DiskPathTests(TestCase):
    def test_forms(self) -> None:
        path = "projects/p/zones/us-central1-a/disks/pvc-1"
        self.assertEqual(disk_path(path, "q", "z"), path)
        self.assertEqual(disk_path("/" + path, "q", "z"), path)
        self.assertEqual(disk_path("https://compute.googleapis.com/compute/v1/" + path, "q", "z"), path)
        self.assertEqual(disk_path("pvc-1", "p", "us-central1-a"), path)
        self.assertEqual(disk_path("projects/p/regions/us-central1/disks/r-1", "q", "z"),
                         "projects/p/regions/us-central1/disks/r-1")
        for bad in ("", "PVC", "projects/p/zones/z/instances/x", "projects/p/zones/z/disks/a/b", "vol-1/x"):
            with self.assertRaises(ValueError):
                disk_path(bad, "p", "z")
