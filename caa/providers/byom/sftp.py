"""
Pushing a file to a BYOM VM over SFTP (spec-providers §1.6 "SSH client", §9.3), on twisted.conch.

One connection per push: TCP to `<ip>:22`, the SSH handshake with the host key checked (`HostKeyPolicy`),
public-key authentication as the configured user, the `sftp` subsystem, `mkdir -p` of the parent directory,
then the file created (or truncated) and written. The VM's sshd chroots SFTP to /media, so the relative path
`cidata/user-data` lands in /media/cidata/user-data.

Host keys: without an allow-list directory any key is accepted and its type and SHA256 fingerprint logged
(upstream's "stateless trust on first use"); with one, only a key whose fingerprint is among the `*.pub` files
of that directory (searched recursively; files over 16 KiB skipped; at most 100 keys) is accepted.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from attrs import frozen
from twisted.conch.ssh import channel, common, connection, filetransfer, keys, transport, userauth
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

MAX_ALLOWLIST_FILE = 16 * 1024
MAX_ALLOWLIST_KEYS = 100


class SSHPushError(Exception):
    """A push failed: the message names the VM and the step (connect, host key, auth, SFTP)."""


class HostKeyRejected(SSHPushError):
    """The VM presented a host key that is not in the allow-list."""


def fingerprint(key: keys.Key) -> str:
    """OpenSSH's `SHA256:<base64>` form (Twisted gives the base64 with its padding; ssh-keygen drops it)."""
    return "SHA256:" + str(key.fingerprint(keys.FingerprintFormats.SHA256_BASE64)).rstrip("=")


def load_allowlist(directory: str) -> frozenset[str]:
    """SHA256 fingerprints of the host keys in the `*.pub` files under `directory` (recursively; files over
    16 KiB skipped, unreadable or unparsable lines skipped, at most 100 keys). ValueError when none is found."""
    found: set[str] = set()
    for root, _dirs, files in sorted(os.walk(directory)):
        for name in sorted(files):
            if not name.endswith(".pub"):
                continue
            path = os.path.join(root, name)
            try:
                if os.path.getsize(path) > MAX_ALLOWLIST_FILE:
                    continue
                with open(path, "rb") as f:
                    lines = f.read().splitlines()
            except OSError:
                continue
            for line in lines:
                key = _parse_public_line(line)
                if key is not None:
                    found.add(fingerprint(key))
                if len(found) >= MAX_ALLOWLIST_KEYS:
                    return frozenset(found)
    if not found:
        raise ValueError(f"no SSH host keys (*.pub) found in the allow-list directory {directory}")
    return frozenset(found)


def _parse_public_line(line: bytes) -> keys.Key | None:
    """An authorized_keys / known-host `*.pub` line: `[options] type base64 [comment]`."""
    fields = line.strip().split()
    for i in range(len(fields) - 1):  # the key type may follow options
        try:
            key: keys.Key = keys.Key.fromString(b" ".join(fields[i:i + 2]))
            return key
        except (keys.BadKeyError, ValueError, IndexError):
            continue
    return None


@frozen
class HostKeyPolicy:
    """`allowed` None: accept any key (logged); else the set of accepted SHA256 fingerprints."""

    allowed: frozenset[str] | None = None

    @classmethod
    def from_dir(cls, directory: str) -> HostKeyPolicy:
        return cls(load_allowlist(directory) if directory else None)

    def check(self, host: str, key: keys.Key) -> None:
        print_ = fingerprint(key)
        if self.allowed is None:
            _log.info("byom: accepting SSH host key of {host}: {type} {fingerprint} (no allow-list)",
                      host=host, type=key.sshType().decode(), fingerprint=print_)
            return
        if print_ not in self.allowed:
            raise HostKeyRejected(f"SSH host key of {host} ({key.sshType().decode()} {print_}) is not in the "
                                  "host key allow-list")


_log = Logger()


@frozen
class SSHIdentity:
    """Who we log in as: the user and the key pair (read once at start)."""

    username: str
    public: keys.Key
    private: keys.Key

    @classmethod
    def from_files(cls, username: str, public_path: str, private_path: str) -> SSHIdentity:
        """ValueError naming the file that is missing or not a key."""
        try:
            with open(public_path, "rb") as f:
                public = _parse_public_line(f.read())
        except OSError as e:
            raise ValueError(f"SSH public key {public_path}: {e.strerror}") from None
        if public is None:
            raise ValueError(f"SSH public key {public_path}: not an authorized_keys line")
        try:
            private = keys.Key.fromFile(private_path)
        except OSError as e:
            raise ValueError(f"SSH private key {private_path}: {e.strerror}") from None
        except (keys.BadKeyError, keys.EncryptedKeyError, ValueError) as e:
            raise ValueError(f"SSH private key {private_path}: {e}") from None
        if private.public() != public:
            raise ValueError(f"SSH private key {private_path} does not match {public_path}")
        return cls(username, public, private)


class _UserAuth(userauth.SSHUserAuthClient):
    """Public-key authentication only, with our one key."""

    def __init__(self, identity: SSHIdentity, service: connection.SSHConnection) -> None:
        super().__init__(identity.username.encode(), service)
        self.identity = identity
        self.preferredOrder = [b"publickey"]
        self._offered = False

    def getPublicKey(self) -> keys.Key | None:
        if self._offered:  # one key only: a second call means the server refused it
            if isinstance(self.transport, _ClientTransport):
                self.transport.failure = SSHPushError(
                    f"SSH authentication as {self.identity.username!r} with {self.identity.public.sshType().decode()} "
                    "key refused")
            return None
        self._offered = True
        return self.identity.public

    def getPrivateKey(self) -> Deferred[keys.Key]:
        return succeed(self.identity.private)


class _SFTPChannel(channel.SSHChannel):
    name = b"session"

    def __init__(self, ready: Deferred[filetransfer.FileTransferClient], **kw: Any) -> None:
        super().__init__(**kw)
        self.ready = ready

    def channelOpen(self, specificData: bytes) -> None:
        assert self.conn is not None
        d = self.conn.sendRequest(self, b"subsystem", common.NS(b"sftp"), wantReply=True)
        d.addCallbacks(self._subsystem, self._refused)

    def _subsystem(self, _: object) -> None:
        client = filetransfer.FileTransferClient()
        client.makeConnection(self)
        self.dataReceived = client.dataReceived  # type: ignore[method-assign]  # cftp's way: bytes to the client
        self.ready.callback(client)

    def _refused(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(SSHPushError("the SFTP subsystem was refused"))

    def openFailed(self, reason: Any) -> None:
        if not self.ready.called:
            self.ready.errback(SSHPushError(f"SSH session channel refused: {reason}"))


class _Connection(connection.SSHConnection):
    def __init__(self, ready: Deferred[filetransfer.FileTransferClient]) -> None:
        super().__init__()
        self.ready = ready

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.openChannel(_SFTPChannel(self.ready, conn=self))


class _ClientTransport(transport.SSHClientTransport):
    """One client connection: checks the host key, authenticates, opens SFTP, fires `ready`."""

    def __init__(self, host: str, identity: SSHIdentity, policy: HostKeyPolicy) -> None:
        self.host = host
        self.identity = identity
        self.policy = policy
        self.ready: Deferred[filetransfer.FileTransferClient] = Deferred()
        self.failure: Exception | None = None

    def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Deferred[bool]:
        try:
            self.policy.check(self.host, keys.Key.fromString(hostKey))
        except SSHPushError as e:
            self.failure = e
            return fail(e)
        return succeed(True)

    def connectionSecure(self) -> None:
        self.requestService(_UserAuth(self.identity, _Connection(self.ready)))

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        if reasonCode == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            self.failure = SSHPushError(f"SSH authentication as {self.identity.username!r} refused")
        else:
            self.failure = SSHPushError(f"SSH disconnected: {description.decode('utf-8', 'replace')}")

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        if not self.ready.called:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self.ready.errback(self.failure or SSHPushError(f"SSH connection lost: {why}"))


def _endpoint(reactor: IReactorTCP, host: str, port: int, timeout: float) -> Any:
    if ":" in host:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


async def _mkdir_p(client: filetransfer.FileTransferClient, directory: str) -> None:
    path = ""
    for part in (p for p in directory.split("/") if p):
        path = posixpath.join(path, part) if path else part
        try:
            await client.makeDirectory(path.encode(), {})
        except filetransfer.SFTPError:
            await client.getAttrs(path.encode())  # it exists already (else this fails too, with the reason)


async def push_file(
    reactor: Any, host: str, port: int, identity: SSHIdentity, policy: HostKeyPolicy, path: str, data: bytes,
    timeout: float,
) -> None:
    """Write `data` to `path` (relative to the SFTP root) on `host`; SSHPushError naming the step on failure.
    The whole push (dial, handshake, transfer) must finish within `timeout` seconds."""
    proto = _ClientTransport(host, identity, policy)
    clock: IReactorTime = reactor
    work = Deferred.fromCoroutine(_push(reactor, proto, host, port, path, data, timeout))
    timed_out: list[bool] = []

    def expire() -> None:
        timed_out.append(True)
        work.cancel()

    timer = clock.callLater(timeout, expire)
    try:
        await work
    except Exception as e:
        if timed_out:
            raise SSHPushError(f"SFTP push of {path} to {host}: no answer within {timeout:g}s") from None
        if isinstance(e, SSHPushError):
            raise type(e)(f"SFTP push of {path} to {host}: {e}") from None
        if isinstance(e, ConnectError):
            raise SSHPushError(f"SFTP push of {path} to {host}: cannot connect to port {port}: {e}") from None
        if isinstance(e, filetransfer.SFTPError):
            raise SSHPushError(f"SFTP push of {path} to {host}: {e.message}") from None
        raise
    finally:
        if timer.active():
            timer.cancel()
        if proto.transport is not None:
            proto.transport.loseConnection()


async def _push(reactor: Any, proto: _ClientTransport, host: str, port: int, path: str, data: bytes,
                timeout: float) -> None:
    await connectProtocol(_endpoint(reactor, host, port, timeout), proto)
    client = await proto.ready
    parent = posixpath.dirname(path)
    if parent:
        await _mkdir_p(client, parent)
    handle = await client.openFile(
        path.encode(), filetransfer.FXF_WRITE | filetransfer.FXF_CREAT | filetransfer.FXF_TRUNC, {})
    try:
        offset = 0
        for start in range(0, len(data), 32768):
            chunk = data[start:start + 32768]
            await handle.writeChunk(offset, chunk)
            offset += len(chunk)
    finally:
        await handle.close()
