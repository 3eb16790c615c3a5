"""The node daemon: hypervisor service, sandbox journal, agent proxy, pod VM info, options."""
