"""caa.devtools.libvirt_env (what `make demo-vm` prepares): the adaptor flags it hands out and its network XML."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree

from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.options import AdaptorOptions
from caa.devtools import libvirt_env


class LibvirtEnvTests(SynchronousTestCase):
    def env(self) -> libvirt_env.LibvirtEnv:
        return libvirt_env.LibvirtEnv("qemu:///system", "net-x", "pool-y", "base.qcow2", Path("/nowhere"), 0.0)

    def test_adaptor_args_parse_into_the_libvirt_provider_config(self) -> None:
        from caa.providers.libvirt import LibvirtConfig

        opts = AdaptorOptions({})
        opts.parseOptions(["--provider", "libvirt", "--socket", "/tmp/x.sock", *self.env().adaptor_args(cpu=1)])
        assert opts.provider_options is not None
        config = LibvirtConfig.from_options(opts.provider_options)
        self.assertEqual((config.uri, config.network_name, config.pool_name, config.vol_name),
                         ("qemu:///system", "net-x", "pool-y", "base.qcow2"))
        # no KVM on this machine: TCG, legacy BIOS (the image's BIOS disk), one vCPU, a long IP deadline
        self.assertEqual((config.domain_type, config.firmware, config.cpu, config.memory, config.ip_timeout),
                         ("qemu", "", 1, 1024, 600.0))

    def test_network_xml_is_nat_with_dhcp_on_the_gateway_subnet(self) -> None:
        root = ElementTree.fromstring(libvirt_env.network_xml("n1", "virbr-n1", "192.168.199.1"))
        self.assertEqual(root.findtext("name"), "n1")
        self.assertEqual(root.find("forward").get("mode"), "nat")  # type: ignore[union-attr]
        self.assertEqual(root.find("bridge").get("name"), "virbr-n1")  # type: ignore[union-attr]
        ip = root.find("ip")
        assert ip is not None
        self.assertEqual(ip.get("address"), "192.168.199.1")
        rng = ip.find("dhcp/range")
        assert rng is not None
        self.assertEqual((rng.get("start"), rng.get("end")), ("192.168.199.100", "192.168.199.250"))
