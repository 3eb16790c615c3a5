"""Encrypted cloud volumes: the forwarder asks confidential-data-hub for SecureMount over ttrpc (unix socket).

The CDH stand-in is a caa.ttrpc server that records the raw `api.SecureMountService/SecureMount` request, as
the real CDH (`/run/confidential-containers/cdh.sock`) receives it."""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.trial.unittest import TestCase

from caa.forwarder import interceptors as ic
from caa.podvm_api.volumes import CloudVolume, decode_cloud_volumes
from caa.reactors import as_node_reactor
from caa.ttrpc import CallContext, Server
from caa.ttrpc.endpoints import unix_server_endpoint
from tests.test_forwarder_interceptors import decode_fields

reactor = as_node_reactor(_reactor)


class SecureMountTests(TestCase):
    async def test_secure_mount_and_close(self) -> None:
        d = tempfile.mkdtemp(prefix="cdh")
        self.addCleanup(shutil.rmtree, d)
        seen: list[tuple[str, str, bytes]] = []

        async def cdh(ctx: CallContext, service: str, method: str, payload: bytes) -> bytes:
            seen.append((service, method, payload))
            return b"\x0a\x05/mnt/"  # SecureMountResponse{mount_path}: ignored by the forwarder

        server = Server(clock=reactor, name="cdh-standin")
        server.register_fallback(cdh)
        sock = os.path.join(d, "cdh.sock")
        port = await unix_server_endpoint(reactor, sock).listen(server.factory())
        self.addCleanup(port.stopListening)
        self.addCleanup(server.abort)
        disk = os.path.join(d, "disk")
        with open(disk, "wb") as f:
            f.write(b"LUKS\xba\xbe" + b"\0" * 1000)
        v = decode_cloud_volumes(
            '{"vol-0": {"mount_point": "/d", "lun": "0", "encrypt_type": "luks", "key_id": "ns/k/1"}}')[0]
        i = ic.Interceptors("/run/netns/podns", reactor, cdh_endpoint=lambda: UNIXClientEndpoint(reactor, sock))
        self.patch(CloudVolume, "host_path", property(lambda self: os.path.join(d, "mnt", self.name)))
        await i._secure_mount(v, disk, 10.0)
        (service, method, payload), = seen
        self.assertEqual((service, method), ("api.SecureMountService", "SecureMount"))
        fields = decode_fields(payload)
        options = {decode_fields(e)[1][0]: decode_fields(e)[2][0] for e in fields[2]}
        self.assertEqual(options[b"sourceType"], b"encrypted")  # LUKS header found
        self.assertEqual(options[b"mapperName"], b"caa-vol-0")
        self.assertTrue(os.path.isdir(os.path.join(d, "mnt", "vol-0")))
