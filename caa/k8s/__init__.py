"""The Kubernetes client layer: configuration (kubeconfig or in-cluster), `KubeClient` (one ApiClient, every
call off the reactor thread with a deadline, our own error types), `Watcher` (list + watch that survives
410 Gone and dropped streams), and the names and shapes of peer-pod objects. See docs/kubernetes.md."""
