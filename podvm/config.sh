# podvm/config.sh: what goes into the caa pod VM image (sourced by podvm/build.sh).
# Everything here is part of the cache key: change it and the next build starts over.

# Debian release and packages of the base root filesystem (debootstrap --variant=minbase).
PODVM_SUITE=bookworm
PODVM_PACKAGES=(
  python3            # runs caa (the forwarder, caa-process-user-data, the development agent)
  iproute2 iptables  # pod network: netns, vxlan, routes, neighbours, iptables raw/nat
  kmod               # modprobe for the kernel modules below
  busybox            # udhcpc for the tiny init, and a rescue shell
  netbase            # /etc/protocols, /etc/services for Python's socket module
  systemd systemd-sysv udev   # the full (systemd) boot of the qcow2
)

# Extra packages of the byom variant (build.sh --byom-authorized-keys): the sshd the adaptor pushes user data to.
PODVM_BYOM_PACKAGES=(openssh-server)

# Guest kernel: Debian's cloud kernel (virtio, vxlan, isofs, ata_piix as modules; no AHCI).
PODVM_KERNEL_META=linux-image-cloud-amd64

# Modules the stage-1 initramfs loads to reach the root disk.
PODVM_STAGE1_MODULES=(virtio_pci virtio_blk)
# Modules copied into the image (with their dependencies). The tiny init loads the first group at
# boot; the rest are loaded on demand by the kernel (request_module -> /sbin/modprobe).
PODVM_BOOT_MODULES=(virtio_pci virtio_net virtio_blk virtio_scsi virtio_rng ata_piix sr_mod isofs vxlan)
PODVM_EXTRA_MODULES=(
  veth bridge tun overlay
  ip_tables iptable_filter iptable_nat iptable_raw iptable_mangle
  nf_conntrack nf_nat xt_conntrack xt_comment xt_MASQUERADE xt_CT xt_mark xt_addrtype
  nf_tables nft_chain_nat nft_ct nft_masq nft_compat
  sch_ingress cls_u32 act_mirred
)

# Trimmed from the root filesystem after the install (documentation, locales, apt state).
PODVM_TRIM=(
  usr/share/doc usr/share/man usr/share/info usr/share/locale usr/share/lintian
  var/cache/apt var/lib/apt/lists var/cache/debconf var/log
  usr/lib/x86_64-linux-gnu/gconv
)

# Requirements of caa that only the node needs: not installed into the pod VM.
PODVM_PIP_EXCLUDE=(kubernetes)

# Size of the ext4 root filesystem (sparse; the qcow2 holds only what is used).
PODVM_ROOT_SIZE=640M

# Kernel command line of both boots (the BIOS disk's syslinux.cfg adds root=UUID=<the root filesystem's>).
PODVM_KERNEL_CMDLINE="console=ttyS0 quiet panic=-1 ro"

# The BIOS disk: size of its FAT boot partition (kernel ~14 MiB + stage-1 initramfs ~1.2 MiB + syslinux),
# and the MBR boot code that chain-loads the active partition (Debian's syslinux package).
PODVM_BOOT_PART_MB=32
SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin
