"""Pod networking for peer pods: VXLAN tunnel between the worker node's pod netns and the pod VM.

Contracts live in :mod:`caa.network.interfaces`; pyroute2 only, iptables behind
:mod:`caa.network.iptables`.
"""
