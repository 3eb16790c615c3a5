"""How the forwarder finds the data disks Azure and GCP attach (caa.forwarder.interceptors.find_data_disk), on
/dev and /sys trees laid out as udev and the kernel lay them out on those clouds."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import TestCase

from caa.forwarder import interceptors as ic


class CloudDiskTests(TestCase):
    def tree(self) -> tuple[str, str]:
        dev, sys = tempfile.mkdtemp(), tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, dev)
        self.addCleanup(shutil.rmtree, sys)
        return dev, sys

    def disk(self, dev: str, name: str, *links: str) -> str:
        """A device node `name` and by-* links to it (paths relative to dev)."""
        node = os.path.join(dev, name)
        open(node, "w").close()
        for link in links:
            os.makedirs(os.path.dirname(os.path.join(dev, link)), exist_ok=True)
            os.symlink(node, os.path.join(dev, link))
        return node

    def scsi(self, sys: str, name: str, hctl: str) -> None:
        """sysfs: /sys/block/<name>/device -> .../<H:C:T:L>, as the SCSI layer links it."""
        target = os.path.join(sys, "devices", hctl)
        os.makedirs(target)
        os.makedirs(os.path.join(sys, "block", name))
        os.symlink(target, os.path.join(sys, "block", name, "device"))

    def test_azure_lun_links(self) -> None:
        dev, sys = self.tree()
        sdc = self.disk(dev, "sdc", "disk/azure/data/by-lun/0")
        sdd = self.disk(dev, "sdd", "disk/azure/scsi1/lun1")
        self.assertEqual(ic.find_data_disk(0, dev=dev, sys=sys), sdc)
        self.assertEqual(ic.find_data_disk(1, dev=dev, sys=sys), sdd)
        self.assertIsNone(ic.find_data_disk(2, dev=dev, sys=sys))

    def test_azure_vmbus_by_path_skips_scsi_host_0(self) -> None:
        """Without Azure's udev rules: systemd's by-path links; the OS disk (host 0) also has a lun-0 link."""
        dev, sys = self.tree()
        self.disk(dev, "sda", "disk/by-path/acpi-VMBUS:00-vmbus-f8b3781b1a824818a1c363d806ec15bb-lun-0")
        self.scsi(sys, "sda", "0:0:0:0")
        sdc = self.disk(dev, "sdc", "disk/by-path/acpi-VMBUS:01-vmbus-f8b3781a1e824818a1c363d806ec15bb-lun-0")
        self.scsi(sys, "sdc", "1:0:0:0")
        self.disk(dev, "sdc1", "disk/by-path/acpi-VMBUS:01-vmbus-f8b3781a1e824818a1c363d806ec15bb-lun-0-part1")
        sdd = self.disk(dev, "sdd", "disk/by-path/acpi-VMBUS:01-vmbus-f8b3781a1e824818a1c363d806ec15bb-lun-10")
        self.scsi(sys, "sdd", "1:0:0:10")
        self.assertEqual(ic.find_data_disk(0, dev=dev, sys=sys), sdc)
        self.assertEqual(ic.find_data_disk(10, dev=dev, sys=sys), sdd)
        self.assertIsNone(ic.find_data_disk(1, dev=dev, sys=sys))
        os.remove(sdc)
        os.remove(os.path.join(dev, "disk/by-path/acpi-VMBUS:01-vmbus-f8b3781a1e824818a1c363d806ec15bb-lun-0"))
        self.assertIsNone(ic.azure_disk_by_path(0, dev, sys))  # only the OS disk answers to lun-0: not taken

    def test_gcp_device_names(self) -> None:
        dev, sys = self.tree()
        sdb = self.disk(dev, "sdb", "disk/by-id/google-caa-lun-0", "disk/by-id/google-persistent-disk-0")
        sdc = self.disk(dev, "sdc", "disk/by-id/scsi-0Google_PersistentDisk_caa-lun-1")
        self.assertEqual(ic.find_data_disk(0, dev=dev, sys=sys), sdb)
        self.assertEqual(ic.find_data_disk(1, dev=dev, sys=sys), sdc)
        self.assertIsNone(ic.find_data_disk(2, dev=dev, sys=sys))
