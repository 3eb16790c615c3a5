"""Warm pools: the bootstrap material of a pool VM and its one-time claim token (ours, not upstream's).

A pool VM boots with a bootstrap apf.json: the pool server certificate and key (issued by the adaptor's CA
for the VM's instance name), the adaptor's client certificate as the only trusted client, the VM's name and
the SHA-256 of a random one-time token. No pod network, no pod identity, no registry credentials. The
adaptor keeps the token itself (in its journal) and presents it in `caa.podvm.v1.PodVM/Claim`; the user data
never holds the token, so reading it from the VM or the cloud reveals nothing that claims the VM.
The Claim message itself is protos/podvm.proto.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from caa.podvm_api.apf import APFConfig

__all__ = ["SERVICE", "METHOD", "TOKEN_BYTES", "new_token", "token_digest", "token_matches", "bootstrap_apf",
           "is_bootstrap"]

SERVICE = "caa.podvm.v1.PodVM"
METHOD = "Claim"
TOKEN_BYTES = 32


def new_token() -> bytes:
    """A fresh random one-time claim token."""
    return secrets.token_bytes(TOKEN_BYTES)


def token_digest(token: bytes) -> str:
    """What the VM's user data carries instead of the token: its SHA-256, lower-case hex."""
    return hashlib.sha256(token).hexdigest()


def token_matches(token: bytes, digest: str) -> bool:
    """Whether `token` hashes to `digest` (constant time; an empty digest matches nothing)."""
    if not digest or len(token) != TOKEN_BYTES:
        return False
    return hmac.compare_digest(token_digest(token), digest.lower())


def bootstrap_apf(vm_name: str, server_cert_pem: str, server_key_pem: str, client_ca_pem: str, token: bytes,
                  tls_min_version: str = "", tls_cipher_suites: tuple[str, ...] = ()) -> APFConfig:
    """The apf.json a pool VM boots with: pool TLS material, its name and its token's digest only."""
    if not vm_name:
        raise ValueError("a pool VM needs its instance name")
    if not (server_cert_pem and server_key_pem and client_ca_pem):
        raise ValueError("a pool VM needs a server certificate, its key and the adaptor's client certificate")
    return APFConfig(tls_server_cert=server_cert_pem, tls_server_key=server_key_pem, tls_client_ca=client_ca_pem,
                     tls_min_version=tls_min_version, tls_cipher_suites=tls_cipher_suites,
                     pool_vm_name=vm_name, claim_token_sha256=token_digest(token))


def is_bootstrap(config: APFConfig) -> bool:
    """An apf.json that starts the forwarder unclaimed."""
    return bool(config.claim_token_sha256)
