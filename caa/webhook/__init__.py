"""`twistd caa-webhook`: the peer-pods mutating admission webhook (spec-providers §12).

Pods of the peer-pods runtime class get their summed CPU/memory/GPU as VM-size annotations, their
container resources cleared and one `kata.peerpods.io/vm` on the first container, so the scheduler counts
VMs per node instead of node CPU and memory.

Modules: `quantity` (Kubernetes resource quantities, exact), `mutation` (the pod rewrite),
`admission` (AdmissionReview in -> response with a JSON patch), `certs` (serving certificate reloaded
when cert-manager rotates it), `server` (the HTTPS and probe listeners), `tap` (options, service).
"""
