"""
libvirt provider (spec-providers §2): one persistent domain per pod, its root disk a copy-on-write qcow2
overlay of the pod VM base volume in a storage pool, its user data on a NoCloud `cidata` ISO volume, its
NIC on a libvirt network whose DHCP gives the IP: reserved up front for the domain's MAC where the
network lets us (--ip-reservation), else found in the leases.

Options (default < env < flag), upstream's names plus a few marked "caa":

    --uri             LIBVIRT_URI              qemu+ssh://root@192.168.122.1/system?no_verify=1
    --pool-name       LIBVIRT_POOL             default
    --network-name    LIBVIRT_NET              default
    --vol-name        LIBVIRT_VOL_NAME         podvm-base.qcow2
    --launch-security LIBVIRT_LAUNCH_SECURITY  "" (s390-pv; caa: sev, sev-snp, tdx)
    --firmware        LIBVIRT_EFI_FIRMWARE     /usr/share/OVMF/OVMF_CODE_4M.fd ("" = legacy BIOS)
    --cpu             LIBVIRT_CPU              2
    --memory          LIBVIRT_MEMORY           8192 (MiB)
    --cpuset          LIBVIRT_CPUSET           ""
    --root-disk-size  LIBVIRT_ROOT_DISK_SIZE   10 (GiB)
    --data-dir        (none)                   /var/lib/libvirt/images (accepted, unused as upstream)
    --disable-cvm     DISABLECVM               true
    --domain-type     LIBVIRT_DOMAIN_TYPE      kvm (caa; "qemu" = software emulation, TCG)
    --ip-timeout      LIBVIRT_IP_TIMEOUT       180s (caa; deadline for the VM's IP)
    --ip-reservation  LIBVIRT_IP_RESERVATION   true (caa; reserve the IP on the network's DHCP up front)
"""

from __future__ import annotations

from twisted.python import usage
from zope.interface import implementer

from caa.providers.interfaces import IProvider, IProviderFactory
from caa.providers.libvirt.config import LibvirtConfig, LibvirtOptions
from caa.reactors import INodeReactor


@implementer(IProviderFactory)
class LibvirtProviderFactory:
    name = "libvirt"
    description = "Pod VMs as libvirt domains (QEMU/KVM), user data on a cidata ISO"

    def options(self) -> usage.Options:
        return LibvirtOptions()

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        from caa.providers.libvirt.provider import LibvirtProvider

        return LibvirtProvider(reactor, LibvirtConfig.from_options(options))


__all__ = ["LibvirtProviderFactory", "LibvirtOptions", "LibvirtConfig"]
