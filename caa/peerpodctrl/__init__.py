"""`twistd caa-peerpod-ctrl`: deletes the cloud instance of every PeerPod being deleted that still holds
`peer.pod/finalizer`, then releases the finalizer (spec-providers §11). One replica acts at a time (a
`coordination.k8s.io/v1` Lease). Modules: `config` (provider settings from peer-pods-cm / peer-pods-secret),
`providers` (providers built from them), `queue` (per-key work queue with back-off), `reconcile` (one
PeerPod), `lease` (leader election), `service` (the daemon), `tap` (twistd options). See docs/kubernetes.md."""
