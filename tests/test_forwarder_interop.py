"""The forwarder relaying to a Go containerd/ttrpc server (tests/go/ttrpcpeer) in the agent's place: the
upstream side of the relay is wire-compatible with the Go reference, including metadata and the remaining
deadline (the Go server reports the timeout it saw) and status codes passed back unchanged."""

from __future__ import annotations

import json
import os

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SkipTest

from caa.reactors import as_node_reactor
from caa.ttrpc import TTRPCError
from tests import goshim
from tests.test_forwarder_relay import ForwarderTestBase

reactor = as_node_reactor(_reactor)
ECHO = goshim.ECHO_SERVICE


class GoAgentTests(ForwarderTestBase):
    async def _go_agent(self) -> None:
        if not goshim.go_available():
            if os.environ.get("CI"):
                raise AssertionError("go / golang-github-containerd-ttrpc-dev missing in CI (scripts/setup.sh)")
            raise SkipTest("go or golang-github-containerd-ttrpc-dev not installed")
        goshim.build_go_peer()
        server = await goshim.GoEchoServer(reactor, self.agent_path).start()
        self.addCleanup(server.stop)

    async def test_relay_to_go_ttrpc_server(self) -> None:
        await self._go_agent()
        svc = await self.start_forwarder()
        client = await self.dial(svc)
        self.assertEqual(await client.call_raw(ECHO, "Echo", b"\x00payload\xff", 5, None), b"\x00payload\xff")
        big = os.urandom(1 << 20)
        self.assertEqual(await client.call_raw(ECHO, "Echo", big, 10, None), big)
        reply = json.loads(await client.call_raw(ECHO, "Metadata", b"", 5, [("k", "v1"), ("k", "v2")]))
        self.assertEqual(reply["metadata"]["k"], ["v1", "v2"])
        seen = json.loads(await client.call_raw(ECHO, "Sleep", b'{"ms": 1}', 3, None))
        self.assertTrue(2000 < seen["timeout_ms"] <= 3000, seen)
        with self.assertRaises(TTRPCError) as cm:
            await client.call_raw(ECHO, "Error", b'{"code": 5, "message": "no such sandbox"}', 5, None)
        self.assertEqual((int(cm.exception.code), cm.exception.message), (5, "no such sandbox"))
