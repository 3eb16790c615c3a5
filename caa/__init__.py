"""caa: Kubernetes peer pods (Confidential Containers cloud-api-adaptor) on Twisted."""

__version__ = "0.1.0"
