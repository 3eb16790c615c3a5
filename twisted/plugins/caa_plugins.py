"""twistd plugins of caa; each names the module that builds its service, loaded only when used."""

from twisted.application.service import ServiceMaker

caaAdaptor = ServiceMaker(
    "caa-adaptor",
    "caa.adaptor.tap",
    "Peer pods node daemon: Kata remote hypervisor service, pod VM lifecycle, agent proxy",
    "caa-adaptor",
)
caaForwarder = ServiceMaker(
    "caa-forwarder",
    "caa.forwarder.tap",
    "Pod VM daemon: pod network and mTLS relay of kata-agent ttrpc traffic",
    "caa-forwarder",
)
caaWebhook = ServiceMaker(
    "caa-webhook",
    "caa.webhook.tap",
    "Peer pods mutating admission webhook: pod resources -> VM-size annotations and kata.peerpods.io/vm",
    "caa-webhook",
)
caaPeerPodCtrl = ServiceMaker(
    "caa-peerpod-ctrl",
    "caa.peerpodctrl.tap",
    "Peer pods controller: deletes the instances of deleted PeerPods, then releases their finalizer",
    "caa-peerpod-ctrl",
)
